"""The bidirectional Mamba mixer ("bimamba v2") with its memory-bound parts fused in Triton.

Per direction d (0: left to right, 1: right to left) and channel e, state n:

    u_d   = silu(causal depthwise conv_d(x))       (direction 1: the conv is causal in reversed order)
    delta = softplus(dt_d + bias_d),  dt_d = dt_proj_d(x_proj_d(u_d)[:R])  (matmuls stay on cuBLAS)
    h_s   = exp(delta_s A_d) h_{s-1} + delta_s B_s u_s        (s runs over the tokens in direction d's order)
    y_d   = C_s . h_s + D_d u_s
    out   = out_proj((y_0 + y_1) * silu(z))                   (no division by 2, as the official VideoMamba)

Three Triton kernels do everything between the matmuls:
- `_conv_fwd` / `_conv_bwd`: both directions' conv + SiLU in one pass over x (the backward recomputes the
  pre-activations instead of saving them);
- `_scan_fwd`: both directions' scans, the D skip and the SiLU(z) gate in one program per (channel block, segment,
  batch row). The right-to-left direction runs first by reversed indexing (no flipped copies) and leaves its y in the
  output buffer; the left-to-right direction adds its own y and the gate. Inside a program the sequence goes in
  chunks of BLOCK_T tokens whose states come from `tl.associative_scan` over the chunk (fp32), so every load of a
  chunk is issued at once; the state entering each chunk is saved for the backward pass.
- `_scan_bwd`: per direction the adjoint scan runs over the chunks in reverse scan order (a reverse associative scan),
  recomputing the chunk's states from the saved entering state; it writes du, d(dt) and dz, and accumulates dB, dC,
  dA, dD and the bias gradient with atomics.

Parallelism along the sequence: when batch rows x channel blocks are too few to fill the GPU, the sequence is cut
into segments. A summary pass of the same kernels gives each segment's local final state (forward) or local adjoint
(backward); a short torch loop over the segments carries them, and the main pass starts each segment from its carry.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

CONV_WIDTH = 4


@dataclass(frozen=True)
class ScanConfig:
    """Tile sizes of the kernels; `segments` = 0 lets `segment_count` choose."""
    block_t: int = 16  # the fastest fwd+bwd of the sweep on the H100 (bench/NOTES.md)
    block_e: int = 8
    num_warps: int = 2
    conv_block_t: int = 64
    conv_block_e: int = 64
    segments: int = 0
    target_programs: int = 512


DEFAULT_CONFIG = ScanConfig()


# ------------------------------------------------------------------------------------------------ Triton helpers
@triton.jit
def _ssm_combine(a1, b1, a2, b2):
    """(decay, state) of two consecutive steps: h = a2 (a1 h0 + b1) + b2."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _adjoint_combine(f1, g1, a1, f2, g2, a2):
    """Reverse scan of lam_s = w_s + a_{s+1} lam_{s+1}: (f1, g1, a1) aggregates the later steps, (f2, g2, a2) is the
    earlier one; lam = f + g * mu_in, where mu_in = a lam of the step after the range, and a is the decay of the
    range's last step (the one the next earlier step needs)."""
    return f2 + g2 * a1 * f1, g2 * a1 * g1, a2


@triton.jit
def _chunk_tokens(direction: tl.constexpr, seg_lo, seg_hi, chunk, BLOCK_T: tl.constexpr):
    """Token indices (in memory order) of the chunk-th chunk of a segment, in direction's scan order."""
    r = chunk * BLOCK_T + tl.arange(0, BLOCK_T)
    if direction == 0:
        t = seg_lo + r
    else:
        t = seg_hi - 1 - r
    return t, r < seg_hi - seg_lo


@triton.jit
def _softplus(x):
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(x)))


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _load_chunk(u_ptr, dt_ptr, b_ptr, c_ptr, bias, t, valid, offs_e, mask_e, offs_n, mask_n, s_ul, s_bl, s_bn):
    """u, softplus(dt + bias), dt + bias (T, E) and B, C (T, N) of one chunk in fp32; padding rows give delta = 0."""
    m_te = valid[:, None] & mask_e[None, :]
    m_tn = valid[:, None] & mask_n[None, :]
    p_te = t[:, None] * s_ul + offs_e[None, :]
    p_tn = t[:, None] * s_bl + offs_n[None, :] * s_bn
    u = tl.load(u_ptr + p_te, mask=m_te, other=0.0).to(tl.float32)
    pre = tl.load(dt_ptr + p_te, mask=m_te, other=0.0).to(tl.float32) + bias[None, :]
    delta = tl.where(m_te, _softplus(pre), 0.0)
    bm = tl.load(b_ptr + p_tn, mask=m_tn, other=0.0).to(tl.float32)
    cm = tl.load(c_ptr + p_tn, mask=m_tn, other=0.0).to(tl.float32)
    return u, delta, pre, bm, cm


