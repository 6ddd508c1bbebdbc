"""The autograd functions: the bidirectional selective scan alone, and the whole mixer between in_proj and
out_proj with its hand-written backward."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.models.ops.bimamba.config import DEFAULT_CONFIG, ScanConfig
from pipeline.models.ops.bimamba.launch import (_b_and_c, _check_scan_inputs, conv_silu, conv_silu_backward,
                                                packed_params, scan_backward, scan_forward)


class _BidirectionalScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, dt, A, Bm, Cm, D, z, bias, cfg):
        A, D, bias = A.float().transpose(1, 2).contiguous(), D.float().contiguous(), bias.float().contiguous()
        bc = torch.cat([Bm, Cm], dim=-1)
        out, (init, dsum, ys) = scan_forward(u, dt, A, bc, D, z, bias, cfg)
        ctx.cfg = cfg
        ctx.save_for_backward(u, dt, A, bc, D, z, bias, init, dsum, ys)
        return out

    @staticmethod
    def backward(ctx, dout):
        u, dt, A, bc, D, z, bias, init, dsum, ys = ctx.saved_tensors
        dz = torch.empty_like(z)
        du, ddt, dbc, dA, dD, dbias = scan_backward(dout, dz, u, dt, A, bc, D, z, bias, (init, dsum, ys), ctx.cfg)
        dB, dC = _b_and_c(dbc.to(bc.dtype))
        return du, ddt, dA.transpose(1, 2), dB, dC, dD, dz, dbias, None


def bidirectional_selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor,
                                 delta_bias: Tensor, cfg: ScanConfig = DEFAULT_CONFIG) -> Tensor:
    """Both directions' selective scans with the D skip and the SiLU(z) gate, summed: (B, L, E) in u's dtype.

    Token-major layout, direction first: u, delta (2, B, L, E) (direction 1 runs from the last token to the first,
    its inputs stay in token order); A (2, E, N) (negative); B, C (2, B, L, N) (views are fine); D, delta_bias (2, E);
    z (B, L, E). delta is the raw dt_proj output: softplus(delta + delta_bias) is taken inside. Differentiable in all
    tensor inputs. Equals, per direction, mamba-ssm's selective_scan_fn(delta_softplus=True) on (b, d, l) inputs,
    direction 1's on flipped ones, with both outputs summed.
    """
    _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    return _BidirectionalScan.apply(u.contiguous(), delta.contiguous(), A, B, C, D, z, delta_bias, cfg)


class _BiMambaInner(torch.autograd.Function):
    """xz (B, L, 2E) -> (y_0 + y_1) * silu(z) (B, L, E): conv, x_proj, dt_proj, both scans and the gate, with a
    hand-written backward (cuBLAS for the matmuls, Triton for the rest) that writes dx and dz into one buffer.
    Saves xz, x_proj's output, y_0 + y_1, the segment carries and the stacked (padded, cast) parameters; u, dt and the
    chunk states are recomputed in the backward pass.

    The two directions' parameters come in as they are (14 tensors, `_direction_pairs`) and are stacked in here, out
    of autograd's sight (`packed_params`): 7 stacks and their backward nodes fewer per block on the host.

    x_proj's output is computed padded, as [dt (R), zeros, B (N), C (N)] with dt's block rounded up to a multiple of
    16 columns (`packed_params`): its rows (a multiple of 16 elements long, which Triton specializes on) and the B, C
    block then start on 16-byte boundaries. Without that cuBLAS falls back to 2-element-aligned kernels for the matmuls
    that read it (x_proj's and dt_proj's weight gradients took 15% of a VideoMamba-Ti step at 64 frames), and B, C
    would need a contiguous copy for the scan's vector loads."""

    @staticmethod
    def forward(ctx, xz, cfg, *pairs):
        conv_w, conv_b, wx, wdt, A, D, dt_bias = packed_params(pairs, xz)
        u, x_dbl, dt = _inner_projections(xz, conv_w, conv_b, wx, wdt, cfg)
        b, l, e2 = xz.shape
        e, rp = e2 // 2, wdt.shape[-1]
        bc = x_dbl.view(2, b, l, -1)[..., rp:]
        out, (init, dsum, ys) = scan_forward(u, dt.view(2, b, l, e), A, bc, D, xz[..., e:], dt_bias, cfg)
        ctx.cfg, ctx.dt_rank = cfg, pairs[6].shape[-1]
        ctx.pairs = [(p.shape, p.dtype) if p is not None else None for p in pairs]
        ctx.save_for_backward(xz, conv_w, conv_b, wx, wdt, A, D, dt_bias, x_dbl, init, dsum, ys)
        return out

    @staticmethod
    def backward(ctx, dout):
        xz, conv_w, conv_b, wx, wdt, A, D, dt_bias, x_dbl, init, dsum, ys = ctx.saved_tensors
        cfg, r = ctx.cfg, ctx.dt_rank
        b, l, e2 = xz.shape
        e, rp = e2 // 2, wdt.shape[-1]
        u = conv_silu(xz[..., :e], conv_w, conv_b, cfg)
        dt = torch.bmm(x_dbl[..., :rp], wdt.transpose(1, 2))
        bc = x_dbl.view(2, b, l, -1)[..., rp:]
        dxz = torch.empty_like(xz)
        dx_dbl = torch.zeros(x_dbl.shape, dtype=torch.float32, device=xz.device)  # fp32: dB, dC are summed atomically
        du_scan, ddt, _, dA, dD, dbias = scan_backward(
            dout, dxz[..., e:], u, dt.view(2, b, l, e), A, bc, D, xz[..., e:], dt_bias, (init, dsum, ys), cfg,
            dbc=dx_dbl.view(2, b, l, -1)[..., rp:])
        ddt = ddt.view(2, b * l, e)
        dx_dbl[..., :rp] = torch.bmm(ddt, wdt)  # the padding columns get ddt . 0 = 0
        dx_dbl = dx_dbl.to(xz.dtype)
        d_dt_proj = _weight_grad(ddt, x_dbl[..., :rp])[..., :r]  # padded: an aligned output
        d_x_proj = _weight_grad(dx_dbl, u.view(2, b * l, e))
        d_x_proj = torch.cat([d_x_proj[:, :r], d_x_proj[:, rp:]], dim=1)
        du = du_scan.view(2, b * l, e).baddbmm_(dx_dbl, wx)  # in place: out of place, cuBLAS first copies du_scan
        d_conv_w, d_conv_b = conv_silu_backward(xz[..., :e], du.view(2, b, l, e), conv_w, conv_b, dxz[..., :e], cfg)
        stacked = (d_conv_w, d_conv_b, d_x_proj, d_dt_proj, (dA * A).transpose(1, 2), dD, dbias)
        return (dxz, None, *_unstacked_grads(stacked, ctx.pairs))


