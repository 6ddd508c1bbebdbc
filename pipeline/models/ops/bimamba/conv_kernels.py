"""The conv kernels (both directions' depthwise causal conv + SiLU, and its backward in two passes) and the
parameter packing kernel."""
from __future__ import annotations

import triton
import triton.language as tl

from pipeline.models.ops.bimamba.primitives import _sigmoid


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