@triton.jit
def _row(x, rows, which):
    """x[which] of a (T, E, N) tile as (E, N)."""
    return tl.sum(tl.where((rows == which)[:, None, None], x, 0.0), axis=0)


# ------------------------------------------------------------------------------------------------ scan kernels
@triton.jit
def _scan_fwd(u_ptr, dt_ptr, b_ptr, c_ptr, z_ptr, out_ptr, a_ptr, d_ptr, bias_ptr, states_ptr, seg_ptr, segsum_ptr,
              L, E, N, B_rows, SEG_LEN, CHUNKS,
              s_ud, s_ub, s_ul, s_bd, s_bb, s_bl, s_bn, s_zb, s_zl, s_ob, s_ol,
              BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr,
              SUMMARY: tl.constexpr, HAS_INIT: tl.constexpr):
    """SUMMARY: each segment's final state from a zero start (seg_ptr) and its sum of delta (segsum_ptr).
    Otherwise: out = (y_0 + y_1) * silu(z), saving the state entering every chunk (states_ptr)."""
    pid_e, pid_s, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_seg = tl.num_programs(1)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_n = tl.arange(0, BLOCK_N)
    mask_e, mask_n = offs_e < E, offs_n < N
    m_en = mask_e[:, None] & mask_n[None, :]
    p_en = offs_e[:, None] * N + offs_n[None, :]
    rows = tl.arange(0, BLOCK_T)
    seg_lo = pid_s * SEG_LEN
    seg_hi = tl.minimum(seg_lo + SEG_LEN, L)
    for d in tl.static_range(1, -1, -1):  # right-to-left first: it leaves its y in `out` for the left-to-right pass
        A = tl.load(a_ptr + d * E * N + p_en, mask=m_en, other=0.0)
        Dv = tl.load(d_ptr + d * E + offs_e, mask=mask_e, other=0.0)
        bias = tl.load(bias_ptr + d * E + offs_e, mask=mask_e, other=0.0)
        base = d * s_ud + pid_b * s_ub
        bbase = d * s_bd + pid_b * s_bb
        seg_off = ((d * B_rows + pid_b) * n_seg + pid_s) * E * N
        if HAS_INIT:
            h = tl.load(seg_ptr + seg_off + p_en, mask=m_en, other=0.0)
        else:
            h = tl.zeros((BLOCK_E, BLOCK_N), dtype=tl.float32)
        dsum = tl.zeros((BLOCK_E,), dtype=tl.float32)
        for c in range(CHUNKS):
            t, valid = _chunk_tokens(d, seg_lo, seg_hi, c, BLOCK_T)
            u, delta, pre, bm, cm = _load_chunk(u_ptr + base, dt_ptr + base, b_ptr + bbase, c_ptr + bbase, bias,
                                                t, valid, offs_e, mask_e, offs_n, mask_n, s_ul, s_bl, s_bn)
            if not SUMMARY:
                st_off = (((d * B_rows + pid_b) * n_seg + pid_s) * CHUNKS + c) * E * N
                tl.store(states_ptr + st_off + p_en, h, mask=m_en)
            decay = tl.exp(delta[:, :, None] * A[None, :, :])
            inp = (delta * u)[:, :, None] * bm[:, None, :]
            pa, pb = tl.associative_scan((decay, inp), 0, _ssm_combine)
            hs = pb + pa * h[None, :, :]
            h = _row(hs, rows, BLOCK_T - 1)
            if SUMMARY:
                dsum += tl.sum(delta, axis=0)
            else:
                y = tl.sum(hs * cm[:, None, :], axis=2) + Dv[None, :] * u
                m_te = valid[:, None] & mask_e[None, :]
                p_out = out_ptr + pid_b * s_ob + t[:, None] * s_ol + offs_e[None, :]
                if d == 1:
                    tl.store(p_out, y.to(out_ptr.dtype.element_ty), mask=m_te)
                else:
                    other = tl.load(p_out, mask=m_te, other=0.0).to(tl.float32)
                    zv = tl.load(z_ptr + pid_b * s_zb + t[:, None] * s_zl + offs_e[None, :], mask=m_te,
                                 other=0.0).to(tl.float32)
                    res = (y + other) * zv * _sigmoid(zv)
                    tl.store(p_out, res.to(out_ptr.dtype.element_ty), mask=m_te)
        if SUMMARY:
            tl.store(seg_ptr + seg_off + p_en, h, mask=m_en)
            tl.store(segsum_ptr + ((d * B_rows + pid_b) * n_seg + pid_s) * E + offs_e, dsum, mask=mask_e)
        else:
            tl.debug_barrier()  # the right-to-left y must be visible before the other direction reads it


