"""The launchers of the kernels: launch geometry, the scan's forward and backward passes, the conv and its backward,
the packing of both directions' parameters."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
from torch import Tensor

from pipeline.models.ops.bimamba.config import DEFAULT_CONFIG, ScanConfig
from pipeline.models.ops.bimamba.conv_kernels import _conv_dp, _conv_dx, _conv_fwd, _pack_direction
from pipeline.models.ops.bimamba.scan_kernels import _carry, _gate, _scan_bwd, _scan_fwd


def segment_count(batch: int, channels: int, length: int, cfg: ScanConfig) -> int:
    """How many sequence segments to scan in parallel: enough programs to fill the GPU, at least four chunks each."""
    if cfg.segments:
        return max(1, min(cfg.segments, triton.cdiv(length, cfg.block_t)))
    programs = 2 * batch * triton.cdiv(channels, cfg.block_e)
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
    fwd_grid: tuple


def _layout(u: Tensor, A: Tensor, cfg: ScanConfig) -> _Layout:
    _, batch, length, channels = u.shape
    n_seg = segment_count(batch, channels, length, cfg)
    chunks = triton.cdiv(triton.cdiv(length, n_seg), cfg.block_t)
    seg_len = chunks * cfg.block_t
    n_seg = triton.cdiv(length, seg_len)
    e_blocks = triton.cdiv(channels, cfg.block_e)
    return _Layout(batch, length, channels, A.shape[1], seg_len, n_seg, chunks, triton.next_power_of_2(A.shape[1]),
                   (e_blocks, n_seg, 2 * batch), (triton.cdiv(channels, cfg.fwd_block_e), n_seg, 2 * batch))


def _carries(local: Tensor, dsum: Tensor, A: Tensor, lay: _Layout, cfg: ScanConfig, forward: bool,
             direction: Optional[int] = None) -> Tensor:
    """The carry entering every segment (2, B, segments, N, E), of both directions or of `direction` only (the
    other's left unwritten)."""
    carry = torch.empty_like(local)
    block_n = min(cfg.carry_states, lay.block_n)
    grid = (triton.cdiv(lay.channels, cfg.block_e), triton.cdiv(lay.states, block_n),
            2 * lay.batch if direction is None else lay.batch)
    _carry[grid](local, dsum, A, carry, lay.channels, lay.states, lay.batch, lay.n_seg, direction or 0, 0,
                 FORWARD=forward, BLOCK_E=cfg.block_e, BLOCK_N=block_n, GROUP=cfg.carry_group, num_warps=1)
    return carry


SCAN_PASSES = ("summary", "output", "state", "backward")


def pass_constants(name: str, lay: _Layout, cfg: ScanConfig, pairs: bool = False, lane_sums: bool = False) -> dict:
    """The compile-time arguments and launch options of one scan pass (one of SCAN_PASSES: the forward's summary and
    output passes, the backward's state-recompute pass and its main pass), as the launchers below pass them and
    `sm90.compile_pass` compiles them. pairs: chunk states saved as bf16 pairs (`_state_pairs`); lane_sums: dB and
    dC by the reduce-scatter (16 states, one warp of 32 channels, B and C contiguous)."""
    if name not in SCAN_PASSES:
        raise ValueError(f"unknown scan pass {name!r}: one of {SCAN_PASSES}")
    segmented = lay.n_seg > 1
    consts = dict(BLOCK_T=cfg.block_t, BLOCK_N=lay.block_n, PREFETCH=cfg.prefetch, num_warps=cfg.num_warps,
                  HAS_INIT=segmented and name != "summary", PAIRS=pairs and name in ("state", "backward"))
    cap = getattr(cfg, f"{name}_pass_registers")
    if cap:
        consts["maxnreg"] = cap
    if name == "backward":
        return dict(consts, BLOCK_E=cfg.block_e, KEEP_DECAY=cfg.keep_decay, LANE_SUMS=lane_sums)
    return dict(consts, BLOCK_E=cfg.block_e if name == "state" else cfg.fwd_block_e, SUMMARY=name == "summary",
                Y=name == "output", SAVE=name == "state", ADJOINT=name == "state" and segmented)


def _scan_strides(u: Tensor, bc: Tensor) -> tuple:
    return u.stride(0), u.stride(1), u.stride(2), bc.stride(0), bc.stride(1), bc.stride(2), bc.stride(3)


def _b_and_c(bc: Tensor) -> tuple[Tensor, Tensor]:
    """B and C as views of one [B, C] tensor (2, B, L, 2N) whose last dimension is contiguous: with its rows on
    16-byte boundaries (a contiguous tensor, or the mixer's padded x_proj output) Triton loads each token's B and C
    with 16-byte vector loads."""
    n = bc.shape[-1] // 2
    return bc[..., :n], bc[..., n:]


def _check_scan_inputs(u, dt, A, Bm, Cm, D, z, bias) -> None:
    two, b, l, e = u.shape
    n = A.shape[-1]
    expected = {"u": (u, (2, b, l, e)), "delta": (dt, (2, b, l, e)), "A": (A, (2, e, n)), "B": (Bm, (2, b, l, n)),
                "C": (Cm, (2, b, l, n)), "D": (D, (2, e)), "z": (z, (b, l, e)), "delta_bias": (bias, (2, e))}
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"bidirectional_selective_scan: {name} has shape {tuple(tensor.shape)}, expected "
                             f"{shape} (u is (2, B, L, E) = {tuple(u.shape)}, A has {n} states)")
    if z.stride(-1) != 1 or z.stride(0) != l * z.stride(1):
        raise ValueError("bidirectional_selective_scan: z must be contiguous in its last dimension, its rows evenly "
                         "spaced (a slice of the last dimension of a contiguous tensor is fine)")


