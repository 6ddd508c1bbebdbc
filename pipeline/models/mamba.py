"""The bidirectional Mamba mixer of VideoMamba ("bimamba v2"): one input projection, a forward and a backward
selective SSM with their own conv1d / x_proj / dt_proj / A / D, and one output projection.

Parameter names and shapes are the official ones (OpenGVLab/VideoMamba, mamba/mamba_ssm/modules/mamba_simple.py
with bimamba=True): in_proj, conv1d, conv1d_b, x_proj, x_proj_b, dt_proj, dt_proj_b, A_log, A_b_log, D, D_b,
out_proj. As there, the two directions are summed, not averaged: out_proj(y_forward + flip(y_backward)).

Backends of the forward pass (`backend`): "torch" (pipeline.models.selective_scan's chunked pure-PyTorch scan),
"mamba_ssm" (the stock package's fused kernels, once per direction; imported lazily, CUDA only), "triton"
(pipeline.models.ops.bimamba.bimamba_forward, the whole mixer), "auto" = choose_backend(device).
"""
from __future__ import annotations

import functools
import importlib.util
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from pipeline.models.selective_scan import mamba_ssm_importable, resolve_scan_backend, selective_scan

MIXER_BACKENDS = ("auto", "torch", "mamba_ssm", "triton")


def choose_backend(device: torch.device) -> str:
    """Returns the mixer backend that "auto" means on `device`. On CUDA: the fused Triton mixer (faster than
    mamba-ssm's kernels run once per direction, and about half their memory: bench/NOTES.md), else mamba-ssm's
    kernels when they import; elsewhere the pure-PyTorch scan."""
    if device.type != "cuda":
        return "torch"
    if _triton_importable():
        return "triton"
    return "mamba_ssm" if mamba_ssm_importable() else "torch"


@functools.lru_cache(maxsize=1)
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


class BidirectionalMamba(nn.Module):
    """Mixer (B, L, d_model) -> (B, L, d_model); the official VideoMamba `Mamba(bimamba=True)` parameters."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank="auto",
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4, conv_bias: bool = True,
                 bias: bool = False, backend: str = "auto"):
        super().__init__()
        if backend not in MIXER_BACKENDS:
            raise ValueError(f"mixer backend {backend!r} is not one of {', '.join(MIXER_BACKENDS)}")
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.backend = backend
        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        for suffix in ("", "_b"):
            setattr(self, "conv1d" + suffix, nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner,
                                                        padding=d_conv - 1, bias=conv_bias))
            setattr(self, "x_proj" + suffix, nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False))
            setattr(self, "dt_proj" + suffix, nn.Linear(self.dt_rank, self.d_inner, bias=True))
        # S4D-real initialisation, kept in fp32 as in mamba-ssm
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_b_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.D_b = nn.Parameter(torch.ones(self.d_inner))
        for p in (self.A_log, self.A_b_log, self.D, self.D_b):
            p._no_weight_decay = True
        self._init_dt(self.dt_proj, dt_min, dt_max, dt_init_floor)
        self._init_dt(self.dt_proj_b, dt_min, dt_max, dt_init_floor)

    def _init_dt(self, proj: nn.Linear, dt_min: float, dt_max: float, floor: float) -> None:
        """Mamba's dt initialisation: softplus(bias) log-uniform in [dt_min, dt_max]."""
        std = self.dt_rank ** -0.5
        nn.init.uniform_(proj.weight, -std, std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=floor)
        with torch.no_grad():
            proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def resolved_backend(self, device: torch.device) -> str:
        """The backend this mixer runs on `device`: its own, or what "auto" means there."""
        return choose_backend(device) if self.backend == "auto" else self.backend

    def forward(self, hidden_states: Tensor) -> Tensor:
        backend = self.resolved_backend(hidden_states.device)
        if backend == "triton":
            from pipeline.models.ops.bimamba import bimamba_forward
            return bimamba_forward(self, hidden_states)
        xz = self.in_proj(hidden_states).transpose(1, 2)  # (B, 2E, L)
        if backend == "mamba_ssm":
            resolve_scan_backend(backend, xz.device)  # a clear error off CUDA or without mamba-ssm
            if _causal_conv1d_importable():
                return self._fused_mamba_ssm(xz)
        y = self._direction(xz, "", backend) + self._direction(xz.flip(-1), "_b", backend).flip(-1)
        return self.out_proj(y.transpose(1, 2))

    def _direction(self, xz: Tensor, suffix: str, backend: str) -> Tensor:
        """Returns the gated SSM output (B, E, L) of one direction over xz (B, 2E, L)."""
        conv: nn.Conv1d = getattr(self, "conv1d" + suffix)
        x_proj: nn.Linear = getattr(self, "x_proj" + suffix)
        dt_proj: nn.Linear = getattr(self, "dt_proj" + suffix)
        A = -torch.exp(getattr(self, "A_log" if not suffix else "A_b_log").float())
        D = getattr(self, "D" + suffix).float()
        seqlen = xz.shape[-1]
        x, z = xz.chunk(2, dim=1)
        x = F.silu(conv(x)[..., :seqlen])
        x_dbl = x_proj(x.transpose(1, 2))  # (B, L, R + 2N)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, dt_proj.weight).transpose(1, 2)  # bias goes in as delta_bias, as in mamba-ssm
        return selective_scan(x, dt.contiguous(), A, B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(),
                              D, z=z, delta_bias=dt_proj.bias.float(), delta_softplus=True,
                              backend="mamba_ssm" if backend == "mamba_ssm" else "torch")

    def _fused_mamba_ssm(self, xz: Tensor) -> Tensor:
        """Stock mamba-ssm's fused `mamba_inner_fn` once per direction (it recomputes the conv and dt in backward);
        out_proj is linear, so out_proj(y_f) + flip(out_proj(y_b)) is the official out_proj(y_f + flip(y_b)), with
        the output bias (None by default) added once."""
        from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn

        def run(xz_dir: Tensor, suffix: str, out_bias: Optional[Tensor]) -> Tensor:
            conv: nn.Conv1d = getattr(self, "conv1d" + suffix)
            A = -torch.exp(getattr(self, "A_log" if not suffix else "A_b_log").float())
            dt_proj: nn.Linear = getattr(self, "dt_proj" + suffix)
            return mamba_inner_fn(xz_dir.contiguous(), conv.weight, conv.bias, getattr(self, "x_proj" + suffix).weight,
                                  dt_proj.weight, self.out_proj.weight, out_bias, A, None, None,
                                  getattr(self, "D" + suffix).float(), delta_bias=dt_proj.bias.float(),
                                  delta_softplus=True)

        return run(xz, "", self.out_proj.bias) + run(xz.flip(-1), "_b", None).flip(1)


@functools.lru_cache(maxsize=None)
def _causal_conv1d_importable() -> bool:
    """mamba-ssm's fused path needs the causal-conv1d package; without it (or with a build that does not load) the
    mamba_ssm backend runs the conv in PyTorch and calls selective_scan_fn once per direction."""
    if importlib.util.find_spec("causal_conv1d") is None:
        return False
    try:
        import causal_conv1d  # noqa: F401
    except Exception:  # a wheel built for another torch/CUDA fails with ImportError, OSError or RuntimeError
        return False
    return True