@triton.jit
def _scan_bwd(u_ptr, dt_ptr, b_ptr, c_ptr, z_ptr, dout_ptr, a_ptr, d_ptr, bias_ptr, states_ptr, mu_ptr,
              du_ptr, ddt_ptr, dz_ptr, db_ptr, dc_ptr, da_ptr, dd_ptr, dbias_ptr,
              L, E, N, B_rows, SEG_LEN, CHUNKS,
              s_ud, s_ub, s_ul, s_bd, s_bb, s_bl, s_bn, s_zb, s_zl, s_gb, s_gl, s_dzb, s_dzl,
              BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr,
              SUMMARY: tl.constexpr, HAS_INIT: tl.constexpr):
    """SUMMARY: each segment's outgoing adjoint a_first * lam_first from a zero carry (mu_ptr).
    Otherwise: du, d(dt) (pre-softplus), dz; dB, dC (fp32, (2, B, L, N)), dA, dD, d(bias) accumulated atomically.
    The adjoint lam_s = g_s C_s + exp(delta_{s+1} A) lam_{s+1}, with g = dout * silu(z), runs backwards over the
    chunks; mu = exp(delta A) lam of the first token of the chunk just processed is the carry."""
    pid_e, pid_s, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_seg = tl.num_programs(1)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_n = tl.arange(0, BLOCK_N)
    mask_e, mask_n = offs_e < E, offs_n < N
    m_en = mask_e[:, None] & mask_n[None, :]
    p_en = offs_e[:, None] * N + offs_n[None, :]
    rows = tl.arange(0, BLOCK_T)
    seg_lo = pid_s * SEG_LEN
    seg_hi = tl.minimum(seg_lo + SEG_LEN, L)
    for d in tl.static_range(1, -1, -1):  # right-to-left first: it leaves its part of dz for the other pass
        A = tl.load(a_ptr + d * E * N + p_en, mask=m_en, other=0.0)
        Dv = tl.load(d_ptr + d * E + offs_e, mask=mask_e, other=0.0)
        bias = tl.load(bias_ptr + d * E + offs_e, mask=mask_e, other=0.0)
        base = d * s_ud + pid_b * s_ub
        bbase = d * s_bd + pid_b * s_bb
        seg_off = ((d * B_rows + pid_b) * n_seg + pid_s) * E * N
        if HAS_INIT:
            mu = tl.load(mu_ptr + seg_off + p_en, mask=m_en, other=0.0)
        else:
            mu = tl.zeros((BLOCK_E, BLOCK_N), dtype=tl.float32)
        ga = tl.zeros((BLOCK_E, BLOCK_N), dtype=tl.float32)
        gd = tl.zeros((BLOCK_E,), dtype=tl.float32)
        gbias = tl.zeros((BLOCK_E,), dtype=tl.float32)
        for cc in range(CHUNKS):
            c = CHUNKS - 1 - cc
            t, valid = _chunk_tokens(d, seg_lo, seg_hi, c, BLOCK_T)
            m_te = valid[:, None] & mask_e[None, :]
            u, delta, pre, bm, cm = _load_chunk(u_ptr + base, dt_ptr + base, b_ptr + bbase, c_ptr + bbase, bias,
                                                t, valid, offs_e, mask_e, offs_n, mask_n, s_ul, s_bl, s_bn)
            zv = tl.load(z_ptr + pid_b * s_zb + t[:, None] * s_zl + offs_e[None, :], mask=m_te,
                         other=0.0).to(tl.float32)
            go = tl.load(dout_ptr + pid_b * s_gb + t[:, None] * s_gl + offs_e[None, :], mask=m_te,
                         other=0.0).to(tl.float32)
            sz = _sigmoid(zv)
            g = go * zv * sz
            decay = tl.exp(delta[:, :, None] * A[None, :, :])
            w = g[:, :, None] * cm[:, None, :]
            f, gg, _ = tl.associative_scan((w, tl.full(w.shape, 1.0, tl.float32), decay), 0, _adjoint_combine,
                                           reverse=True)
            lam = f + gg * mu[None, :, :]
            mu = _row(decay * lam, rows, 0)
            if not SUMMARY:
                st_off = (((d * B_rows + pid_b) * n_seg + pid_s) * CHUNKS + c) * E * N
                h0 = tl.load(states_ptr + st_off + p_en, mask=m_en, other=0.0)
                du_in = delta * u
                inp = du_in[:, :, None] * bm[:, None, :]
                pa, pb = tl.associative_scan((decay, inp), 0, _ssm_combine)
                hs = pb + pa * h0[None, :, :]
                y = tl.sum(hs * cm[:, None, :], axis=2) + Dv[None, :] * u
                dz = go * y * sz * (1.0 + zv * (1.0 - sz))
                p_dz = dz_ptr + pid_b * s_dzb + t[:, None] * s_dzl + offs_e[None, :]
                if d == 0:
                    dz += tl.load(p_dz, mask=m_te, other=0.0).to(tl.float32)
                tl.store(p_dz, dz.to(dz_ptr.dtype.element_ty), mask=m_te)
                hm = hs - inp  # = exp(delta_s A) h_{s-1}
                lam_b = tl.sum(lam * bm[:, None, :], axis=2)
                du = lam_b * delta + Dv[None, :] * g
                ddelta = lam_b * u + tl.sum(lam * hm * A[None, :, :], axis=2)
                ddt = tl.where(m_te, ddelta * _sigmoid(pre), 0.0)
                p_te = base + t[:, None] * s_ul + offs_e[None, :]
                tl.store(du_ptr + p_te, du.to(du_ptr.dtype.element_ty), mask=m_te)
                tl.store(ddt_ptr + p_te, ddt.to(ddt_ptr.dtype.element_ty), mask=m_te)
                ga += tl.sum(lam * hm * delta[:, :, None], axis=0)
                gd += tl.sum(g * u, axis=0)
                gbias += tl.sum(ddt, axis=0)
                m_tn = valid[:, None] & mask_n[None, :]
                p_tn = ((d * B_rows + pid_b) * L + t[:, None]) * N + offs_n[None, :]
                tl.atomic_add(db_ptr + p_tn, tl.sum(lam * du_in[:, :, None], axis=1), mask=m_tn)
                tl.atomic_add(dc_ptr + p_tn, tl.sum(hs * g[:, :, None], axis=1), mask=m_tn)
        if SUMMARY:
            tl.store(mu_ptr + seg_off + p_en, mu, mask=m_en)
        else:
            tl.atomic_add(da_ptr + d * E * N + p_en, ga, mask=m_en)
            tl.atomic_add(dd_ptr + d * E + offs_e, gd, mask=mask_e)
            tl.atomic_add(dbias_ptr + d * E + offs_e, gbias, mask=mask_e)
            tl.debug_barrier()  # the right-to-left part of dz must be visible before the other direction reads it


