"""Triton helpers of the scan kernels: transcendentals and bf16 packing in inline PTX, warp shuffles, the programs'
geometry, state offsets and chunk loads."""
from __future__ import annotations

import os

import triton
import triton.language as tl

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
