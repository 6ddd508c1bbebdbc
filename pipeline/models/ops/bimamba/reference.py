"""The oracle of the fused kernels: the selective scan as a naive recurrence, token by token, and the bimamba v2
mixer in plain PyTorch with flipped copies (the official VideoMamba's way). tests/models/test_bimamba_triton.py and
the benchmarks under bench/ compare the kernels with these in fp64."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def naive_scan(u, dt, A, Bm, Cm, D, z, bias):
    """One direction, left to right, token by token: (y + D u) * silu(z), all (B, L, E) token-major."""
    delta = F.softplus(dt + bias)
    h = u.new_zeros(u.shape[0], u.shape[2], A.shape[1])
    ys = []
    for t in range(u.shape[1]):
        h = torch.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * u[:, t])[..., None] * Bm[:, t, None, :]
        ys.append((h * Cm[:, t, None, :]).sum(-1) + D * u[:, t])
    return torch.stack(ys, 1) * F.silu(z)


def naive_bidirectional_scan(u, dt, A, Bm, Cm, D, z, bias):
    """Direction 0 as is plus direction 1 run on flipped inputs and flipped back (the way mamba-ssm is used)."""
    forward = naive_scan(u[0], dt[0], A[0], Bm[0], Cm[0], D[0], z, bias[0])
    flip = lambda t: t.flip(1)  # noqa: E731
    backward = naive_scan(flip(u[1]), flip(dt[1]), A[1], flip(Bm[1]), flip(Cm[1]), D[1], flip(z), bias[1])
    return forward + flip(backward)


class TinyBiMixer(nn.Module):
    """The official bimamba v2 parameters (names and shapes) and its plain forward with flipped copies."""

    def __init__(self, d_model: int, d_state: int, expand: int = 2):
        super().__init__()
        e, self.n, self.r = expand * d_model, d_state, math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, 2 * e, bias=False)
        for suffix in ("", "_b"):
            setattr(self, "conv1d" + suffix, nn.Conv1d(e, e, 4, groups=e, bias=True, padding=3))
            setattr(self, "x_proj" + suffix, nn.Linear(e, self.r + 2 * d_state, bias=False))
            setattr(self, "dt_proj" + suffix, nn.Linear(self.r, e, bias=True))
        self.A_log = nn.Parameter(torch.log(torch.rand(e, d_state) * 4 + 0.5))
        self.A_b_log = nn.Parameter(torch.log(torch.rand(e, d_state) * 4 + 0.5))
        self.D = nn.Parameter(torch.randn(e))
        self.D_b = nn.Parameter(torch.randn(e))
        self.out_proj = nn.Linear(e, d_model, bias=False)

    def forward(self, h):
        length = h.shape[1]
        x, z = self.in_proj(h).chunk(2, dim=-1)
        total = 0
        for suffix, flip in (("", False), ("_b", True)):
            xd, zd = (x.flip(1), z.flip(1)) if flip else (x, z)
            conv = getattr(self, "conv1d" + suffix)
            u = F.silu(conv(xd.transpose(1, 2))[..., :length]).transpose(1, 2)
            x_dbl = getattr(self, "x_proj" + suffix)(u)
            dt_proj = getattr(self, "dt_proj" + suffix)
            dt = x_dbl[..., :self.r] @ dt_proj.weight.T
            A = -torch.exp(getattr(self, "A_log" if suffix == "" else "A_b_log"))
            y = naive_scan(u, dt, A, x_dbl[..., self.r:self.r + self.n], x_dbl[..., self.r + self.n:],
                           getattr(self, "D" + suffix), zd, dt_proj.bias)
            total = total + (y.flip(1) if flip else y)
        return self.out_proj(total)


def scan_inputs(b, l, e, n, r, seed, dtype):
    """Random scan inputs; B and C are strided views into one x_proj-like output, as in the mixer."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x_dbl = rnd(2, b, l, r + 2 * n)
    return dict(u=rnd(2, b, l, e).to(dtype), delta=(rnd(2, b, l, e) * 0.5 - 1).to(dtype),
                A=-(torch.rand(2, e, n, generator=g, dtype=torch.float64) * 3 + 0.2),
                B=x_dbl[..., r:r + n].to(dtype), C=x_dbl[..., r + n:].to(dtype), D=rnd(2, e),
                z=rnd(b, l, 2 * e)[..., e:].to(dtype), delta_bias=rnd(2, e) * 0.3)


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
