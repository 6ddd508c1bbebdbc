"""The bidirectional Mamba mixer ("bimamba v2") with its memory-bound parts fused in Triton.

Per direction d (0: left to right, 1: right to left) and channel e, state n:

    u_d   = silu(causal depthwise conv_d(x))       (direction 1: the conv is causal in reversed order)
    delta = softplus(dt_d + bias_d),  dt_d = dt_proj_d(x_proj_d(u_d)[:R])  (matmuls stay on cuBLAS)
    h_s   = exp(delta_s A_d) h_{s-1} + delta_s B_s u_s        (s runs over the tokens in direction d's order)
    y_d   = C_s . h_s + D_d u_s
    out   = out_proj((y_0 + y_1) * silu(z))                   (no division by 2, as the official VideoMamba)

Triton kernels do everything between the matmuls:
- `_pack_direction`: each direction's 7 parameters into the stacked, cast and padded layouts the other kernels take
  (`packed_params`, one launch per direction);
- `_conv_fwd`: both directions' conv + SiLU in one pass over x; `_conv_dp`, `_conv_dx`: its backward in two passes
  (the pre-activations recomputed from x, not saved);
- `_scan_fwd`: one program per (channel block, segment, direction, batch row) runs the recurrence token by token
  with the state in registers: lanes along 32 channels (64 in the forward's passes, two a lane), the 16 states of a
  channel inside its thread, so C.h and the other sums over states need no communication. State buffers are
  state-major, (N, E), with their alignment hidden from Triton (`_state_offsets`): that is what gives this layout
  under every Triton version. Direction 1 runs by reversed indexing (no flipped copies). A chunk's
  loads are issued together and one chunk ahead (prefetch), B and C come from one contiguous [B, C] tensor as
  16-byte vector loads. It writes each direction's y; `_gate` adds them and applies SiLU(z).
- `_scan_bwd`: per chunk in reverse scan order, the chunk's states are recomputed from the state entering it
  (kept in registers as a tuple), then the adjoint runs back through them; du, d(dt) and (in direction 0's
  programs) dz are written, dB and dC are summed over a warp's 32 channels by a shuffle reduce-scatter (31 shuffles
  instead of 160 for a sum per state) and added atomically, one atomic per lane.
- The states entering every chunk are not kept from the forward pass: the backward pass recomputes them into a
  transient buffer (`_chunk_states`, in the input dtype by default; bf16 as pairs in 32-bit words, `_save_state`),
  one direction at a time, so one direction's per-chunk states never outlive its backward.

Parallelism along the sequence: when batch rows x channel blocks are too few to fill the GPU, the sequence is cut
into segments. In the forward pass a summary pass gives each segment's local final state and its sum of delta; in
the backward pass the state-recompute pass also gives each segment's local adjoint (linear in the C g terms, so it
is summed in scan order, no extra reverse pass). `_carry` chains them, and the main pass starts each segment from
its carry.

History and measurements: bench/NOTES.md (v1 used `tl.associative_scan` over chunk tiles and was 2-4x slower than
mamba-ssm).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor


@dataclass(frozen=True)
class ScanConfig:
    """Tile sizes of the kernels; `segments` = 0 lets `segment_count` choose."""
    block_t: int = 1  # tokens per chunk; the fastest fwd+bwd at both benchmark shapes on the H200 (bench/NOTES.md)
    block_e: int = 32  # channels per program, one per lane: 32 with one warp turns on the dB/dC reduce-scatter
    # the same for the forward's two passes: with 64, two channels a lane share the loads and conversions of B and
    # C (summary and output passes 10-15% faster on the H200, bench/NOTES.md)
    fwd_block_e: int = 64
    num_warps: int = 1
    keep_decay: bool = True  # the backward keeps each chunk's decays in registers instead of recomputing them
    prefetch: bool = True
    # Each scan pass's cap on registers per thread (Triton's maxnreg; 0 leaves it to ptxas), for occupancy.
    # The backward's state-recompute pass: at 128, 4 warps a scheduler. Uncapped, ptxas gives it 164 at
    # VideoMamba-Ti's training shapes (batch 4, 384 channels: 3 warps), 8-10% slower there on the H200. At other
    # shapes the cap cost 3-7% (bench/NOTES.md, v7)
    state_pass_registers: int = 128
    # the forward's summary pass: left alone, ptxas holds it at 128 registers by sinking the next token's loads to
    # the end of the loop, so it waits on memory. At 168 it issues them early: (8, 1152, 1569) 373 -> 263 us, the
    # same at VideoMamba-Ti's shapes and (1, 384, 12545) (bench/NOTES.md, v7)
    summary_pass_registers: int = 168
    # the forward's output pass: ptxas picks 127 and sinks the next token's loads below the recurrence; at 128 they
    # stay early, 2-3% faster at VideoMamba-Ti's shapes and (8, 1152, 1569) (bench/NOTES.md, v8)
    output_pass_registers: int = 128
    # the backward: ptxas gives it 255, 2 warps a scheduler. Capped at 168 (3 warps, no spills) or 128 (4 warps,
    # spills) it was 9-31% slower on the H200 (bench/NOTES.md, v8)
    backward_pass_registers: int = 0
    conv_block_t: int = 64  # the forward conv's tiles (tokens, channels) and warps
    conv_block_e: int = 64
    conv_warps: int = 4  # (1.4x faster than with 8 on the H200)
    # the conv backward's two passes: dp in tiles of (8, 64), 16 tiles a program, 2 warps; dx in (16, 128) tiles,
    # 4 warps (bench/conv.py's sweep on the H200: both passes 209 -> 186 us at VideoMamba-Ti's 64-frame shape)
    conv_dp_block_t: int = 8
    conv_dp_block_e: int = 64
    conv_dp_tiles: int = 16
    conv_dp_warps: int = 2
    conv_dx_block_t: int = 16
    conv_dx_block_e: int = 128
    conv_dx_warps: int = 4
    segments: int = 0
    target_programs: int = 4096
    carry_states: int = 2  # states per program of the serial carry chain across segments (a power of two)
    carry_group: int = 16  # segments whose loads the chain issues at once, ahead of it
    # dtype of the chunk states the backward pass recomputes and reads back: "input" (u's, bf16 under autocast:
    # half the traffic of that buffer, the largest of the backward) or "float32". The recurrences run in fp32 either
    # way; only the states entering dA, d(delta) and dC are rounded.
    saved_states: str = "input"

    def __post_init__(self):
        if self.saved_states not in ("input", "float32"):
            raise ValueError(f"ScanConfig.saved_states must be 'input' or 'float32', not {self.saved_states!r}")
        for name in ("block_e", "fwd_block_e", "carry_states"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"ScanConfig.{name} must be a power of two, not {value}")


DEFAULT_CONFIG = ScanConfig()


# ------------------------------------------------------------------------------------------------ Triton helpers
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


# Whether the kernels may use inline PTX: warp shuffles, bf16x2 packing, and transcendentals as single SFU
# instructions where fp32 accuracy allows (tl.log is a full-range logf, about 26 instructions, 1 / x a full division,
# about 10, and tl.exp adds 3 for denormal results: per (token, channel) they were about a sixth of the forward
# passes' instructions, bench/NOTES.md v7). The interpreter runs no PTX: there the same formulas run with numpy's
# exact log2 and division, and the shuffles as gathers.
INLINE_PTX = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")


@triton.jit
def _lg2(x):
    """log2(x) on the SFU: absolute error below 2^-22 on [0.5, 2], 2 ulp elsewhere."""
    if INLINE_PTX:
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:
        return tl.log2(x)


@triton.jit
def _rcp(x):
    """1 / x on the SFU, within 1 ulp."""
    if INLINE_PTX:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:
        return 1.0 / x


@triton.jit
def _softplus(x):
    """log(1 + e^x) within about 1e-6 relative. The SFU's lg2 has an absolute error, so below t = e^x = 1/16 (where
    the result is small) log1p(t) is a series instead; its first omitted term is below 2e-7 relative."""
    t = tl.exp2(x * LOG2E)
    series = t * (1.0 + t * (-0.5 + t * (0.3333333333 + t * (-0.25 + t * 0.2))))
    return tl.where(x > 20.0, x, tl.where(t < 0.0625, series, _lg2(1.0 + t) * LN2))


@triton.jit
def _sigmoid(x):
    return _rcp(1.0 + tl.exp2(-x * LOG2E))


@triton.jit
def _program_geometry(E, N, B_rows, SEG_LEN, L, D0, zero, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr):
    """Which (channel block, segment, direction, batch row) this program scans, and where its segment lies:
    `first` is the segment's first token in the direction's scan order, `step` +1 or -1, `slot` its index among
    all (direction, batch row, segment) triples; masks and offsets of its (state, channel) tiles. A launch covers
    directions D0 onwards: both (grid axis 2 of 2 x B_rows) or direction D0 alone (B_rows)."""
    pid_e, pid_s, pid_db = tl.program_id(0), tl.program_id(1), D0 * B_rows + tl.program_id(2)
    n_seg = tl.num_programs(1)
    d = pid_db // B_rows
    b = pid_db % B_rows
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_n = tl.arange(0, BLOCK_N)
    seg_lo = pid_s * SEG_LEN
    seg_n = tl.minimum(SEG_LEN, L - seg_lo)
    first = tl.where(d == 0, seg_lo, seg_lo + seg_n - 1)
    step = 1 - 2 * d
    slot = (d * B_rows + b) * n_seg + pid_s
    mask_e, mask_n = offs_e < E, offs_n < N
    m_ne = mask_n[:, None] & mask_e[None, :]
    p_ne = _state_offsets(offs_n, offs_e, E, zero)
    return d, b, offs_e, offs_n, mask_e, mask_n, m_ne, p_ne, seg_n, first, step, slot


@triton.jit
def _state_offsets(offs_n, offs_e, E, zero):
    """(state, channel) offsets into a state-major (N, E) array, the layout of A and of every state buffer here.
    `zero` (a runtime 0, never specialized) hides their alignment: Triton then sees rows of contiguous channels it
    cannot vectorize and gives these tiles the plain layout, one channel per lane and the states in registers, that
    the per-token row vectors share, so no per-token layout conversion is needed. (Given a tie in contiguity,
    Triton 3.6 put the lanes along the states instead: 1,090 instructions per token in the backward, not 680.)"""
    return offs_n[:, None] * E + offs_e[None, :] + zero


@triton.jit
def _direction_params(a_ptr, d_ptr, bias_ptr, d, E, N, offs_e, mask_e, m_ne, p_ne):
    """Direction d's A (as A log2(e), so exp(delta A) = exp2(delta A2); A is state-major, (2, N, E)), D and delta
    bias for this channel block."""
    A2 = tl.load(a_ptr + d * E * N + p_ne, mask=m_ne, other=0.0) * LOG2E
    Dv = tl.load(d_ptr + d * E + offs_e, mask=mask_e, other=0.0)
    bias = tl.load(bias_ptr + d * E + offs_e, mask=mask_e, other=0.0)
    return A2, Dv, bias


@triton.jit
def _chunk_rows(ptrs, strides, c, first, step, seg_n, offs_e, offs_n, mask_e, mask_n, s_bl, s_bn,
                BLOCK_T: tl.constexpr):
    """Issues the loads of chunk c: for every pointer in `ptrs` a tuple of BLOCK_T rows in scan order, raw (no
    conversion, so nothing waits for them here). The first len(strides) pointers are per-channel rows (E values,
    row stride strides[k]), the others rows of B or C (N values). Rows outside the segment are masked and read
    nothing."""
    rows = ()
    for k in tl.static_range(len(ptrs)):
        tile = ()
        for i in tl.static_range(BLOCK_T):
            r = c * BLOCK_T + i
            t = first + step * r
            if k < len(strides):
                tile = tile + (tl.load(ptrs[k] + t * strides[k] + offs_e, mask=mask_e & (r < seg_n) & (r >= 0),
                                       other=0.0),)
            else:
                tile = tile + (tl.load(ptrs[k] + t * s_bl + offs_n * s_bn, mask=mask_n & (r < seg_n) & (r >= 0),
                                       other=0.0),)
        rows = rows + (tile,)
    return rows


@triton.jit
def _saved_state_ptrs(states_ptr, c, CHUNKS, zero, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    """Where the state entering chunk c of this program's segment is saved: the buffer holds one (BLOCK_N, BLOCK_E)
    tile per (chunk, program) of the launch, so its rows lie at constant offsets from one address (immediate offsets
    of the per-token loads and stores, no per-state address arithmetic). `zero` hides their alignment
    (`_state_offsets`)."""
    program = tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)
    tile = (program * CHUNKS + c) * tl.num_programs(0) + tl.program_id(0)
    return (states_ptr + tile * (BLOCK_N * BLOCK_E) + tl.arange(0, BLOCK_N)[:, None] * BLOCK_E
            + tl.arange(0, BLOCK_E)[None, :] + zero)


@triton.jit
def _save_state(states_ptr, h, c, CHUNKS, zero, PAIRS: tl.constexpr):
    """Saves h (BLOCK_N, BLOCK_E) fp32 as the state entering chunk c, in the buffer's dtype. PAIRS: bf16, two
    states to a 32-bit word (states 2k, 2k + 1 in row k's low and high halves), so a lane stores BLOCK_N / 2 words,
    not BLOCK_N halves (each a store and a byte permute)."""
    BLOCK_N: tl.constexpr = h.shape[0]
    BLOCK_E: tl.constexpr = h.shape[1]
    if PAIRS:
        even, odd = tl.split(tl.permute(tl.reshape(h, (BLOCK_N // 2, 2, BLOCK_E)), (0, 2, 1)))
        tl.store(_saved_state_ptrs(states_ptr, c, CHUNKS, zero, BLOCK_N // 2, BLOCK_E),
                 _bf16x2(even, odd))
    else:
        tl.store(_saved_state_ptrs(states_ptr, c, CHUNKS, zero, BLOCK_N, BLOCK_E),
                 h.to(states_ptr.dtype.element_ty))


@triton.jit
def _bf16x2(low, high):
    """Two fp32 tensors rounded to bf16 (to nearest even) and packed into int32 words, `low` in the low halves:
    one instruction a word (Triton's own casts and shifts take three)."""
    if INLINE_PTX:
        return tl.inline_asm_elementwise("cvt.rn.bf16x2.f32 $0, $2, $1;", "=r,f,f", [low, high], dtype=tl.int32,
                                         is_pure=True, pack=1)
    else:
        low = low.to(tl.bfloat16).to(tl.uint16, bitcast=True).to(tl.uint32)
        high = high.to(tl.bfloat16).to(tl.uint16, bitcast=True).to(tl.uint32)
        return (low | (high << 16)).to(tl.int32, bitcast=True)


@triton.jit
def _chunk_state(states_ptr, c, CHUNKS, zero, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
                 PAIRS: tl.constexpr):
    """The saved state entering chunk c of this program's segment, raw and unmasked (a masked load costs an
    instruction more per state, to zero it): the buffer holds whole tiles, written whole, zeros past E and N.
    Before chunk 0 (a prefetch never used) it reads chunk 0's. `_state_values` converts it."""
    rows: tl.constexpr = BLOCK_N // 2 if PAIRS else BLOCK_N
    return tl.load(_saved_state_ptrs(states_ptr, tl.maximum(c, 0), CHUNKS, zero, rows, BLOCK_E))


@triton.jit
def _state_values(raw, PAIRS: tl.constexpr):
    """A `_chunk_state` tile as (BLOCK_N, BLOCK_E) fp32 (PAIRS: bf16 pairs, see `_save_state`, unpacked)."""
    if PAIRS:
        words = raw.to(tl.uint32, bitcast=True)
        even = (words << 16).to(tl.float32, bitcast=True)
        odd = (words & 0xFFFF0000).to(tl.float32, bitcast=True)
        return tl.reshape(tl.permute(tl.join(even, odd), (0, 2, 1)), (2 * raw.shape[0], raw.shape[1]))
    else:
        return raw.to(tl.float32)


@triton.jit
def _shfl_xor(x, lane, M: tl.constexpr, ASM: tl.constexpr):
    """x (K, 32) fp32, one channel per lane: every lane's values swapped with those of lane ^ M (a warp shuffle;
    without INLINE_PTX a gather along the channels)."""
    if INLINE_PTX:
        return tl.inline_asm_elementwise(ASM, "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.gather(x, tl.broadcast_to((lane ^ M)[None, :], x.shape), axis=1)


@triton.jit
def _halve(v, lane, M: tl.constexpr, ASM: tl.constexpr):
    """One step of a recursive-halving reduce-scatter over the lanes: of v's K values per lane, keep the odd ones
    where lane & M is set (the even ones elsewhere), add the partner lane's kept half, and return the K / 2 sums."""
    K: tl.constexpr = v.shape[0]
    E: tl.constexpr = v.shape[1]
    even, odd = tl.split(tl.permute(tl.reshape(v, (K // 2, 2, E)), (0, 2, 1)))
    bit = ((lane & M) != 0)[None, :]
    return tl.where(bit, odd, even) + _shfl_xor(tl.where(bit, even, odd), lane, M, ASM)


@triton.jit
def _lane_sums(xb, xc, lane):
    """The sums over a warp's 32 lanes of xb and xc (each (16, 32): 16 states x one channel per lane), scattered:
    lane l gets entry k = bitreverse5(l) of [sum xb, sum xc]. 31 shuffles, where a tl.sum per state needs 160."""
    N: tl.constexpr = xb.shape[0]
    E: tl.constexpr = xb.shape[1]
    v = tl.reshape(tl.permute(tl.join(xb, xc), (2, 0, 1)), (2 * N, E))
    v = _halve(v, lane, 16, "shfl.sync.bfly.b32 $0, $1, 16, 0x1f, 0xffffffff;")
    v = _halve(v, lane, 8, "shfl.sync.bfly.b32 $0, $1, 8, 0x1f, 0xffffffff;")
    v = _halve(v, lane, 4, "shfl.sync.bfly.b32 $0, $1, 4, 0x1f, 0xffffffff;")
    v = _halve(v, lane, 2, "shfl.sync.bfly.b32 $0, $1, 2, 0x1f, 0xffffffff;")
    v = _halve(v, lane, 1, "shfl.sync.bfly.b32 $0, $1, 1, 0x1f, 0xffffffff;")
    return tl.reshape(v, (E,))


@triton.jit
def _bit_reverse5(x):
    return ((x >> 4) & 1) | (((x >> 3) & 1) << 1) | (((x >> 2) & 1) << 2) | (((x >> 1) & 1) << 3) | ((x & 1) << 4)


# ------------------------------------------------------------------------------------------------ scan kernels
@triton.jit(do_not_specialize=["D0", "zero"])
def _scan_fwd(u_ptr, dt_ptr, b_ptr, c_ptr, y_ptr, a_ptr, d_ptr, bias_ptr, init_ptr, states_ptr, last_ptr,
              dsum_ptr, z_ptr, dout_ptr, L, E, N, B_rows, SEG_LEN, CHUNKS, D0, zero,
              s_ud, s_ub, s_ul, s_bd, s_bb, s_bl, s_bn, s_zb, s_zl, s_gb, s_gl,
              BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr,
              SUMMARY: tl.constexpr, HAS_INIT: tl.constexpr, Y: tl.constexpr, SAVE: tl.constexpr,
              ADJOINT: tl.constexpr, PREFETCH: tl.constexpr, PAIRS: tl.constexpr):
    """One direction's scan over one segment for a block of channels, token by token with the state (N, E) in
    registers. SUMMARY: only the segment's final state from a zero start (last_ptr) and its sum of delta (dsum_ptr).
    Otherwise, starting from init_ptr's carry when HAS_INIT: with Y, y_d = C.h + D u into y_ptr (2, B, L, E); with
    SAVE, the state entering every chunk of BLOCK_T tokens (states_ptr) for the backward pass. ADJOINT (with SAVE):
    also the backward pass's segment summary, into last_ptr: the adjoint the segment passes to the one before it in
    scan order from a zero start, sum_s P_s C_s g_s with P_s the product of the segment's decays up to token s and
    g = dout silu(z); it needs no reverse pass because it is linear in the C_s g_s. The loads of a chunk are issued
    together before its recurrence runs (with PREFETCH, one chunk ahead)."""
    d, b, offs_e, offs_n, mask_e, mask_n, m_ne, p_ne, seg_n, first, step, slot = _program_geometry(
        E, N, B_rows, SEG_LEN, L, D0, zero, BLOCK_E, BLOCK_N)
    A2, Dv, bias = _direction_params(a_ptr, d_ptr, bias_ptr, d, E, N, offs_e, mask_e, m_ne, p_ne)
    u_ptr += d * s_ud + b * s_ub
    dt_ptr += d * s_ud + b * s_ub
    y_ptr += d * s_ud + b * s_ub
    b_ptr += d * s_bd + b * s_bb
    c_ptr += d * s_bd + b * s_bb
    z_ptr += b * s_zb
    dout_ptr += b * s_gb
    if HAS_INIT:
        h = tl.load(init_ptr + slot * E * N + p_ne, mask=m_ne, other=0.0)
    else:
        h = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.float32)
    dsum = tl.zeros((BLOCK_E,), dtype=tl.float32)
    decay = tl.full((BLOCK_N, BLOCK_E), 1.0, dtype=tl.float32)  # ADJOINT: P, the product of the decays so far
    adjoint = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.float32)
    if ADJOINT:
        ptrs = (dt_ptr, u_ptr, z_ptr, dout_ptr, b_ptr, c_ptr)
        strides = (s_ul, s_ul, s_zl, s_gl)
    elif Y:
        ptrs = (dt_ptr, u_ptr, b_ptr, c_ptr)
        strides = (s_ul, s_ul)
    else:
        ptrs = (dt_ptr, u_ptr, b_ptr)
        strides = (s_ul, s_ul)
    n_rows: tl.constexpr = len(strides)
    geometry = (first, step, seg_n, offs_e, offs_n, mask_e, mask_n, s_bl, s_bn)
    if PREFETCH:
        rows = _chunk_rows(ptrs, strides, 0, *geometry, BLOCK_T)
    for c in range(CHUNKS):
        if SAVE:
            _save_state(states_ptr, h, c, CHUNKS, zero, PAIRS)  # whole tiles: h is zero past E and N
        if PREFETCH:  # the next chunk's loads fly while this chunk's recurrence runs
            cur = rows
            rows = _chunk_rows(ptrs, strides, c + 1, *geometry, BLOCK_T)
        else:
            cur = _chunk_rows(ptrs, strides, c, *geometry, BLOCK_T)
        for i in tl.static_range(BLOCK_T):
            r = c * BLOCK_T + i
            me = mask_e & (r < seg_n)
            u = cur[1][i].to(tl.float32)
            delta = tl.where(me, _softplus(cur[0][i].to(tl.float32) + bias), 0.0)
            a = tl.exp2(delta[None, :] * A2)
            h = a * h + cur[n_rows][i].to(tl.float32)[:, None] * (delta * u)[None, :]
            if SUMMARY:
                dsum += delta
            if ADJOINT:
                zv = cur[2][i].to(tl.float32)
                g = cur[3][i].to(tl.float32) * zv * _sigmoid(zv)
                decay = decay * a
                adjoint += decay * (cur[n_rows + 1][i].to(tl.float32)[:, None] * g[None, :])
            if Y:
                y = tl.sum(h * cur[n_rows + 1][i].to(tl.float32)[:, None], axis=0) + Dv * u
                tl.store(y_ptr + (first + step * r) * s_ul + offs_e, y.to(y_ptr.dtype.element_ty), mask=me)
    if SUMMARY:
        tl.store(last_ptr + slot * E * N + p_ne, h, mask=m_ne)
        tl.store(dsum_ptr + slot * E + offs_e, dsum, mask=mask_e)
    if ADJOINT:
        tl.store(last_ptr + slot * E * N + p_ne, adjoint, mask=m_ne)


@triton.jit(do_not_specialize=["D0", "zero"])
def _scan_bwd(u_ptr, dt_ptr, b_ptr, c_ptr, z_ptr, dout_ptr, ys_ptr, a_ptr, d_ptr, bias_ptr, states_ptr, mu_ptr,
              du_ptr, ddt_ptr, dz_ptr, db_ptr, dc_ptr, da_ptr, dd_ptr, dbias_ptr,
              L, E, N, B_rows, SEG_LEN, CHUNKS, D0, zero,
              s_ud, s_ub, s_ul, s_bd, s_bb, s_bl, s_bn, s_zb, s_zl, s_gb, s_gl, s_dzb, s_dzl,
              BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr,
              HAS_INIT: tl.constexpr, KEEP_DECAY: tl.constexpr, PREFETCH: tl.constexpr,
              LANE_SUMS: tl.constexpr, PAIRS: tl.constexpr):
    """The adjoint of one direction's scan over one segment, chunks in reverse scan order. Per chunk the forward
    states are recomputed from the saved entering state and kept in registers (a tuple of BLOCK_T + 1 tiles, with
    KEEP_DECAY also their decays); then the adjoint lam_s = g_s C_s + exp(delta_{s+1} A) lam_{s+1}
    (g = dout * silu(z)) runs backwards through them, starting from the segment's carry (mu_ptr) when HAS_INIT.
    Writes du, d(dt) (pre-softplus) and, in direction 0's programs, dz = dout (y_0 + y_1) silu'(z); dB, dC
    (fp32, B's layout), dA, dD and d(bias) are accumulated atomically. LANE_SUMS (16 states, one warp of 32
    channels, dC's row right after dB's) sums each token's dB and dC over the channels with one reduce-scatter."""
    d, b, offs_e, offs_n, mask_e, mask_n, m_ne, p_ne, seg_n, first, step, slot = _program_geometry(
        E, N, B_rows, SEG_LEN, L, D0, zero, BLOCK_E, BLOCK_N)
    A2, Dv, bias = _direction_params(a_ptr, d_ptr, bias_ptr, d, E, N, offs_e, mask_e, m_ne, p_ne)
    u_ptr += d * s_ud + b * s_ub
    dt_ptr += d * s_ud + b * s_ub
    du_ptr += d * s_ud + b * s_ub
    ddt_ptr += d * s_ud + b * s_ub
    b_ptr += d * s_bd + b * s_bb
    c_ptr += d * s_bd + b * s_bb
    z_ptr += b * s_zb
    dout_ptr += b * s_gb
    ys_ptr += b * s_gb
    dz_ptr += b * s_dzb
    db_ptr += d * s_bd + b * s_bb  # dB, dC share B's and C's layout
    dc_ptr += d * s_bd + b * s_bb
    if HAS_INIT:
        mu = tl.load(mu_ptr + slot * E * N + p_ne, mask=m_ne, other=0.0)
    else:
        mu = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.float32)
    ga = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.float32)
    gd = tl.zeros((BLOCK_E,), dtype=tl.float32)
    gbias = tl.zeros((BLOCK_E,), dtype=tl.float32)
    ptrs = (dt_ptr, z_ptr, dout_ptr, u_ptr, c_ptr, b_ptr)
    strides = (s_ul, s_zl, s_gl, s_ul)
    geometry = (first, step, seg_n, offs_e, offs_n, mask_e, mask_n, s_bl, s_bn)
    ys_geometry = (first, step, seg_n, offs_e, offs_n, mask_e & (d == 0), mask_n, s_bl, s_bn)  # dz: direction 0's
    if PREFETCH:
        rows = _chunk_rows(ptrs, strides, CHUNKS - 1, *geometry, BLOCK_T)
        ys_rows = _chunk_rows((ys_ptr,), (s_gl,), CHUNKS - 1, *ys_geometry, BLOCK_T)
        h_next = _chunk_state(states_ptr, CHUNKS - 1, CHUNKS, zero, BLOCK_N, BLOCK_E, PAIRS)
    for cc in range(CHUNKS):
        c = CHUNKS - 1 - cc
        if PREFETCH:  # the next (earlier) chunk's loads, its saved state included, fly while this one is processed
            cur, ys_cur, h = rows, ys_rows, h_next
            rows = _chunk_rows(ptrs, strides, c - 1, *geometry, BLOCK_T)
            ys_rows = _chunk_rows((ys_ptr,), (s_gl,), c - 1, *ys_geometry, BLOCK_T)
            h_next = _chunk_state(states_ptr, c - 1, CHUNKS, zero, BLOCK_N, BLOCK_E, PAIRS)
        else:
            cur = _chunk_rows(ptrs, strides, c, *geometry, BLOCK_T)
            ys_cur = _chunk_rows((ys_ptr,), (s_gl,), c, *ys_geometry, BLOCK_T)
            h = _chunk_state(states_ptr, c, CHUNKS, zero, BLOCK_N, BLOCK_E, PAIRS)
        us, pres, deltas, cs, gs, bs, decays, hs, zs, outs = (), (), (), (), (), (), (), (), (), ()
        for i in tl.static_range(BLOCK_T):
            me = mask_e & (c * BLOCK_T + i < seg_n)
            pre = cur[0][i].to(tl.float32) + bias
            zv = cur[1][i].to(tl.float32)
            zs = zs + (zv,)
            outs = outs + (cur[2][i].to(tl.float32),)
            gs = gs + (outs[i] * zv * _sigmoid(zv),)
            pres = pres + (pre,)
            deltas = deltas + (tl.where(me, _softplus(pre), 0.0),)
            us = us + (cur[3][i].to(tl.float32),)
            cs = cs + (cur[4][i].to(tl.float32),)
            bs = bs + (cur[5][i].to(tl.float32),)
        h = _state_values(h, PAIRS)
        hs = hs + (h,)
        for i in tl.static_range(BLOCK_T):
            a = tl.exp2(deltas[i][None, :] * A2)
            h = a * h + bs[i][:, None] * (deltas[i] * us[i])[None, :]
            if KEEP_DECAY:
                decays = decays + (a,)
            hs = hs + (h,)
        for i in tl.static_range(BLOCK_T - 1, -1, -1):
            r = c * BLOCK_T + i
            lam = mu + cs[i][:, None] * gs[i][None, :]
            t = first + step * r
            me, mn = mask_e & (r < seg_n), mask_n & (r < seg_n)
            if KEEP_DECAY:
                a = decays[i]
            else:
                a = tl.exp2(deltas[i][None, :] * A2)
            mu = a * lam
            hm = a * hs[i]  # exp(delta A) h_{s-1}
            lam_b = tl.sum(lam * bs[i][:, None], axis=0)
            du = lam_b * deltas[i] + Dv * gs[i]
            ddelta = lam_b * us[i] + tl.sum(lam * hm * A2, axis=0) * LN2
            ddt = tl.where(me, ddelta * _sigmoid(pres[i]), 0.0)
            tl.store(du_ptr + t * s_ul + offs_e, du.to(du_ptr.dtype.element_ty), mask=me)
            tl.store(ddt_ptr + t * s_ul + offs_e, ddt.to(ddt_ptr.dtype.element_ty), mask=me)
            ga += lam * hm * deltas[i][None, :]
            gd += gs[i] * us[i]
            gbias += ddt
            part_b = lam * (deltas[i] * us[i])[None, :]
            part_c = hs[i + 1] * gs[i][None, :]
            if LANE_SUMS:  # dC's row follows dB's in memory: lane l adds entry bitreverse5(l) of [dB, dC]
                lane = tl.arange(0, BLOCK_E)
                tl.atomic_add(db_ptr + t * s_bl + _bit_reverse5(lane) * s_bn,
                              _lane_sums(part_b, part_c, lane), mask=(lane >= 0) & (r < seg_n),
                              sem="relaxed")
            else:
                tl.atomic_add(db_ptr + t * s_bl + offs_n * s_bn, tl.sum(part_b, axis=1), mask=mn, sem="relaxed")
                tl.atomic_add(dc_ptr + t * s_bl + offs_n * s_bn, tl.sum(part_c, axis=1), mask=mn, sem="relaxed")
            if d == 0:
                sz = _sigmoid(zs[i])
                dz = outs[i] * ys_cur[0][i].to(tl.float32) * sz * (1.0 + zs[i] * (1.0 - sz))
                tl.store(dz_ptr + t * s_dzl + offs_e, dz.to(dz_ptr.dtype.element_ty), mask=me)
    tl.atomic_add(da_ptr + d * E * N + p_ne, ga, mask=m_ne, sem="relaxed")
    tl.atomic_add(dd_ptr + d * E + offs_e, gd, mask=mask_e, sem="relaxed")
    tl.atomic_add(dbias_ptr + d * E + offs_e, gbias, mask=mask_e, sem="relaxed")


@triton.jit
def _carry_group(local_ptr, dsum_ptr, g, pid_db, upward, N_SEG, E, N, offs_e, mask_e, m_en, p_en,
                 GROUP: tl.constexpr):
    """The local results of segments g*GROUP .. g*GROUP+GROUP-1 in carry order: a tuple of (local, dsum) loads, all
    issued at once (beyond the last segment: zeros, which leave the carry as it is)."""
    group = ()
    for i in tl.static_range(GROUP):
        k = g * GROUP + i
        slot = pid_db * N_SEG + tl.where(upward, k, N_SEG - 1 - k)
        valid = k < N_SEG
        group = group + ((tl.load(local_ptr + slot * E * N + p_en, mask=m_en & valid, other=0.0),
                          tl.load(dsum_ptr + slot * E + offs_e, mask=mask_e & valid, other=0.0)),)
    return group


@triton.jit(do_not_specialize=["D0", "zero"])
def _carry(local_ptr, dsum_ptr, a_ptr, carry_ptr, E, N, B_rows, N_SEG, D0, zero, FORWARD: tl.constexpr,
           BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr):
    """The carry entering every segment from the segments' local results: carry_next = local + exp(A dsum) carry,
    for BLOCK_N states of BLOCK_E channels (every state's chain is independent: few states a program make more
    programs, and registers for more loads in flight). Forward states flow in scan order (direction 0 to higher
    segments, direction 1 to lower), adjoints the other way. The chain is serial, so the loads run a group of GROUP
    segments ahead of it (with one load in flight per step, every step waited a memory latency: 3 ms of a
    VideoMamba-Ti step at 8192 programs). Directions D0 onwards, as in `_program_geometry`."""
    pid_e, pid_n, pid_db = tl.program_id(0), tl.program_id(1), D0 * B_rows + tl.program_id(2)
    d = pid_db // B_rows
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_e = offs_e < E
    m_en = (offs_n < N)[:, None] & mask_e[None, :]
    p_en = _state_offsets(offs_n, offs_e, E, zero)
    A2 = tl.load(a_ptr + d * E * N + p_en, mask=m_en, other=0.0) * LOG2E
    upward = (d == 0) == FORWARD
    carry = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.float32)
    where = (pid_db, upward, N_SEG, E, N, offs_e, mask_e, m_en, p_en)
    ahead = _carry_group(local_ptr, dsum_ptr, 0, *where, GROUP)
    for g in range(tl.cdiv(N_SEG, GROUP)):
        cur = ahead
        ahead = _carry_group(local_ptr, dsum_ptr, g + 1, *where, GROUP)
        for i in tl.static_range(GROUP):
            k = g * GROUP + i
            slot = pid_db * N_SEG + tl.where(upward, k, N_SEG - 1 - k)
            tl.store(carry_ptr + slot * E * N + p_en, carry, mask=m_en & (k < N_SEG))
            carry = cur[i][0] + tl.exp2(cur[i][1][None, :] * A2) * carry


@triton.jit
def _gate(y_ptr, z_ptr, out_ptr, ys_ptr, R, E, s_yd, s_zr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    """out = (y_0 + y_1) silu(z) and ys = y_0 + y_1 (saved for dz), over (B*L, E) rows."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    m = (rows < R)[:, None] & (offs_e < E)[None, :]
    p = rows[:, None] * E + offs_e[None, :]
    ys = (tl.load(y_ptr + p, mask=m, other=0.0).to(tl.float32)
          + tl.load(y_ptr + s_yd + p, mask=m, other=0.0).to(tl.float32))
    zv = tl.load(z_ptr + rows[:, None] * s_zr + offs_e[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + p, (ys * zv * _sigmoid(zv)).to(out_ptr.dtype.element_ty), mask=m)
    tl.store(ys_ptr + p, ys.to(ys_ptr.dtype.element_ty), mask=m)


# ------------------------------------------------------------------------------------------------ conv kernels
@triton.jit
def _tap_tokens(t, direction: tl.constexpr, k: tl.constexpr, K: tl.constexpr):
    """The tokens whose x tap k of direction's causal conv reads for outputs t (direction 1: causal in reversed
    order); outside [0, L) where the conv's zero padding is."""
    if direction == 0:
        return t + (k - (K - 1))
    else:
        return t + ((K - 1) - k)


@triton.jit
def _conv_pre(x_ptr, w_ptr, cb_ptr, direction: tl.constexpr, t, offs_e, mask_e, L, E, s_xl, K: tl.constexpr):
    """Pre-activation of direction's conv at tokens t (T, E) in fp32; direction 1 is causal in reversed order."""
    acc = tl.zeros((t.shape[0], offs_e.shape[0]), dtype=tl.float32)
    acc += tl.load(cb_ptr + direction * E + offs_e, mask=mask_e, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(K):
        ts = _tap_tokens(t, direction, k, K)
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
def _conv_dp(x_ptr, w_ptr, cb_ptr, gu_ptr, dp_ptr, dw_ptr, dcb_ptr, L, E, s_xb, s_xl, s_ud, s_ub, s_ul,
             BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, TILES: tl.constexpr, K: tl.constexpr):
    """dp_d = du_d * silu'(pre_d) for both directions (pre recomputed from x, once per token) into dp_ptr (du's
    layout), over TILES consecutive tiles of BLOCK_T tokens; dw and d(bias) are summed in (token, channel) tiles
    across them and added atomically (fp32) once per program, so the reductions and atomics are paid once."""
    pid_e, pid_t, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    mask_e = offs_e < E
    x_ptr += pid_b * s_xb
    for d in tl.static_range(2):
        w = ()
        sums = ()  # K dw tiles, then d(bias)'s
        for k in tl.static_range(K):
            w = w + (tl.load(w_ptr + (d * E + offs_e) * K + k, mask=mask_e, other=0.0).to(tl.float32),)
        for k in tl.static_range(K + 1):
            sums = sums + (tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32),)
        cb = tl.load(cb_ptr + d * E + offs_e, mask=mask_e, other=0.0).to(tl.float32)
        for j in range(TILES):
            t = (pid_t * TILES + j) * BLOCK_T + tl.arange(0, BLOCK_T)
            m = (t < L)[:, None] & mask_e[None, :]
            pre = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32) + cb[None, :]
            xs = ()
            for k in tl.static_range(K):
                ts = _tap_tokens(t, d, k, K)
                mk = ((ts >= 0) & (ts < L))[:, None] & mask_e[None, :]
                xv = tl.load(x_ptr + ts[:, None] * s_xl + offs_e[None, :], mask=mk, other=0.0).to(tl.float32)
                pre += w[k][None, :] * xv
                xs = xs + (xv,)
            p_gu = d * s_ud + pid_b * s_ub + t[:, None] * s_ul + offs_e[None, :]
            gu = tl.load(gu_ptr + p_gu, mask=m, other=0.0).to(tl.float32)
            sp = _sigmoid(pre)
            dp = gu * sp * (1.0 + pre * (1.0 - sp))
            tl.store(dp_ptr + p_gu, dp.to(dp_ptr.dtype.element_ty), mask=m)
            new_sums = ()
            for k in tl.static_range(K):
                new_sums = new_sums + (sums[k] + dp * xs[k],)
            sums = new_sums + (sums[K] + dp,)
        for k in tl.static_range(K):
            tl.atomic_add(dw_ptr + (d * E + offs_e) * K + k, tl.sum(sums[k], axis=0), mask=mask_e, sem="relaxed")
        tl.atomic_add(dcb_ptr + d * E + offs_e, tl.sum(sums[K], axis=0), mask=mask_e, sem="relaxed")


@triton.jit
def _conv_dx(dp_ptr, w_ptr, dx_ptr, L, E, s_ud, s_ub, s_ul, s_dxb, s_dxl,
             BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, K: tl.constexpr):
    """dx = the sum over directions and taps of w * dp at the tokens each x feeds."""
    pid_e, pid_t, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_e = offs_e < E
    dx = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for d in tl.static_range(2):
        for k in tl.static_range(K):
            # x[t] feeds direction 0's token t + (K-1-k) and direction 1's token t - (K-1-k) through tap k
            if d == 0:
                ts = t + ((K - 1) - k)
            else:
                ts = t - ((K - 1) - k)
            ms = ((ts >= 0) & (ts < L))[:, None] & mask_e[None, :]
            dp = tl.load(dp_ptr + d * s_ud + pid_b * s_ub + ts[:, None] * s_ul + offs_e[None, :], mask=ms,
                         other=0.0).to(tl.float32)
            dx += tl.load(w_ptr + (d * E + offs_e) * K + k, mask=mask_e, other=0.0).to(tl.float32)[None, :] * dp
    m = (t < L)[:, None] & mask_e[None, :]
    tl.store(dx_ptr + pid_b * s_dxb + t[:, None] * s_dxl + offs_e[None, :], dx.to(dx_ptr.dtype.element_ty), mask=m)


@triton.jit
def _pack_direction(conv_w_ptr, conv_b_ptr, xw_ptr, dtw_ptr, alog_ptr, dd_ptr, bias_ptr,
                    conv_w_out, conv_b_out, wx_out, wdt_out, a_out, d_out, bias_out, d, E, K, R, RP, N,
                    HAS_CONV_BIAS: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_ROWS: tl.constexpr, BLOCK_RP: tl.constexpr, BLOCK_N: tl.constexpr):
    """One direction's parameters, for a block of channels, into slot d of the kernels' stacked layouts (see
    `packed_params`): the conv weight (E, 1, K) -> (E, K); x_proj (R + 2N, E) -> (RP + 2N, E) with zero rows R..RP;
    dt_proj (E, R) -> (E, RP) with zero columns; A = -exp(A_log) (E, N) -> state-major (N, E) fp32; conv bias
    (zeros without one), D, dt bias (E,). Each store converts to its output's dtype."""
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    me = e < E
    k = tl.arange(0, BLOCK_K)
    m = me[:, None] & (k < K)[None, :]
    tl.store(conv_w_out + d * E * K + e[:, None] * K + k[None, :],
             tl.load(conv_w_ptr + e[:, None] * K + k[None, :], mask=m).to(conv_w_out.dtype.element_ty), mask=m)
    if HAS_CONV_BIAS:
        conv_b = tl.load(conv_b_ptr + e, mask=me).to(tl.float32)
    else:
        conv_b = tl.zeros((BLOCK_E,), dtype=tl.float32)
    tl.store(conv_b_out + d * E + e, conv_b.to(conv_b_out.dtype.element_ty), mask=me)
    rows = tl.arange(0, BLOCK_ROWS)  # x_proj's output rows: [dt (R), zeros (RP - R), B, C (2N)]
    src = tl.where(rows < R, rows, rows - (RP - R))
    valid = (rows < R) | ((rows >= RP) & (rows < RP + 2 * N))
    xw = tl.load(xw_ptr + src[:, None] * E + e[None, :], mask=valid[:, None] & me[None, :], other=0.0)
    tl.store(wx_out + d * (RP + 2 * N) * E + rows[:, None] * E + e[None, :], xw.to(wx_out.dtype.element_ty),
             mask=(rows < RP + 2 * N)[:, None] & me[None, :])
    cols = tl.arange(0, BLOCK_RP)
    dtw = tl.load(dtw_ptr + e[:, None] * R + cols[None, :], mask=me[:, None] & (cols < R)[None, :], other=0.0)
    tl.store(wdt_out + d * E * RP + e[:, None] * RP + cols[None, :], dtw.to(wdt_out.dtype.element_ty),
             mask=me[:, None] & (cols < RP)[None, :])
    n = tl.arange(0, BLOCK_N)
    mn = (n < N)[:, None] & me[None, :]
    alog = tl.load(alog_ptr + e[None, :] * N + n[:, None], mask=mn, other=0.0).to(tl.float32)
    tl.store(a_out + d * N * E + n[:, None] * E + e[None, :], -tl.exp(alog), mask=mn)
    tl.store(d_out + d * E + e, tl.load(dd_ptr + e, mask=me).to(tl.float32), mask=me)
    tl.store(bias_out + d * E + e, tl.load(bias_ptr + e, mask=me).to(tl.float32), mask=me)


# ------------------------------------------------------------------------------------------------ launchers
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


# ------------------------------------------------------------------------------------------------ the whole mixer
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


def packed_params(pairs, xz: Tensor) -> tuple[Tensor, ...]:
    """The two directions' parameters (`_direction_pairs`) in the layouts the kernels take, two launches of
    `_pack_direction` in place of about 14 stacks, casts and pads: conv weight (2, E, K) and bias (2, E) (zeros
    without one) in the weight's dtype; x_proj (2, RP + 2N, E) and dt_proj (2, E, RP) in xz's dtype, padded with
    zeros from R up to RP, a multiple of 16 (x_proj's output [dt, 0, B, C] times the padded dt_proj weight is
    dt_proj(dt)); A = -exp(A_log) state-major (2, N, E), D and the dt bias (2, E), all three fp32."""
    conv_w, x_proj_w, dt_proj_w, A_log = pairs[0], pairs[4], pairs[6], pairs[8]
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
