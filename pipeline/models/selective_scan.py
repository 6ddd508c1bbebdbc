"""The selective scan of Mamba, with mamba-ssm's `selective_scan_fn` signature and two backends.

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t        (per channel d and state n)
    y_t = C_t . h_t + D * u_t ;  out_t = y_t * silu(z_t)

Shapes as mamba-ssm: u, delta, z (b, d, l); A (d, n); B, C (b, n, l); D, delta_bias (d,).

Backends: "mamba_ssm" (the stock CUDA kernel, imported lazily and only for CUDA tensors) and "torch" (this file's
chunked pure-PyTorch scan, the one for the CPU and for CUDA without mamba-ssm); "auto" picks the first that works.

How the torch scan works: the sequence is cut into chunks of CHUNK tokens (CHUNK_CUDA on CUDA; a sequence of at
most two chunks is one chunk). Inside a chunk, the per-token decays and inputs (chunk, d, n) are combined with a
Hillis-Steele doubling scan (log2(chunk) vectorised steps that multiply decays in (0, 1], so nothing overflows), the
state entering the chunk is added through the chunk's prefix decay products, and the state leaving it is carried to
the next chunk. The state is kept in fp32. Only the states at chunk boundaries are saved for the backward pass, which
recomputes each chunk and runs the adjoint (reverse) scan the same way, so memory stays O(b d n (l / chunk + chunk))
instead of O(b d n l); a sequence of at most KEEP_TOKENS keeps its states instead (no recomputation, bounded size).
No Python loop runs over tokens: the loops run over chunks and doubling steps.
"""
from __future__ import annotations

import functools
import importlib.util
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK = 32  # tokens per chunk on the CPU (cache-sized chunk tensors)
CHUNK_CUDA = 256  # on CUDA, longer chunks: fewer kernel launches, and the GPU has parallelism to spare
KEEP_TOKENS = 64  # up to this length (one chunk) forward keeps the (b, l, d, n) states for backward
SCAN_BACKENDS = ("auto", "torch", "mamba_ssm")


@functools.lru_cache(maxsize=None)
def mamba_ssm_importable() -> bool:
    """True when mamba-ssm's CUDA kernels import (checked once; only ever asked about CUDA tensors)."""
    if importlib.util.find_spec("mamba_ssm") is None or not torch.cuda.is_available():
        return False
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # noqa: F401
    except Exception:  # a wheel built for another torch/CUDA fails with ImportError, OSError or RuntimeError
        return False
    return True


def resolve_scan_backend(backend: str, device: torch.device) -> str:
    """Returns "torch" or "mamba_ssm" for `backend` on `device`; "mamba_ssm" off CUDA or not importable is an error."""
    if backend not in SCAN_BACKENDS:
        raise ValueError(f"scan backend {backend!r} is not one of {', '.join(SCAN_BACKENDS)}")
    if backend == "auto":
        return "mamba_ssm" if device.type == "cuda" and mamba_ssm_importable() else "torch"
    if backend == "mamba_ssm" and not (device.type == "cuda" and mamba_ssm_importable()):
        raise RuntimeError(f"scan backend 'mamba_ssm' needs CUDA tensors and an importable mamba-ssm "
                           f"(device {device}, importable: {device.type == 'cuda' and mamba_ssm_importable()})")
    return backend


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                   z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                   backend: str = "auto") -> Tensor:
    """Returns the scan output (b, d, l) in u's dtype; see the module docstring for the maths and shapes."""
    if resolve_scan_backend(backend, u.device) == "mamba_ssm":
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    return _ChunkedScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def selective_scan_ref(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                       z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
                       delta_softplus: bool = False) -> Tensor:
    """The naive sequential recurrence, one token at a time in fp32: the reference the backends are tested against."""
    dt = _discretised_dt(delta, delta_bias, delta_softplus)
    u32, A32, B32, C32 = u.float(), A.float(), B.float(), C.float()
    h = u32.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[-1]):
        h = torch.exp(dt[:, :, t, None] * A32) * h + (dt[:, :, t] * u32[:, :, t])[:, :, None] * B32[:, None, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C32[:, :, t]))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.float()[:, None] * u32
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(u.dtype)


