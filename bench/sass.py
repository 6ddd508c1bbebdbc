"""The scan's four passes compiled for an H100/H200 without a GPU: registers, warps a scheduler can hold, and the
token loop's instructions, the most frequent opcodes and where its loads sit (pipeline/models/ops/sm90.py).

    python -m bench.sass --batch 4 --length 12545 --channels 384         # with the venv's Triton
    PYTHONPATH=/tmp/tri36:. python -m bench.sass ...                     # with the lent GPU's Triton (3.6):
    pip install --no-deps --target /tmp/tri36 /opt/pypi/files/triton-3.6.0-*.whl    # matches the device's ncu

Instruction counts per token and register counts predict kernel time well where occupancy does not change
(bench/NOTES.md, v7); they are no substitute for timing on the GPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import triton

from pipeline.models.ops import sm90
from pipeline.models.ops.bimamba import ScanConfig


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=12545, help="tokens (VideoMamba at 224²: 196 a frame + 1)")
    parser.add_argument("--channels", type=int, default=384, help="the mixer's inner width (2 x the model width)")
    parser.add_argument("--states", type=int, default=16)
    parser.add_argument("--passes", nargs="+", choices=sm90.PASSES, default=list(sm90.PASSES))
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=INT",
                        help="ScanConfig fields to override, e.g. state_pass_registers=0 fwd_block_e=32")
    parser.add_argument("--top", type=int, default=8, help="opcodes to list per pass")
    args = parser.parse_args()
    fields = {f.name for f in dataclasses.fields(ScanConfig)}
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in fields:
            parser.error(f"--set {item}: ScanConfig has no field {key!r} (fields: {', '.join(sorted(fields))})")
        overrides[key] = value if key == "saved_states" else int(value)
    cfg = ScanConfig(**overrides)
    print(f"Triton {triton.__version__}, sm_90, (B, E, L, N) = ({args.batch}, {args.channels}, {args.length}, "
          f"{args.states}), bf16")
    print("\n| pass | registers | warps a scheduler | shared bytes | loop instructions | SFU | loads at | opcodes |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.passes:
        compiled = sm90.compile_pass(name, args.batch, args.length, args.channels, args.states, cfg)
        sass, ptx = sm90.sass_stats(compiled), sm90.ptx_stats(compiled)
        warps = min(16, 65536 // (32 * cfg.num_warps * -(-sass["registers"] // 8) * 8) * cfg.num_warps // 4)
        opcodes = ", ".join(f"{op} {n}" for op, n in sass["opcodes"].most_common(args.top))
        print(f"| {name} | {sass['registers']} | {warps} | {ptx['shared']} | {sass['loop_instructions']} | "
              f"{sass['opcodes']['MUFU']} | {sass['loads_at']} | {opcodes} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