def scan_forward(u, dt, A, bc, D, z, bias, cfg: ScanConfig = DEFAULT_CONFIG):
    """Runs the forward kernels on contiguous u, dt (2, B, L, E), bc = [B, C] (2, B, L, 2N) (its last dimension
    contiguous, see `_b_and_c`) and A state-major, (2, N, E) contiguous fp32; returns out (B, L, E) in u's dtype and
    what the backward pass needs: (the state entering every segment or None, segment sums of delta or None,
    y_0 + y_1)."""
    lay = _layout(u, A, cfg)
    b, l, e, n = lay.batch, lay.length, lay.channels, lay.states
    f32 = dict(dtype=torch.float32, device=u.device)
    y = torch.empty_like(u)
    args = (l, e, n, b, lay.seg_len, lay.chunks, 0, 0, *_scan_strides(u, bc), z.stride(0), z.stride(1), 0, 0)
    Bm, Cm = _b_and_c(bc)
    init, dsum = None, None
    if lay.n_seg > 1:
        local = torch.empty(2, b, lay.n_seg, n, e, **f32)
        dsum = torch.empty(2, b, lay.n_seg, e, **f32)
        _scan_fwd[lay.fwd_grid](u, dt, Bm, Cm, y, A, D, bias, y, y, local, dsum, z, z, *args,
                                **pass_constants("summary", lay, cfg))
        init = _carries(local, dsum, A, lay, cfg, forward=True)
    _scan_fwd[lay.fwd_grid](u, dt, Bm, Cm, y, A, D, bias, y if init is None else init, y, y, y, z, z, *args,
                            **pass_constants("output", lay, cfg))
    out = torch.empty(b, l, e, dtype=u.dtype, device=u.device)
    ys = torch.empty_like(out)
    _gate[(triton.cdiv(b * l, 64), triton.cdiv(e, 64))](y, z, out, ys, b * l, e, y.stride(0), z.stride(1),
                                                        BLOCK_R=64, BLOCK_E=64)
    return out, (init, dsum, ys)


def _chunk_states(u, dt, A, bc, D, bias, z, dout, init, direction: int, lay: _Layout, cfg: ScanConfig):
    """The state entering every chunk of one direction (B, chunks, channel blocks, N, block_e: one tile per chunk
    and program, `_saved_state_ptrs`), recomputed from the segment carries: a transient buffer of the backward
    pass, so that no per-chunk state outlives one direction's backward. At 16 states a channel and token it is the
    backward's largest buffer; one direction at a time halves its share of the peak (bench/NOTES.md v9). With several
    segments the same pass gives each segment's local adjoint for `_carries` ((2, B, segments, N, E), this
    direction's half written), else None."""
    b, l, e, n = lay.batch, lay.length, lay.channels, lay.states
    dtype = u.dtype if cfg.saved_states == "input" else torch.float32
    pairs = _state_pairs(dtype, lay)
    states = torch.empty(b, lay.n_seg * lay.chunks, lay.grid[0], lay.block_n // 2 if pairs else lay.block_n,
                         cfg.block_e, dtype=torch.int32 if pairs else dtype, device=u.device)
    local = torch.empty(2, b, lay.n_seg, n, e, dtype=torch.float32, device=u.device) if lay.n_seg > 1 else None
    Bm, Cm = _b_and_c(bc)
    _scan_fwd[_direction_grid(lay)](u, dt, Bm, Cm, u, A, D, bias, u if init is None else init, states,
                                    states if local is None else local, u, z, dout, l, e, n, b, lay.seg_len,
                                    lay.chunks, direction, 0, *_scan_strides(u, bc), z.stride(0), z.stride(1),
                                    dout.stride(0), dout.stride(1), **pass_constants("state", lay, cfg, pairs=pairs))
    return states, local