# ------------------------------------------------------------------------------------------------ torch backend
def _check_shapes(u, delta, A, B, C, D, z, delta_bias) -> None:
    b, d, l = u.shape
    n = A.shape[-1]
    expected = {"delta": (delta, (b, d, l)), "A": (A, (d, n)), "B": (B, (b, n, l)), "C": (C, (b, n, l)),
                "D": (D, (d,)), "z": (z, (b, d, l)), "delta_bias": (delta_bias, (d,))}
    for name, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"selective_scan: {name} has shape {tuple(tensor.shape)}, expected {shape} "
                             f"(u is {(b, d, l)}, A has {n} states)")


def _discretised_dt(delta: Tensor, delta_bias: Optional[Tensor], softplus: bool) -> Tensor:
    dt = delta.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()[:, None]
    return F.softplus(dt) if softplus else dt


def _chunk_length(length: int, device: torch.device) -> int:
    """Tokens per chunk: CHUNK (CHUNK_CUDA on CUDA), or the whole sequence when it is at most twice that (per-op
    overhead dominates there)."""
    chunk = CHUNK_CUDA if device.type == "cuda" else CHUNK
    return length if length <= 2 * chunk else chunk


def _doubling_scan(a: Tensor, x: Tensor, reverse: bool = False, products: bool = True) -> tuple[Tensor, Tensor]:
    """Returns (prefix products of a, scan of x_t = a_t x_{t-1} + x_t with zero initial state) along dim 1, by
    log2(length) doubling steps that ping-pong between two buffers (a and x are overwritten). With `reverse` the scan
    runs from the end (x_t = a_t x_{t+1} + x_t); without `products` the returned products are not complete."""
    a_next, x_next = torch.empty_like(a), torch.empty_like(x)
    k, length = 1, x.shape[1]
    while k < length:
        if reverse:
            target, source, kept = slice(0, length - k), slice(k, length), slice(length - k, length)
        else:
            target, source, kept = slice(k, length), slice(0, length - k), slice(0, k)
        torch.addcmul(x[:, target], a[:, target], x[:, source], out=x_next[:, target])
        x_next[:, kept] = x[:, kept]
        x, x_next = x_next, x
        if products or 2 * k < length:
            torch.mul(a[:, target], a[:, source], out=a_next[:, target])
            a_next[:, kept] = a[:, kept]
            a, a_next = a_next, a
        k *= 2
    return a, x


def _chunk_terms(dt: Tensor, u: Tensor, Bc: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
    """Returns the per-token decays exp(dt A) and inputs dt u B of one chunk, each (b, k, d, n) fp32.
    dt, u: (b, k, d); Bc: (b, k, n); A: (d, n)."""
    decay = torch.exp(dt[..., None] * A)
    inputs = (dt * u)[..., None] * Bc[:, :, None, :]
    return decay, inputs


def _chunk_states(decay: Tensor, inputs: Tensor, h0: Tensor) -> Tensor:
    """Returns the states (b, k, d, n) of one chunk entered with state h0 (b, d, n); decay and inputs are consumed."""
    products, states = _doubling_scan(decay, inputs)
    return states.addcmul_(products, h0[:, None])


class _ChunkedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        with torch.autocast(u.device.type, enabled=False):
            dt = _discretised_dt(delta, delta_bias, delta_softplus).transpose(1, 2)  # (b, l, d)
            ut = u.float().transpose(1, 2)
            Bt, Ct, A32 = B.float().transpose(1, 2), C.float().transpose(1, 2), A.float()
            b, l, d = ut.shape
            h = ut.new_zeros(b, d, A.shape[1])
            y = ut.new_empty(b, l, d)
            entering = []
            chunk = _chunk_length(l, u.device)
            keep = chunk >= l and l <= KEEP_TOKENS
            for s in range(0, l, chunk):
                e = min(s + chunk, l)
                entering.append(h)
                decay, inputs = _chunk_terms(dt[:, s:e], ut[:, s:e], Bt[:, s:e], A32)
                decay_kept = decay.clone() if keep else None
                states = _chunk_states(decay, inputs, h)
                y[:, s:e] = (states * Ct[:, s:e, None, :]).sum(-1)
                h = states[:, -1].clone()
            y = y.transpose(1, 2)
            if D is not None:
                y = y + D.float()[:, None] * u.float()
            out = y * F.silu(z.float()) if z is not None else y
        # a short single chunk's decays and states are kept, so backward need not recompute them
        kept = (decay_kept, states) if keep else ()
        ctx.delta_softplus = delta_softplus
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, torch.stack(entering),
                              y if z is not None else None, *kept)
        return out.to(u.dtype)

    @staticmethod
    def backward(ctx, dout):
        u, delta, A, B, C, D, z, delta_bias, entering, y, *kept = ctx.saved_tensors
        with torch.autocast(u.device.type, enabled=False):
            grads = _chunked_scan_backward(dout.float(), u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus,
                                           entering, y, kept)
        return (*grads, None)


