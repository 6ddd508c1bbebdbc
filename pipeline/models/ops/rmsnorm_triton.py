"""The residual add and RMSNorm at the head of every VideoMamba block, fused in Triton (forward and backward).

The reference is `pipeline.models.videomamba.Block`'s PyTorch path, which this must equal:

    residual = hidden if residual is None else residual + hidden     (in the promoted dtype)
    residual = residual.float()                                       (when residual_in_fp32)
    normed   = RMSNorm(residual.to(weight.dtype))                     (computed in fp32, returned in weight's dtype)

Unfused that is about 7 kernels forward and 12 backward over (tokens, width) tensors, each a full pass over memory
and a launch; here it is one pass each way. The rounding of the norm's input to the weight's dtype (bf16 under
DeepSpeed's bf16, a no-op under autocast) is kept, its gradient passed straight through, as the cast's is.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

ROWS = 8  # rows per program (per loop step in the backward): the weight-gradient partials are summed over them
MAX_BWD_PROGRAMS = 8192  # the backward loops over rows beyond this (with 1024, VideoMamba-Ti at 64 frames, batch 4
# took 1.9 ms a step in it instead of 1.2: fewer programs keep fewer rows in flight), bounding the partials to sum


@triton.jit
def _add_rmsnorm_fwd(h_ptr, r_ptr, w_ptr, out_ptr, res_ptr, rstd_ptr, M, D, eps,
                     HAS_RESIDUAL: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per row: x = h (+ r) in fp32, written to res_ptr; out = x' rsqrt(mean(x'^2) + eps) w, x' = x rounded to w's
    dtype; the rsqrt kept for the backward pass."""
    cols = tl.arange(0, BLOCK_D)
    mask_d = cols < D
    w = tl.load(w_ptr + cols, mask=mask_d, other=0.0).to(tl.float32)
    for i in tl.static_range(ROWS):
        row = tl.program_id(0) * ROWS + i
        m = mask_d & (row < M)
        x = tl.load(h_ptr + row * D + cols, mask=m, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            x += tl.load(r_ptr + row * D + cols, mask=m, other=0.0).to(tl.float32)
        x = x.to(res_ptr.dtype.element_ty)
        tl.store(res_ptr + row * D + cols, x, mask=m)
        xn = x.to(w_ptr.dtype.element_ty).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(xn * xn, axis=0) / D + eps)
        tl.store(rstd_ptr + row, rstd, mask=row < M)
        tl.store(out_ptr + row * D + cols, (xn * rstd * w).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _add_rmsnorm_bwd(dy_ptr, dres_ptr, res_ptr, w_ptr, rstd_ptr, dx_ptr, dxh_ptr, dw_ptr, M, D,
                     HIDDEN_COPY: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per row: dx = rstd (dy w - x' rstd mean(dy w x' rstd)) + the residual stream's own gradient, in dx_ptr's
    dtype and (HIDDEN_COPY) in dxh_ptr's too; the weight gradient's partial sum over this program's rows (blocks of
    ROWS, a grid-stride loop) into column `program` of dw_ptr (D, programs): summed along its rows, the
    contiguous dimension: torch reduces it in 4.3 us at VideoMamba-Ti's 8 frames, batch 4, where the columns of
    (programs, D) took 15 us (H200)."""
    cols = tl.arange(0, BLOCK_D)
    mask_d = cols < D
    w = tl.load(w_ptr + cols, mask=mask_d, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for start in range(tl.program_id(0) * ROWS, M, tl.num_programs(0) * ROWS):
        for i in tl.static_range(ROWS):
            row = start + i
            m = mask_d & (row < M)
            xn = tl.load(res_ptr + row * D + cols, mask=m, other=0.0).to(w_ptr.dtype.element_ty).to(tl.float32)
            rstd = tl.load(rstd_ptr + row, mask=row < M, other=0.0)
            dy = tl.load(dy_ptr + row * D + cols, mask=m, other=0.0).to(tl.float32)
            xhat = xn * rstd
            dxhat = dy * w
            dx = rstd * (dxhat - xhat * (tl.sum(dxhat * xhat, axis=0) / D))
            dx += tl.load(dres_ptr + row * D + cols, mask=m, other=0.0).to(tl.float32)
            tl.store(dx_ptr + row * D + cols, dx.to(dx_ptr.dtype.element_ty), mask=m)
            if HIDDEN_COPY:
                tl.store(dxh_ptr + row * D + cols, dx.to(dxh_ptr.dtype.element_ty), mask=m)
            dw += dy * xhat
    tl.store(dw_ptr + cols * tl.num_programs(0) + tl.program_id(0), dw, mask=mask_d)  # (D, programs)


class _AddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, residual, weight, eps, residual_dtype, out_dtype):
        shape, d = hidden.shape, hidden.shape[-1]
        h = hidden.reshape(-1, d).contiguous()
        r = residual.reshape(-1, d).contiguous() if residual is not None else h
        m = h.shape[0]
        res = torch.empty(m, d, dtype=residual_dtype, device=h.device)
        out = torch.empty(m, d, dtype=out_dtype, device=h.device)
        rstd = torch.empty(m, dtype=torch.float32, device=h.device)
        _add_rmsnorm_fwd[(triton.cdiv(m, ROWS),)](h, r, weight, out, res, rstd, m, d, eps,
                                                  HAS_RESIDUAL=residual is not None, ROWS=ROWS,
                                                  BLOCK_D=triton.next_power_of_2(d))
        ctx.save_for_backward(res, weight, rstd)
        ctx.meta = (shape, hidden.dtype, None if residual is None else residual.dtype)
        return out.view(shape), res.view(shape)

    @staticmethod
    def backward(ctx, dout, dres):
        res, weight, rstd = ctx.saved_tensors
        shape, hidden_dtype, residual_dtype = ctx.meta
        m, d = res.shape
        programs = min(triton.cdiv(m, ROWS), MAX_BWD_PROGRAMS)
        # the gradient of the sum x = hidden + residual, once per dtype that needs it (residual's first)
        dx = torch.empty(m, d, dtype=residual_dtype or hidden_dtype, device=res.device)
        dxh = torch.empty(m, d, dtype=hidden_dtype, device=res.device) if dx.dtype != hidden_dtype else dx
        dw = torch.empty(d, programs, dtype=torch.float32, device=res.device)
        dy = dout.reshape(m, d).contiguous()
        dres = dres.reshape(m, d).contiguous()  # autograd hands zeros for an unused residual stream
        _add_rmsnorm_bwd[(programs,)](dy, dres, res, weight, rstd, dx, dxh, dw, m, d, HIDDEN_COPY=dxh is not dx,
                                      ROWS=ROWS, BLOCK_D=triton.next_power_of_2(d))
        d_residual = dx.view(shape) if residual_dtype is not None else None
        return dxh.view(shape), d_residual, dw.sum(1).to(weight.dtype), None, None, None


def add_rms_norm(hidden: Tensor, residual: Optional[Tensor], weight: Tensor, eps: float, residual_in_fp32: bool,
                 out_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """(RMSNorm(residual + hidden) in weight's dtype, the new residual stream): the fused form of a block's head.
    out_dtype: the normed output's dtype instead of weight's. Under autocast the block asks for the autocast dtype:
    its in_proj would cast the output to it anyway, so the values are the same and the cast's kernels, forward and
    backward, are gone."""
    dtype = hidden.dtype if residual is None else torch.promote_types(hidden.dtype, residual.dtype)
    return _AddRMSNorm.apply(hidden, residual, weight, eps, torch.float32 if residual_in_fp32 else dtype,
                             out_dtype or weight.dtype)