def _direction_grid(lay: _Layout) -> tuple:
    """The backward passes' grid for one direction: lay.grid without the other direction's programs."""
    return lay.grid[:2] + (lay.batch,)


def _reduce_scatter_sums(bc: Tensor, lay: _Layout, cfg: ScanConfig) -> bool:
    """Whether the backward sums dB and dC over a warp's channels by the reduce-scatter (`_lane_sums`)."""
    return lay.states == 16 and cfg.block_e == 32 and cfg.num_warps == 1 and bc.stride(-1) == 1


def _state_pairs(dtype: torch.dtype, lay: _Layout) -> bool:
    """Whether the chunk states are saved as bf16 pairs in 32-bit words (`_save_state`)."""
    return dtype == torch.bfloat16 and lay.block_n % 2 == 0


def scan_backward(dout, dz, u, dt, A, bc, D, z, bias, saved, cfg: ScanConfig = DEFAULT_CONFIG,
                  dbc: Optional[Tensor] = None):
    """Runs the backward kernels, writing dz into `dz` (B, L, E) (may be a view); returns
    (du, d(dt), d[B, C] (fp32, like bc), dA (state-major, like A), dD, d(bias) (fp32)). d[B, C] is summed into
    `dbc` when given (an fp32 tensor of zeros with bc's strides), else into a new one."""
    init, dsum, ys = saved
    lay = _layout(u, A, cfg)
    b, l, e, n = lay.batch, lay.length, lay.channels, lay.states
    dout = dout.contiguous()
    du, ddt = torch.empty_like(u), torch.empty_like(dt)
    f32 = dict(dtype=torch.float32, device=u.device)
    if dbc is None:
        dbc = torch.zeros(bc.shape, **f32)
    if dbc.stride() != bc.stride():
        raise ValueError(f"scan_backward: dbc's strides {dbc.stride()} differ from bc's {bc.stride()}")
    Bm, Cm = _b_and_c(bc)
    dA, dD, dbias = torch.zeros(2, n, e, **f32), torch.zeros(2, e, **f32), torch.zeros(2, e, **f32)
    outputs = (du, ddt, dz, *_b_and_c(dbc), dA, dD, dbias)
    lane_sums = _reduce_scatter_sums(bc, lay, cfg)
    for direction in (0, 1):  # one after the other: the transient chunk states of one direction at a time
        states, local = _chunk_states(u, dt, A, bc, D, bias, z, dout, init, direction, lay, cfg)
        mu = states if local is None else _carries(local, dsum, A, lay, cfg, forward=False, direction=direction)
        _scan_bwd[_direction_grid(lay)](u, dt, Bm, Cm, z, dout, ys, A, D, bias, states, mu, *outputs, l, e, n, b,
                                        lay.seg_len, lay.chunks, direction, 0, *_scan_strides(u, bc), z.stride(0),
                                        z.stride(1), dout.stride(0), dout.stride(1), dz.stride(0), dz.stride(1),
                                        **pass_constants("backward", lay, cfg, pairs=states.dtype == torch.int32,
                                                         lane_sums=lane_sums))
        del states, local, mu  # freed before the next direction's are allocated
    return du, ddt, dbc, dA, dD, dbias


def conv_silu(x: Tensor, weight: Tensor, bias: Tensor, cfg: ScanConfig = DEFAULT_CONFIG) -> Tensor:
    """Both directions' depthwise causal conv + SiLU of x (B, L, E) (a view is fine): (2, B, L, E) in x's dtype.
    weight (2, E, K), bias (2, E)."""
    b, l, e = x.shape
    u = torch.empty(2, b, l, e, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(e, cfg.conv_block_e), triton.cdiv(l, cfg.conv_block_t), b)
    _conv_fwd[grid](x, weight, bias, u, l, e, x.stride(0), x.stride(1), u.stride(0), u.stride(1), u.stride(2),
                    BLOCK_T=cfg.conv_block_t, BLOCK_E=cfg.conv_block_e, K=weight.shape[-1],
                    num_warps=cfg.conv_warps)
    return u


