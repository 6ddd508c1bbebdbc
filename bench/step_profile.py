"""Where a backbone's forward+backward step spends its time: the GPU kernels ranked by total time, the GPU's busy
time against the step's wall time (the gap is launch and host overhead), for VideoMamba (any mixer backend) or the
space-time SDPA ViT of bench/backbone.py; with --host also the Python functions of the host side (cProfile).

    python -m bench.step_profile [--model videomamba|vit] [--size tiny] [--frames 64] [--batch 4] [--backend triton]
                            [--steps 3] [--top 25] [--trace trace.json] [--host] [--cuda-graphs] [--quick]

bf16 autocast on CUDA (fp32 on the CPU); the loss and step are bench/backbone.py's. Kernels are grouped by name, so
a Triton kernel's specializations (e.g. the scan's summary and main passes) share one row.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from contextlib import nullcontext
from typing import Callable

import torch

from bench.backbone import SpaceTimeViT, blocks_of
from pipeline.engine.graphs import graph_chain
from pipeline.models import build_videomamba
from pipeline.models.videomamba import SIZES


def build(model: str, size: str, frames: int, img_size: int, backend: str) -> tuple[torch.nn.Module, Callable]:
    """Returns (module, its features function)."""
    if model == "vit":
        depth, width = SIZES[size]
        vit = SpaceTimeViT(depth, width, frames, img_size)
        return vit, vit
    vm = build_videomamba(size, num_frames=frames, img_size=img_size, scan_backend=backend)
    return vm, lambda x: vm.forward_features(x).tokens


def step(forward, module, x, device: str) -> None:
    module.zero_grad(set_to_none=True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else nullcontext()
    with autocast:
        loss = forward(x).float().square().mean()
    loss.backward()


def kernel_table(prof, steps: int, top: int) -> tuple[str, float]:
    """Returns (a markdown table of the `top` kernels by device time per step, the device-busy ms per step)."""
    rows = []
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", None)
        if device_us is None:
            device_us = getattr(event, "self_cuda_time_total", 0.0)
        if device_us and event.device_type.name in ("CUDA", "PrivateUse1"):
            rows.append((device_us / steps, event.count // steps, event.key))
    if not rows:  # a CPU run: operators by self CPU time
        rows = [(e.self_cpu_time_total / steps, e.count // steps, e.key) for e in prof.key_averages()]
    rows.sort(reverse=True)
    busy_ms = sum(r[0] for r in rows) / 1e3
    lines = ["| kernel | calls/step | ms/step | share |", "|---|---:|---:|---:|"]
    for us, count, name in rows[:top]:
        lines.append(f"| {name[:90]} | {count} | {us / 1e3:.3f} | {100 * us / 1e3 / busy_ms:.1f}% |")
    return "\n".join(lines), busy_ms


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["videomamba", "vit"], default="videomamba")
    parser.add_argument("--size", choices=list(SIZES), default="tiny")
    parser.add_argument("--frames", type=int, default=None, help="default 64 on CUDA, 4 on the CPU")
    parser.add_argument("--img-size", type=int, default=None, help="default 224 on CUDA, 64 on the CPU")
    parser.add_argument("--batch", type=int, default=None, help="default 4 on CUDA, 1 on the CPU")
    parser.add_argument("--backend", default="auto", help="VideoMamba mixer backend (auto, triton, mamba_ssm, torch)")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (after 2 warmup steps)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--trace", default=None, help="also write a Chrome trace here")
    parser.add_argument("--host", action="store_true", help="also profile the host side with cProfile")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="replay the blocks as CUDA graphs (train.cuda_graphs, pipeline.engine.graphs)")
    parser.add_argument("--quick", action="store_true", help="one profiled step, the top 10 kernels")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.top = 1, 10
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = device == "cuda"
    frames, img_size = args.frames or (64 if gpu else 4), args.img_size or (224 if gpu else 64)
    batch = args.batch or (4 if gpu else 1)
    module, forward = build(args.model, args.size, frames, img_size, args.backend)
    module = module.to(device).train()
    if args.cuda_graphs:
        graph_chain(blocks_of(module))
    x = torch.randn(batch, 3, frames, img_size, img_size, device=device)
    for _ in range(2):
        step(forward, module, x, device)
    plain_ms = timed_steps(forward, module, x, device, args.steps)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if gpu else [])
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(args.steps):
            step(forward, module, x, device)
        if gpu:
            torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) * 1e3 / args.steps
    table, busy_ms = kernel_table(prof, args.steps, args.top)
    name = f"{args.model} {args.size}" + (f" ({args.backend})" if args.model == "videomamba" else "")
    print(f"{name}, {frames} frames, {img_size}x{img_size}, batch {batch}, {device}: wall {plain_ms:.1f} ms/step "
          f"({wall_ms:.1f} under the profiler), {'device' if gpu else 'CPU'} busy {busy_ms:.1f} ms/step")
    print(table)
    if args.trace:
        prof.export_chrome_trace(args.trace)
    if args.host:
        print(host_table(forward, module, x, device, args.steps, args.top))
    return 0


def timed_steps(forward, module, x, device: str, steps: int) -> float:
    """Wall ms per step over `steps` back-to-back steps (one synchronize at the end, as in training)."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step(forward, module, x, device)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / steps


def host_table(forward, module, x, device: str, steps: int, top: int) -> str:
    """cProfile's top functions by own time over `steps` steps: where the host side of a step goes."""
    profiler = cProfile.Profile()
    profiler.enable()
    timed_steps(forward, module, x, device, steps)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


if __name__ == "__main__":
    sys.exit(main())