# ------------------------------------------------------------------------------------------------ conv kernels
@triton.jit
def _conv_pre(x_ptr, w_ptr, cb_ptr, direction: tl.constexpr, t, offs_e, mask_e, L, E, s_xl, K: tl.constexpr):
    """Pre-activation of direction's conv at tokens t (T, E) in fp32; direction 1 is causal in reversed order."""
    acc = tl.zeros((t.shape[0], offs_e.shape[0]), dtype=tl.float32)
    acc += tl.load(cb_ptr + direction * E + offs_e, mask=mask_e, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(K):
        if direction == 0:
            ts = t + (k - (K - 1))
        else:
            ts = t + ((K - 1) - k)
        m = ((ts >= 0) & (ts < L))[:, None] & mask_e[None, :]
        xv = tl.load(x_ptr + ts[:, None] * s_xl + offs_e[None, :], mask=m, other=0.0).to(tl.float32)
        wk = tl.load(w_ptr + (direction * E + offs_e) * K + k, mask=mask_e, other=0.0).to(tl.float32)
        acc += wk[None, :] * xv
    return acc


@triton.jit
def _conv_fwd(x_ptr, w_ptr, cb_ptr, u_ptr, L, E, s_xb, s_xl, s_ud, s_ub, s_ul,
              BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, K: tl.constexpr):
    """u[d] = silu(conv_d(x)) for both directions, one read of x."""
    pid_e, pid_t, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_e = offs_e < E
    m = (t < L)[:, None] & mask_e[None, :]
    x_ptr += pid_b * s_xb
    for d in tl.static_range(2):
        p = _conv_pre(x_ptr, w_ptr, cb_ptr, d, t, offs_e, mask_e, L, E, s_xl, K)
        u = p * _sigmoid(p)
        tl.store(u_ptr + d * s_ud + pid_b * s_ub + t[:, None] * s_ul + offs_e[None, :],
                 u.to(u_ptr.dtype.element_ty), mask=m)


@triton.jit
def _conv_bwd(x_ptr, w_ptr, cb_ptr, gu_ptr, dx_ptr, dw_ptr, dcb_ptr, L, E, s_xb, s_xl, s_ud, s_ub, s_ul,
              s_dxb, s_dxl, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, K: tl.constexpr):
    """dx = sum over directions and taps of w * dp at the tokens each x feeds, dp = du * silu'(pre) recomputed
    from x; dw, d(bias) accumulated atomically in fp32."""
    pid_e, pid_t, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_e = offs_e < E
    m = (t < L)[:, None] & mask_e[None, :]
    x_ptr += pid_b * s_xb
    dx = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for d in tl.static_range(2):
        for k in tl.static_range(K):
            # x[t] feeds direction 0's token t + (K-1-k) and direction 1's token t - (K-1-k) through tap k
            if d == 0:
                ts = t + ((K - 1) - k)
            else:
                ts = t - ((K - 1) - k)
            ms = ((ts >= 0) & (ts < L))[:, None] & mask_e[None, :]
            p = _conv_pre(x_ptr, w_ptr, cb_ptr, d, ts, offs_e, mask_e, L, E, s_xl, K)
            gu = tl.load(gu_ptr + d * s_ud + pid_b * s_ub + ts[:, None] * s_ul + offs_e[None, :], mask=ms,
                         other=0.0).to(tl.float32)
            sp = _sigmoid(p)
            dp = gu * sp * (1.0 + p * (1.0 - sp))
            wk = tl.load(w_ptr + (d * E + offs_e) * K + k, mask=mask_e, other=0.0).to(tl.float32)
            dx += wk[None, :] * dp
            if k == K - 1:  # ts == t: this tile's own dp gives the weight and bias gradients
                for j in tl.static_range(K):
                    if d == 0:
                        tx = t + (j - (K - 1))
                    else:
                        tx = t + ((K - 1) - j)
                    mx = ((tx >= 0) & (tx < L))[:, None] & mask_e[None, :]
                    xv = tl.load(x_ptr + tx[:, None] * s_xl + offs_e[None, :], mask=mx, other=0.0).to(tl.float32)
                    tl.atomic_add(dw_ptr + (d * E + offs_e) * K + j, tl.sum(dp * xv, axis=0), mask=mask_e)
                tl.atomic_add(dcb_ptr + d * E + offs_e, tl.sum(dp, axis=0), mask=mask_e)
    tl.store(dx_ptr + pid_b * s_dxb + t[:, None] * s_dxl + offs_e[None, :], dx.to(dx_ptr.dtype.element_ty), mask=m)


# ------------------------------------------------------------------------------------------------ launchers
def segment_count(batch: int, channels: int, length: int, cfg: ScanConfig) -> int:
    """How many sequence segments to scan in parallel: enough programs to fill the GPU, at least a chunk each."""
    if cfg.segments:
        return max(1, min(cfg.segments, triton.cdiv(length, cfg.block_t)))
    programs = batch * triton.cdiv(channels, cfg.block_e)
    wanted = max(1, math.ceil(cfg.target_programs / programs))
    return max(1, min(wanted, triton.cdiv(length, 4 * cfg.block_t)))


@dataclass
class _Layout:
    """Shapes and launch geometry shared by the forward and backward passes of one scan."""
    batch: int
    length: int
    channels: int
    states: int
    seg_len: int
    n_seg: int
    chunks: int
    block_n: int
    grid: tuple


def _layout(u: Tensor, A: Tensor, cfg: ScanConfig) -> _Layout:
    _, batch, length, channels = u.shape
    n_seg = segment_count(batch, channels, length, cfg)
    chunks = triton.cdiv(triton.cdiv(length, n_seg), cfg.block_t)
    seg_len = chunks * cfg.block_t
    n_seg = triton.cdiv(length, seg_len)
    return _Layout(batch, length, channels, A.shape[-1], seg_len, n_seg, chunks,
                   triton.next_power_of_2(A.shape[-1]), (triton.cdiv(channels, cfg.block_e), n_seg, batch))


def _carry(local: Tensor, decay: Tensor, direction: int, forward: bool) -> Tensor:
    """Segment carries (B, S, E, N) from per-segment local results and decays: the state (forward) or adjoint
    (backward) entering each segment. The forward state of direction 0 flows to higher segments, direction 1's to
    lower; the adjoint flows the other way."""
    n_seg = local.shape[1]
    carries = torch.zeros_like(local)
    upward = (direction == 0) == forward
    order = range(1, n_seg) if upward else range(n_seg - 2, -1, -1)
    for j in order:
        k = j - 1 if upward else j + 1
        carries[:, j] = local[:, k] + decay[:, k] * carries[:, k]
    return carries


def _segment_decays(segsum: Tensor, A: Tensor) -> Tensor:
    """exp(A * sum of delta over each segment): (2, B, S, E, N)."""
    return torch.exp(segsum[..., None] * A[:, None, None])


def _scan_strides(u: Tensor, Bm: Tensor, z: Tensor) -> tuple:
    return (u.stride(0), u.stride(1), u.stride(2), Bm.stride(0), Bm.stride(1), Bm.stride(2), Bm.stride(3),
            z.stride(0), z.stride(1))


def _check_scan_inputs(u, dt, A, Bm, Cm, D, z, bias) -> None:
    two, b, l, e = u.shape
    n = A.shape[-1]
    expected = {"u": (u, (2, b, l, e)), "delta": (dt, (2, b, l, e)), "A": (A, (2, e, n)), "B": (Bm, (2, b, l, n)),
                "C": (Cm, (2, b, l, n)), "D": (D, (2, e)), "z": (z, (b, l, e)), "delta_bias": (bias, (2, e))}
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"bidirectional_selective_scan: {name} has shape {tuple(tensor.shape)}, expected "
                             f"{shape} (u is (2, B, L, E) = {tuple(u.shape)}, A has {n} states)")
    for name, tensor in (("u", u), ("delta", dt), ("z", z), ("B", Bm), ("C", Cm)):
        if tensor.shape[-1] > 1 and name in ("u", "delta", "z") and tensor.stride(-1) != 1:
            raise ValueError(f"bidirectional_selective_scan: {name} must be contiguous in its last dimension")
    if u.stride() != dt.stride() or Bm.stride() != Cm.stride():
        raise ValueError("bidirectional_selective_scan: u and delta (and B and C) must share one memory layout")


