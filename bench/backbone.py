"""Backbone cost against clip length: forward+backward clips/s and peak memory of VideoMamba-Ti/-S and a joint
space-time attention ViT of the same width and depth (torch's scaled_dot_product_attention).

    python -m bench.backbone [--device cpu|cuda] [--frames 8 16 32 64] [--sizes tiny small] [--img-size 224]
                             [--batch B] [--backends auto torch mamba_ssm triton] [--cuda-graphs] [--quick]

On the GPU: bf16 autocast, 224x224, 8/16/32/64 frames, batch 4; each VideoMamba mixer backend that works here is
measured (mamba_ssm, triton; one that fails to import or run is skipped with a note; `--backends torch` adds the
pure-PyTorch scan, slow on long clips). `--cuda-graphs` adds a row per model with its blocks replayed as CUDA graphs
(pipeline.engine.graphs, what `train.cuda_graphs` does): the step without the host's launch cost. On the CPU: fp32,
small clips.
Each cell: warmup, then the median of N timed steps (zero grads, forward, mean-square loss, backward), with
torch.cuda.synchronize around the timing; peak memory is torch.cuda.max_memory_allocated over the timed steps.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from contextlib import nullcontext
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.engine.graphs import graph_chain
from pipeline.models import build_videomamba
from pipeline.models.videomamba import SIZES


class AttentionBlock(nn.Module):
    """Pre-norm ViT block: LN -> multi-head SDPA -> LN -> MLP(4x, GELU)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, D))
        return x + self.mlp(self.norm2(x))


class SpaceTimeViT(nn.Module):
    """Joint space-time attention over all T*H*W patches + [cls], embedded as VideoMamba embeds them."""

    def __init__(self, depth: int, dim: int, num_frames: int, img_size: int, patch: int = 16):
        super().__init__()
        grid = img_size // patch
        self.patch_embed = nn.Conv3d(3, dim, (1, patch, patch), stride=(1, patch, patch))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, grid * grid + 1, dim) * 0.02)
        self.temporal_pos_embedding = nn.Parameter(torch.zeros(1, num_frames, dim))
        self.blocks = nn.ModuleList([AttentionBlock(dim, max(1, dim // 64)) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        B, D, T = x.shape[:3]
        x = x.flatten(3).permute(0, 2, 3, 1) + self.pos_embed[:, None, 1:] + self.temporal_pos_embedding[:, :, None]
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(B, -1, -1), x.reshape(B, -1, D)], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def videomamba_features(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: model.forward_features(x).tokens


def mixer_backends(device: str, requested: list[str]) -> list[str]:
    """Returns the requested VideoMamba backends that import and run on a small input here; notes the others."""
    usable = []
    for backend in requested:
        try:
            model = build_videomamba("tiny", num_frames=2, img_size=32, depth=1, embed_dim=64,
                                     scan_backend=backend).to(device)
            model.forward_features(torch.randn(1, 3, 2, 32, 32, device=device)).tokens.sum().backward()
            usable.append(backend)
        except Exception as e:  # a backend that cannot run here is reported, not fatal
            print(f"note: VideoMamba backend {backend!r} skipped on {device}: {type(e).__name__}: "
                  f"{str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
    return usable


def measure(forward: Callable, model: nn.Module, batch: int, frames: int, img_size: int, device: str,
            warmup: int, repeats: int) -> tuple[Optional[float], Optional[float]]:
    """Returns (median seconds per forward+backward, peak MiB on CUDA or None); (None, None) when out of memory."""
    x = torch.randn(batch, 3, frames, img_size, img_size, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else nullcontext()
    times = []
    try:
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        for i in range(warmup + repeats):
            model.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            with autocast:
                loss = forward(x).float().square().mean()
            loss.backward()
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    except torch.cuda.OutOfMemoryError:
        model.zero_grad(set_to_none=True)
        return None, None
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    return statistics.median(times), peak


def blocks_of(model: nn.Module) -> list[nn.Module]:
    return model.chained_blocks() if hasattr(model, "chained_blocks") else list(model.blocks)


def run(device: str, sizes: list[str], frame_counts: list[int], img_size: int, batch: int, backends: list[str],
        warmup: int, repeats: int, cuda_graphs: bool = False) -> str:
    rows = ["| model | backend | frames | tokens | clips/s | ms/step | peak MiB |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for size in sizes:
        depth, width = SIZES[size]
        label = {"tiny": "Ti", "small": "S", "middle": "M", "base": "B"}[size]
        for frames in frame_counts:
            tokens = frames * (img_size // 16) ** 2 + 1
            candidates = [(f"VideoMamba-{label}", b, lambda b=b: build_videomamba(
                size, num_frames=frames, img_size=img_size, scan_backend=b)) for b in backends]
            candidates.append((f"ViT-{label} (space-time SDPA)", "sdpa",
                               lambda: SpaceTimeViT(depth, width, frames, img_size)))
            if cuda_graphs:
                candidates += [(name, f"{backend}+graphs", make) for name, backend, make in candidates]
            for name, backend, make in candidates:
                model = make().to(device).train()
                if backend.endswith("+graphs"):
                    graph_chain(blocks_of(model))
                forward = videomamba_features(model) if name.startswith("VideoMamba") else model
                seconds, peak = measure(forward, model, batch, frames, img_size, device, warmup, repeats)
                del model, forward  # parameters and gradients must not count towards the next model's peak
                gc.collect()  # a graphed model's blocks and graphs form a cycle
                if seconds is None:
                    rows.append(f"| {name} | {backend} | {frames} | {tokens} | OOM | - | - |")
                    continue
                peak_text = f"{peak:,.0f}" if peak is not None else "-"
                rows.append(f"| {name} | {backend} | {frames} | {tokens} | {batch / seconds:.2f} | "
                            f"{seconds * 1e3:.0f} | {peak_text} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--frames", type=int, nargs="+", default=None)
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=["tiny", "small"])
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--backends", nargs="+", default=None,
                        help="VideoMamba mixer backends to try (default: mamba_ssm and triton on the GPU, the "
                             "pure-PyTorch 'torch' only where neither runs; torch on the CPU)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: on a shared machine, spinning OpenMP threads cost more than they "
                             "give)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="also measure each model with its blocks replayed as CUDA graphs (GPU only)")
    parser.add_argument("--quick", action="store_true", help="the smallest setting only, few repeats")
    args = parser.parse_args(argv)
    gpu = args.device == "cuda"
    frames = args.frames or ([8, 16, 32, 64] if gpu else [2, 4, 8])
    img_size = args.img_size or (224 if gpu else 64)
    batch = args.batch or (4 if gpu else 1)
    backends = args.backends or (["mamba_ssm", "triton"] if gpu else ["torch"])
    sizes = args.sizes
    repeats, warmup = (args.repeats, 2)
    if args.quick:
        frames, sizes, repeats, warmup = frames[:1], sizes[:1], 2, 1
    if not gpu:
        torch.set_num_threads(args.threads)
    backends = mixer_backends(args.device, backends) or (mixer_backends(args.device, ["torch"]) if gpu else [])
    print(f"backbone fwd+bwd, device {args.device}, {img_size}x{img_size}, batch {batch}, "
          f"{'bf16 autocast' if gpu else 'fp32'}, median of {repeats}")
    print(run(args.device, sizes, frames, img_size, batch, backends, warmup, repeats, args.cuda_graphs and gpu))
    return 0


if __name__ == "__main__":
    sys.exit(main())
