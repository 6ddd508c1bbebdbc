"""Selective-scan backends: forward+backward time and peak memory of one scan against the sequence length.

    python -m bench.scan [--device cpu|cuda] [--lengths 197 785 1569 ...] [--dim 384] [--batch 2] [--dtype bf16]
                         [--quick]

On the CPU it compares this project's chunked pure-PyTorch scan with the `mambapy` package's parallel (Blelloch)
scan; on the GPU the pure-PyTorch scan with mamba-ssm's CUDA kernel. Every backend computes the same thing (the
full selective scan with softplus(dt + bias), D skip and silu(z) gate; d_state 16) on the same random inputs, and
the table also reports each backend's largest relative difference from the first one. The backends take turns
step by step (a shared machine's load then falls on all of them alike); each cell is the median of the timed
steps after warmup; peak memory (CUDA) is torch.cuda.max_memory_allocated over a backend's steps.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

from pipeline.models.selective_scan import mamba_ssm_importable, selective_scan

D_STATE = 16


def scan_inputs(batch: int, dim: int, length: int, device: str, dtype: torch.dtype) -> list[torch.Tensor]:
    """Returns (u, delta, A, B, C, D, z, delta_bias) as a Mamba block feeds them, leaves that require grad."""
    g = torch.Generator().manual_seed(0)
    shapes = {"u": (batch, dim, length), "delta": (batch, dim, length), "B": (batch, D_STATE, length),
              "C": (batch, D_STATE, length), "z": (batch, dim, length)}
    t = {k: torch.randn(*s, generator=g) for k, s in shapes.items()}
    t["delta"] = t["delta"] * 0.5 - 2.0
    A = -torch.arange(1, D_STATE + 1, dtype=torch.float32).repeat(dim, 1)
    D = torch.ones(dim)
    bias = torch.rand(dim, generator=g) - 3.0
    out = [t["u"], t["delta"], A, t["B"], t["C"], D, t["z"], bias]
    return [x.to(device=device, dtype=dtype if x.dim() == 3 else torch.float32).requires_grad_() for x in out]


def torch_backend(u, delta, A, B, C, D, z, bias):
    return selective_scan(u, delta, A, B, C, D, z, bias, delta_softplus=True, backend="torch")


def mamba_ssm_backend(u, delta, A, B, C, D, z, bias):
    return selective_scan(u, delta, A, B, C, D, z, bias, delta_softplus=True, backend="mamba_ssm")


def mambapy_backend(u, delta, A, B, C, D, z, bias):
    """The same scan written as mambapy's Mamba.selective_scan does it, around its Blelloch pscan."""
    from mambapy.pscan import pscan
    dt = F.softplus(delta.float() + bias[:, None]).transpose(1, 2)  # (b, l, d)
    x = u.float().transpose(1, 2)
    decay = torch.exp(dt.unsqueeze(-1) * A)
    inputs = (dt.unsqueeze(-1) * B.float().transpose(1, 2).unsqueeze(2)) * x.unsqueeze(-1)
    hs = pscan(decay, inputs)
    y = (hs @ C.float().transpose(1, 2).unsqueeze(-1)).squeeze(3) + D * x
    return (y.transpose(1, 2) * F.silu(z.float())).to(u.dtype)


def backends_for(device: str) -> dict[str, Callable]:
    """Returns {name: scan function} for the device, the reference first; a missing package is left out."""
    found: dict[str, Callable] = {"torch (chunked)": torch_backend}
    if device == "cuda":
        if mamba_ssm_importable():
            found["mamba_ssm"] = mamba_ssm_backend
        else:
            print("note: mamba-ssm does not import here; only the pure-PyTorch scan is measured", file=sys.stderr)
    else:
        try:
            import mambapy.pscan  # noqa: F401
            found["mambapy pscan"] = mambapy_backend
        except ImportError:
            print("note: mambapy is not installed; only the pure-PyTorch scan is measured", file=sys.stderr)
    return found


def step(fn: Callable, inputs: list[torch.Tensor], device: str) -> tuple[float, torch.Tensor]:
    """Returns (seconds of one forward+backward, the output)."""
    for x in inputs:
        x.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*inputs)
    out.float().square().sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out.detach().float()


def run(device: str, lengths: list[int], dim: int, batch: int, warmup: int, repeats: int,
        dtype: torch.dtype) -> str:
    """The backends take turns step by step, so load from other processes falls on all of them alike."""
    rows = ["| length | backend | fwd+bwd ms | tokens/s | peak MiB | max rel. diff vs first |",
            "|---:|---|---:|---:|---:|---:|"]
    backends = backends_for(device)
    for length in lengths:
        inputs = {name: scan_inputs(batch, dim, length, device, dtype) for name in backends}
        times: dict[str, list[float]] = {name: [] for name in backends}
        peaks: dict[str, float] = {name: 0.0 for name in backends}
        outputs = {}
        for i in range(warmup + repeats):
            for name, fn in backends.items():
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                seconds, outputs[name] = step(fn, inputs[name], device)
                if device == "cuda":
                    peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated() / 2**20)
                if i >= warmup:
                    times[name].append(seconds)
        reference = outputs[next(iter(backends))]
        for name in backends:
            seconds = statistics.median(times[name])
            diff = ((outputs[name] - reference).abs().max() / reference.abs().max()).item()
            peak_text = f"{peaks[name]:.0f}" if device == "cuda" else "-"
            rows.append(f"| {length} | {name} | {seconds * 1e3:.1f} | {batch * length / seconds:,.0f} | "
                        f"{peak_text} | {diff:.1e} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help="sequence lengths (default: 8/16/32/64 frames of 14x14 patches + [cls] on the GPU, "
                             "1/4/8 frames of 7x7 + [cls] on the CPU)")
    parser.add_argument("--dim", type=int, default=384, help="inner width d (VideoMamba-Ti: 2 x 192)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                        help="dtype of u, delta, B, C, z (A, D, bias stay fp32; the state is fp32 in every backend); "
                             "default bf16 on the GPU, fp32 on the CPU")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: on a shared machine, spinning OpenMP threads cost more than they "
                             "give)")
    parser.add_argument("--quick", action="store_true", help="one short length, few repeats (a smoke run)")
    args = parser.parse_args(argv)
    gpu = args.device == "cuda"
    lengths = args.lengths or ([t * 196 + 1 for t in (8, 16, 32, 64)] if gpu else [t * 49 + 1 for t in (1, 4, 8)])
    batch = args.batch or (4 if gpu else 1)
    repeats, warmup = (2, 1) if args.quick else (args.repeats, 2)
    if args.quick:
        lengths = lengths[:1]
    if not gpu:
        torch.set_num_threads(args.threads)
    dtype_name = args.dtype or ("bf16" if gpu else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    print(f"selective scan fwd+bwd, device {args.device}, batch {batch}, d {args.dim}, d_state {D_STATE}, "
          f"{dtype_name}, median of {repeats}")
    print(run(args.device, lengths, args.dim, batch, warmup, repeats, dtype))
    return 0


if __name__ == "__main__":
    sys.exit(main())