def _direction_pairs(mixer) -> list[Optional[Tensor]]:
    """The mixer's per-direction parameters, each as (forward direction's, backward direction's): conv weight, conv
    bias (None without one), x_proj, dt_proj weight, A_log, D, dt_proj bias."""
    return [mixer.conv1d.weight, mixer.conv1d_b.weight, mixer.conv1d.bias, mixer.conv1d_b.bias,
            mixer.x_proj.weight, mixer.x_proj_b.weight, mixer.dt_proj.weight, mixer.dt_proj_b.weight,
            mixer.A_log, mixer.A_b_log, mixer.D, mixer.D_b, mixer.dt_proj.bias, mixer.dt_proj_b.bias]


def _unstacked_grads(stacked, pairs) -> list[Optional[Tensor]]:
    """Splits each stacked (2, ...) gradient back into the two parameters' shapes and dtypes: cast once for both
    directions where they share a dtype (one kernel, and contiguous slices autograd can keep as they are)."""
    grads = []
    for g, first, second in zip(stacked, pairs[0::2], pairs[1::2]):
        if first is not None and second is not None and first[1] == second[1]:
            g = g.to(first[1])
        for i, meta in enumerate((first, second)):
            grads.append(None if meta is None else g[i].reshape(meta[0]).to(meta[1]))
    return grads


def _inner_projections(xz, conv_w, conv_b, wx, wdt, cfg):
    """u (2, B, L, E), x_proj(u) (2, B*L, Rp+2N) and dt_proj's raw output (2, B*L, E), all in xz's dtype; wx, wdt are
    `packed_params`' weights in xz's dtype."""
    b, l, e2 = xz.shape
    e, rp = e2 // 2, wdt.shape[-1]
    u = conv_silu(xz[..., :e], conv_w, conv_b, cfg)
    x_dbl = torch.bmm(u.view(2, b * l, e), wx.transpose(1, 2))
    dt = torch.bmm(x_dbl[..., :rp], wdt.transpose(1, 2))
    return u, x_dbl, dt


# From this many tokens (batch x length) on, the weight gradients take one matmul per direction (`_weight_grad`)
PER_DIRECTION_TOKENS = 16384


def _weight_grad(a: Tensor, b: Tensor) -> Tensor:
    """a^T b for each direction: (2, K, M), (2, K, N) -> (2, M, N), K the tokens. For a batch of 2 cuBLAS does not
    split the long K, so at long sequences one mm per direction is faster: at VideoMamba-Ti's 64 frames, batch 4
    (K = 50,180) 76 -> 44 us and 81 -> 44 us for dt_proj's and x_proj's; at 8 frames the batched call is faster
    (15 against 19 us), at 16 they are even (H200, bench/NOTES.md v8)."""
    if a.shape[1] < PER_DIRECTION_TOKENS:
        return torch.bmm(a.transpose(1, 2), b)
    out = torch.empty(2, a.shape[2], b.shape[2], dtype=a.dtype, device=a.device)
    for d in range(2):
        torch.mm(a[d].t(), b[d], out=out[d])
    return out


def bimamba_forward(mixer, hidden_states: Tensor, cfg: ScanConfig = DEFAULT_CONFIG) -> Tensor:
    """The whole bidirectional mixer forward (B, L, D) -> (B, L, D) with the official parameter names on `mixer`:
    in_proj, conv1d / conv1d_b, x_proj / x_proj_b, dt_proj / dt_proj_b, A_log / A_b_log, D / D_b, out_proj."""
    xz = F.linear(hidden_states, mixer.in_proj.weight, mixer.in_proj.bias)
    y = _BiMambaInner.apply(xz, cfg, *_direction_pairs(mixer))
    return F.linear(y, mixer.out_proj.weight, mixer.out_proj.bias)
