"""The fused mixer's depthwise conv kernels on a GPU: forward (conv + SiLU, both directions) and backward (dp with the
weight gradients, then dx) for a sweep of tile sizes, against the memory floor.

    python -m bench.conv [--shape B L E] [--out DIR] [--quick]

The shape defaults to VideoMamba-Ti's at 64 frames, batch 4: (4, 12545, 384), x a view of the in_proj output
(B, L, 2E) as in the mixer, bf16. The floor is the bytes each kernel must move (forward: x read, u written for two
directions; dp: x, du read, dp written; dx: dp read, dx written) at the bandwidth of a device-to-device copy
measured in the same run. Prints one table per kernel, fastest first, and writes them as JSON to --out. `--quick`
times the default tiles only; without a GPU the script says so and exits.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

from pipeline.models.ops.bimamba import ScanConfig, conv_silu, conv_silu_backward

FWD = [dict(conv_block_t=t, conv_block_e=e, conv_warps=w) for t, e, w in
       ((64, 64, 4), (32, 64, 4), (128, 64, 4), (64, 128, 4), (32, 128, 4), (128, 32, 4), (16, 128, 4),
        (64, 64, 8), (128, 128, 8), (256, 64, 8), (32, 64, 2))]
DP = [dict(conv_dp_block_t=t, conv_dp_tiles=n, conv_dp_warps=w, conv_dp_block_e=e) for t, n, w, e in
      ((8, 16, 2, 64), (16, 16, 4, 64), (8, 32, 4, 64), (32, 8, 4, 64), (16, 16, 4, 128), (16, 8, 4, 64),
       (16, 32, 4, 64), (32, 8, 8, 128), (16, 16, 2, 32), (32, 16, 8, 64), (8, 8, 2, 64))]
DX = [dict(conv_dx_block_t=t, conv_dx_block_e=e, conv_dx_warps=w) for t, e, w in
      ((16, 128, 4), (64, 64, 8), (64, 64, 4), (32, 64, 4), (128, 64, 8), (64, 128, 8), (32, 128, 4), (128, 32, 4),
       (16, 64, 2))]


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write)."""
    from triton.testing import do_bench
    a = torch.empty(2**29, dtype=torch.float16, device="cuda")
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=10, rep=100, return_mode="median")
    return 2 * a.numel() * a.element_size() / (ms * 1e-3)


def sweep(name: str, variants: list[dict], run, floor_bytes: float, bandwidth: float) -> list[dict]:
    from triton.testing import do_bench
    rows = []
    for v in variants:
        cfg = dataclasses.replace(ScanConfig(), **v)
        try:
            us = 1e3 * do_bench(lambda: run(cfg), warmup=20, rep=100, return_mode="median")
        except Exception as e:  # a tile that does not compile or fit is reported, not fatal
            print(f"{name} {v}: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
            continue
        rows.append(dict(kernel=name, **v, us=us, floor_us=1e6 * floor_bytes / bandwidth))
    rows.sort(key=lambda r: r["us"])
    print(f"\n| {name} tiles | µs | × floor |\n|---|---:|---:|")
    for r in rows:
        tiles = ", ".join(f"{k.replace('conv_', '')}={r[k]}" for k in variants[0])
        print(f"| {tiles} | {r['us']:.1f} | {r['us'] / r['floor_us']:.2f} |", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[4, 12545, 384], metavar=("B", "L", "E"))
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--quick", action="store_true", help="the default tiles only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/conv.py times Triton kernels on a CUDA GPU; none here: skipped")
        return 0
    if args.quick:
        FWD[:], DP[:], DX[:] = FWD[:1], DP[:1], DX[:1]
    b, l, e = args.shape
    k = 4
    xz = torch.randn(b, l, 2 * e, device="cuda", dtype=torch.bfloat16)
    x = xz[..., :e]
    w = torch.randn(2, e, k, device="cuda", dtype=torch.bfloat16) * 0.3
    cb = torch.randn(2, e, device="cuda", dtype=torch.bfloat16) * 0.1
    gu = torch.randn(2, b, l, e, device="cuda", dtype=torch.bfloat16)
    dx = torch.empty(b, l, e, device="cuda", dtype=torch.bfloat16)
    bandwidth = copy_bandwidth()
    unit = b * l * e * 2  # bytes of one (B, L, E) bf16 tensor
    print(f"{torch.cuda.get_device_name()}, shape (B, L, E) = {tuple(args.shape)}, copy bandwidth "
          f"{bandwidth / 1e12:.2f} TB/s")
    rows = sweep("forward", FWD, lambda cfg: conv_silu(x, w, cb, cfg), 3 * unit, bandwidth)
    # the backward's two kernels, each swept with the other at its default tiles
    rows += sweep("backward (dp + dx), dp swept", DP, lambda cfg: conv_silu_backward(x, gu, w, cb, dx, cfg),
                  (5 + 3) * unit, bandwidth)
    rows += sweep("backward (dp + dx), dx swept", DX, lambda cfg: conv_silu_backward(x, gu, w, cb, dx, cfg),
                  (5 + 3) * unit, bandwidth)
    with open(os.path.join(args.out, "conv.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