def _chunked_scan_backward(dout, u, delta, A, B, C, D, z, delta_bias, softplus, entering, y, kept):
    """Returns the gradients of (u, delta, A, B, C, D, z, delta_bias), recomputing each chunk from its saved
    entering state (or taking `kept` (decays, states) of a single chunk) and running the adjoint recurrence
    G_t = C_t dy_t + a_{t+1} G_{t+1} backwards over the chunks; y is the ungated output (for dz)."""
    dt = _discretised_dt(delta, delta_bias, softplus).transpose(1, 2)  # (b, l, d)
    ut = u.float().transpose(1, 2)
    Bt, Ct, A32 = B.float().transpose(1, 2), C.float().transpose(1, 2), A.float()
    b, l, d = ut.shape
    dy = dout * F.silu(z.float()) if z is not None else dout
    dyt = dy.transpose(1, 2)
    du, ddt = torch.zeros_like(ut), torch.zeros_like(ut)
    dB, dC = torch.zeros_like(Bt), torch.zeros_like(Ct)
    dA = torch.zeros_like(A32)
    carry = ut.new_zeros(b, d, A.shape[1])  # a_{t+1} G_{t+1} for the last token of the chunk being processed
    chunk = _chunk_length(l, u.device)
    for c, s in reversed(list(enumerate(range(0, l, chunk)))):
        e = min(s + chunk, l)
        dt_c, u_c, B_c, C_c, dy_c = dt[:, s:e], ut[:, s:e], Bt[:, s:e], Ct[:, s:e], dyt[:, s:e]
        if kept:
            decay, states = kept
        else:
            decay, inputs = _chunk_terms(dt_c, u_c, B_c, A32)
            states = _chunk_states(decay.clone(), inputs, entering[c])
        dC[:, s:e] = (dy_c[..., None] * states).sum(2)
        adj = dy_c[..., None] * C_c[:, :, None, :]  # (b, k, d, n): dL/dh_t from y_t
        adj[:, -1] += carry
        coeff = torch.ones_like(decay)
        coeff[:, :-1] = decay[:, 1:]
        _, adj = _doubling_scan(coeff, adj, reverse=True, products=False)
        carry = decay[:, 0] * adj[:, 0]
        d_decay = adj * decay  # dL/d(dt A) = G_t h_{t-1} exp(dt A), elementwise
        d_decay[:, 1:] *= states[:, :-1]
        d_decay[:, 0] *= entering[c]
        dA += (d_decay * dt_c[..., None]).sum((0, 1))
        g_b = (adj * B_c[:, :, None, :]).sum(-1)  # sum_n G B: (b, k, d)
        ddt[:, s:e] = g_b * u_c + (d_decay * A32).sum(-1)
        du[:, s:e] = g_b * dt_c
        dB[:, s:e] = ((dt_c * u_c)[..., None] * adj).sum(2)
    du = du.transpose(1, 2)
    ddt = ddt.transpose(1, 2)
    dD = dz = None
    if D is not None:
        du = du + dy * D.float()[:, None]
        dD = (dy * u.float()).sum((0, 2))
    if z is not None:
        sig = torch.sigmoid(z.float())
        dz = dout * y * sig * (1 + z.float() * (1 - sig))
    if softplus:
        pre = delta.float() + (delta_bias.float()[:, None] if delta_bias is not None else 0.0)
        ddt = ddt * torch.sigmoid(pre)
    d_bias = ddt.sum((0, 2)) if delta_bias is not None else None
    grads = (du, ddt, dA, dB.transpose(1, 2), dC.transpose(1, 2), dD, dz, d_bias)
    originals = (u, delta, A, B, C, D, z, delta_bias)
    return tuple(g.to(o.dtype) if g is not None else None for g, o in zip(grads, originals))