def scan_forward(u, dt, A, Bm, Cm, D, z, bias, cfg: ScanConfig = DEFAULT_CONFIG):
    """Runs the forward kernels; returns (out (B, L, E) in u's dtype, saved states, segment sums or None)."""
    lay = _layout(u, A, cfg)
    b, l, e, n = lay.batch, lay.length, lay.channels, lay.states
    out = torch.empty(b, l, e, dtype=u.dtype, device=u.device)
    states = torch.empty(2, b, lay.n_seg * lay.chunks, e, n, dtype=torch.float32, device=u.device)
    strides = _scan_strides(u, Bm, z) + (out.stride(0), out.stride(1))
    consts = dict(BLOCK_T=cfg.block_t, BLOCK_E=cfg.block_e, BLOCK_N=lay.block_n, num_warps=cfg.num_warps)
    seg_init, segsum = states, None
    if lay.n_seg > 1:
        local = torch.empty(2, b, lay.n_seg, e, n, dtype=torch.float32, device=u.device)
        segsum = torch.empty(2, b, lay.n_seg, e, dtype=torch.float32, device=u.device)
        _scan_fwd[lay.grid](u, dt, Bm, Cm, z, out, A, D, bias, states, local, segsum, l, e, n, b, lay.seg_len,
                            lay.chunks, *strides, SUMMARY=True, HAS_INIT=False, **consts)
        decays = _segment_decays(segsum, A)
        seg_init = torch.stack([_carry(local[d], decays[d], d, forward=True) for d in range(2)]).contiguous()
    _scan_fwd[lay.grid](u, dt, Bm, Cm, z, out, A, D, bias, states, seg_init, segsum if segsum is not None else out,
                        l, e, n, b, lay.seg_len, lay.chunks, *strides, SUMMARY=False, HAS_INIT=lay.n_seg > 1,
                        **consts)
    return out, states, segsum