def conv_silu_backward(x: Tensor, gu: Tensor, weight: Tensor, bias: Tensor, dx: Tensor,
                       cfg: ScanConfig = DEFAULT_CONFIG) -> tuple[Tensor, Tensor]:
    """Writes the gradient of x into dx (B, L, E) (may be a view); returns (dweight, dbias) in fp32. Two passes:
    dp = du * silu'(pre) with the weight gradients, then dx from dp's shifted tiles (one kernel that recomputed the
    pre-activations at every tap's shift spilled and took 14x its memory time, bench/NOTES.md)."""
    b, l, e = x.shape
    gu = gu.contiguous()
    dp = torch.empty_like(gu)
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=x.device)
    db = torch.zeros(bias.shape, dtype=torch.float32, device=x.device)
    dp_grid = (triton.cdiv(e, cfg.conv_dp_block_e), triton.cdiv(l, cfg.conv_dp_block_t * cfg.conv_dp_tiles), b)
    _conv_dp[dp_grid](x, weight, bias, gu, dp, dw, db, l, e, x.stride(0), x.stride(1), gu.stride(0), gu.stride(1),
                      gu.stride(2), BLOCK_T=cfg.conv_dp_block_t, BLOCK_E=cfg.conv_dp_block_e, TILES=cfg.conv_dp_tiles,
                      K=weight.shape[-1], num_warps=cfg.conv_dp_warps)
    grid = (triton.cdiv(e, cfg.conv_dx_block_e), triton.cdiv(l, cfg.conv_dx_block_t), b)
    _conv_dx[grid](dp, weight, dx, l, e, dp.stride(0), dp.stride(1), dp.stride(2), dx.stride(0), dx.stride(1),
                   BLOCK_T=cfg.conv_dx_block_t, BLOCK_E=cfg.conv_dx_block_e, K=weight.shape[-1],
                   num_warps=cfg.conv_dx_warps)
    return dw, db


def packed_params(pairs, xz: Tensor) -> tuple[Tensor, ...]:
    """The two directions' parameters (`_direction_pairs`) in the layouts the kernels take, two launches of
    `_pack_direction` in place of about 14 stacks, casts and pads: conv weight (2, E, K) and bias (2, E) (zeros
    without one) in the weight's dtype; x_proj (2, RP + 2N, E) and dt_proj (2, E, RP) in xz's dtype, padded with
    zeros from R up to RP, a multiple of 16 (x_proj's output [dt, 0, B, C] times the padded dt_proj weight is
    dt_proj(dt)); A = -exp(A_log) state-major (2, N, E), D and the dt bias (2, E), all three fp32."""
    conv_w, dt_proj_w, A_log = pairs[0], pairs[6], pairs[8]
    e, k = conv_w.shape[0], conv_w.shape[-1]
    r, n = dt_proj_w.shape[-1], A_log.shape[-1]
    rp = r + (-r % 16)
    new = dict(device=xz.device)
    out = (torch.empty(2, e, k, dtype=conv_w.dtype, **new), torch.empty(2, e, dtype=conv_w.dtype, **new),
           torch.empty(2, rp + 2 * n, e, dtype=xz.dtype, **new), torch.empty(2, e, rp, dtype=xz.dtype, **new),
           torch.empty(2, n, e, dtype=torch.float32, **new), torch.empty(2, e, dtype=torch.float32, **new),
           torch.empty(2, e, dtype=torch.float32, **new))
    block_e = 32
    for d in (0, 1):
        sources = [p.contiguous() if p is not None else None for p in pairs[d::2]]
        has_conv_bias = sources[1] is not None
        sources[1] = sources[1] if has_conv_bias else sources[0]  # a placeholder pointer, never read
        _pack_direction[(triton.cdiv(e, block_e),)](
            *sources, *out, d, e, k, r, rp, n, HAS_CONV_BIAS=has_conv_bias, BLOCK_E=block_e,
            BLOCK_K=triton.next_power_of_2(k), BLOCK_ROWS=triton.next_power_of_2(rp + 2 * n),
            BLOCK_RP=triton.next_power_of_2(rp), BLOCK_N=triton.next_power_of_2(n), num_warps=1)
    return out
