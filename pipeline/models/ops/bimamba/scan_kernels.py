"""The scan kernels: the forward (summary and output passes), the backward (state recompute and adjoint passes), the
carry chain across sequence segments and the gate that adds both directions."""
from __future__ import annotations

import triton
import triton.language as tl

from pipeline.models.ops.bimamba.primitives import (LN2, LOG2E, _bit_reverse5, _chunk_rows, _chunk_state,
                                                    _direction_params, _lane_sums, _program_geometry, _save_state,
                                                    _sigmoid, _softplus, _state_offsets, _state_values)


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