def scan_backward(dout, dz, u, dt, A, Bm, Cm, D, z, bias, states, segsum, cfg: ScanConfig = DEFAULT_CONFIG):
    """Runs the backward kernels, writing dz into `dz` (B, L, E) (may be a view); returns
    (du, d(dt), dB, dC (fp32), dA, dD, d(bias) (fp32))."""
    lay = _layout(u, A, cfg)
    b, l, e, n = lay.batch, lay.length, lay.channels, lay.states
    dout = dout.contiguous()
    du, ddt = torch.empty_like(u), torch.empty_like(dt)
    f32 = dict(dtype=torch.float32, device=u.device)
    dB, dC = torch.zeros(2, b, l, n, **f32), torch.zeros(2, b, l, n, **f32)
    dA, dD, dbias = torch.zeros(2, e, n, **f32), torch.zeros(2, e, **f32), torch.zeros(2, e, **f32)
    strides = _scan_strides(u, Bm, z) + (dout.stride(0), dout.stride(1), dz.stride(0), dz.stride(1))
    consts = dict(BLOCK_T=cfg.block_t, BLOCK_E=cfg.block_e, BLOCK_N=lay.block_n, num_warps=cfg.num_warps)
    mu = states
    outputs = (du, ddt, dz, dB, dC, dA, dD, dbias)
    if lay.n_seg > 1:
        local = torch.empty(2, b, lay.n_seg, e, n, **f32)
        _scan_bwd[lay.grid](u, dt, Bm, Cm, z, dout, A, D, bias, states, local, *outputs, l, e, n, b, lay.seg_len,
                            lay.chunks, *strides, SUMMARY=True, HAS_INIT=False, **consts)
        decays = _segment_decays(segsum, A)
        mu = torch.stack([_carry(local[d], decays[d], d, forward=False) for d in range(2)]).contiguous()
    _scan_bwd[lay.grid](u, dt, Bm, Cm, z, dout, A, D, bias, states, mu, *outputs, l, e, n, b, lay.seg_len,
                        lay.chunks, *strides, SUMMARY=False, HAS_INIT=lay.n_seg > 1, **consts)
    return du, ddt, dB, dC, dA, dD, dbias


class _BidirectionalScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, dt, A, Bm, Cm, D, z, bias, cfg):
        A, D, bias = A.float().contiguous(), D.float().contiguous(), bias.float().contiguous()
        out, states, segsum = scan_forward(u, dt, A, Bm, Cm, D, z, bias, cfg)
        ctx.cfg = cfg
        ctx.save_for_backward(u, dt, A, Bm, Cm, D, z, bias, states, segsum)
        return out

    @staticmethod
    def backward(ctx, dout):
        u, dt, A, Bm, Cm, D, z, bias, states, segsum = ctx.saved_tensors
        dz = torch.empty_like(z)
        du, ddt, dB, dC, dA, dD, dbias = scan_backward(dout, dz, u, dt, A, Bm, Cm, D, z, bias, states, segsum,
                                                       ctx.cfg)
        return du, ddt, dA, dB.to(Bm.dtype), dC.to(Cm.dtype), dD, dz, dbias, None


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


# ------------------------------------------------------------------------------------------------ the whole mixer
def conv_silu(x: Tensor, weight: Tensor, bias: Tensor, cfg: ScanConfig = DEFAULT_CONFIG) -> Tensor:
    """Both directions' depthwise causal conv + SiLU of x (B, L, E) (a view is fine): (2, B, L, E) in x's dtype.
    weight (2, E, K), bias (2, E)."""
    b, l, e = x.shape
    u = torch.empty(2, b, l, e, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(e, cfg.conv_block_e), triton.cdiv(l, cfg.conv_block_t), b)
    _conv_fwd[grid](x, weight, bias, u, l, e, x.stride(0), x.stride(1), u.stride(0), u.stride(1), u.stride(2),
                    BLOCK_T=cfg.conv_block_t, BLOCK_E=cfg.conv_block_e, K=weight.shape[-1])
    return u


def conv_silu_backward(x: Tensor, gu: Tensor, weight: Tensor, bias: Tensor, dx: Tensor,
                       cfg: ScanConfig = DEFAULT_CONFIG) -> tuple[Tensor, Tensor]:
    """Writes the gradient of x into dx (B, L, E) (may be a view); returns (dweight, dbias) in fp32."""
    b, l, e = x.shape
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=x.device)
    db = torch.zeros(bias.shape, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(e, cfg.conv_block_e), triton.cdiv(l, cfg.conv_block_t), b)
    _conv_bwd[grid](x, weight, bias, gu, dx, dw, db, l, e, x.stride(0), x.stride(1), gu.stride(0), gu.stride(1),
                    gu.stride(2), dx.stride(0), dx.stride(1), BLOCK_T=cfg.conv_block_t, BLOCK_E=cfg.conv_block_e,
                    K=weight.shape[-1])
    return dw, db


class _BiMambaInner(torch.autograd.Function):
    """xz (B, L, 2E) -> (y_0 + y_1) * silu(z) (B, L, E): conv, x_proj, dt_proj, both scans and the gate, with a
    hand-written backward (cuBLAS for the matmuls, Triton for the rest) that writes dx and dz into one buffer.
    Saves xz, x_proj's output and the chunk states; u and dt are recomputed in the backward pass."""

    @staticmethod
    def forward(ctx, xz, conv_w, conv_b, x_proj_w, dt_proj_w, A_log, D, dt_bias, cfg):
        u, x_dbl, dt = _inner_projections(xz, conv_w, conv_b, x_proj_w, dt_proj_w, cfg)
        b, l, e2 = xz.shape
        e, r, n = e2 // 2, dt_proj_w.shape[-1], A_log.shape[-1]
        A = -torch.exp(A_log.float())
        bc = x_dbl.view(2, b, l, -1)
        out, states, segsum = scan_forward(u, dt.view(2, b, l, e), A, bc[..., r:r + n], bc[..., r + n:],
                                           D.float().contiguous(), xz[..., e:], dt_bias.float().contiguous(), cfg)
        ctx.cfg = cfg
        ctx.save_for_backward(xz, conv_w, conv_b, x_proj_w, dt_proj_w, A_log, D, dt_bias, x_dbl, states, segsum)
        return out

    @staticmethod
    def backward(ctx, dout):
        xz, conv_w, conv_b, x_proj_w, dt_proj_w, A_log, D, dt_bias, x_dbl, states, segsum = ctx.saved_tensors
        cfg = ctx.cfg
        b, l, e2 = xz.shape
        e, r, n = e2 // 2, dt_proj_w.shape[-1], A_log.shape[-1]
        u = conv_silu(xz[..., :e], conv_w, conv_b, cfg)
        wx, wdt = x_proj_w.to(xz.dtype), dt_proj_w.to(xz.dtype)
        dt = torch.bmm(x_dbl[..., :r], wdt.transpose(1, 2))
        A = -torch.exp(A_log.float())
        bc = x_dbl.view(2, b, l, -1)
        dxz = torch.empty_like(xz)
        du_scan, ddt, dB, dC, dA, dD, dbias = scan_backward(
            dout, dxz[..., e:], u, dt.view(2, b, l, e), A, bc[..., r:r + n], bc[..., r + n:],
            D.float().contiguous(), xz[..., e:], dt_bias.float().contiguous(), states, segsum, cfg)
        ddt = ddt.view(2, b * l, e)
        dx_dbl = torch.cat([torch.bmm(ddt, wdt), dB.view(2, b * l, n).to(xz.dtype), dC.view(2, b * l, n).to(xz.dtype)],
                           dim=-1)
        d_dt_proj = torch.bmm(ddt.transpose(1, 2), x_dbl[..., :r])
        u2 = u.view(2, b * l, e)
        d_x_proj = torch.bmm(dx_dbl.transpose(1, 2), u2)
        du = torch.baddbmm(du_scan.view(2, b * l, e), dx_dbl, wx)
        d_conv_w, d_conv_b = conv_silu_backward(xz[..., :e], du.view(2, b, l, e), conv_w, conv_b, dxz[..., :e], cfg)
        return (dxz, d_conv_w.to(conv_w.dtype), d_conv_b.to(conv_b.dtype), d_x_proj.to(x_proj_w.dtype),
                d_dt_proj.to(dt_proj_w.dtype), (dA * A).to(A_log.dtype), dD.to(D.dtype), dbias.to(dt_bias.dtype), None)


def _inner_projections(xz, conv_w, conv_b, x_proj_w, dt_proj_w, cfg):
    """u (2, B, L, E), x_proj(u) (2, B*L, R+2N) and dt_proj's raw output (2, B*L, E), all in xz's dtype."""
    b, l, e2 = xz.shape
    e, r = e2 // 2, dt_proj_w.shape[-1]
    u = conv_silu(xz[..., :e], conv_w, conv_b, cfg)
    x_dbl = torch.bmm(u.view(2, b * l, e), x_proj_w.to(xz.dtype).transpose(1, 2))
    dt = torch.bmm(x_dbl[..., :r], dt_proj_w.to(xz.dtype).transpose(1, 2))
    return u, x_dbl, dt


def _stacked(first: Optional[Tensor], second: Optional[Tensor], like: Tensor) -> Tensor:
    if first is None:
        return torch.zeros(2, *like.shape, dtype=like.dtype, device=like.device)
    return torch.stack([first, second])


def bimamba_forward(mixer, hidden_states: Tensor, cfg: ScanConfig = DEFAULT_CONFIG) -> Tensor:
    """The whole bidirectional mixer forward (B, L, D) -> (B, L, D) with the official parameter names on `mixer`:
    in_proj, conv1d / conv1d_b, x_proj / x_proj_b, dt_proj / dt_proj_b, A_log / A_b_log, D / D_b, out_proj."""
    xz = F.linear(hidden_states, mixer.in_proj.weight, mixer.in_proj.bias)
    conv_w = torch.stack([mixer.conv1d.weight[:, 0], mixer.conv1d_b.weight[:, 0]])
    conv_b = _stacked(mixer.conv1d.bias, mixer.conv1d_b.bias, mixer.D)
    y = _BiMambaInner.apply(
        xz, conv_w, conv_b, torch.stack([mixer.x_proj.weight, mixer.x_proj_b.weight]),
        torch.stack([mixer.dt_proj.weight, mixer.dt_proj_b.weight]), torch.stack([mixer.A_log, mixer.A_b_log]),
        torch.stack([mixer.D, mixer.D_b]), torch.stack([mixer.dt_proj.bias, mixer.dt_proj_b.bias]), cfg)
    return F.linear(y, mixer.out_proj.weight, mixer.out_proj.bias)
