"""Lower bounds for the bidirectional selective scan, forward+backward: what any exact implementation must move (the
memory floor) and what it must compute (the arithmetic floor), against the GPU's measured peaks and the fused scan.

    python -m bench.bound [--shapes 8,1152,1569,16 1,384,12545,16] [--exp-ops 7] [--out DIR]

On a CUDA GPU it measures three peaks (a device-to-device copy, `ex2.approx` on the SFU, fp32 FMAs), then times
`bidirectional_selective_scan` (forward+backward, one CUDA graph, bf16) at each shape. Without one it prints the
same table from the H200's nominal peaks (`--sms`, `--clock-ghz`, `--bandwidth`).

The arithmetic floor counts, per element (token, channel, state, direction), only the work that no exact fp32 scan
can skip when (a) the sequence is split across thread blocks, as it must be at VideoMamba's shapes (at batch 1 the
Ti's 2 x 384 channel-directions give 24 warps to a 132-SM GPU), and (b) the states are not kept from the forward
to the backward (in bf16 they are 32 bytes per (token, channel), 16x the op's own bytes):

- forward, each segment's summary (its final state from a zero start): a = exp2(delta A) [1 FMUL, 1 MUFU],
  h = a h + B (delta u) [1 FMUL, 1 FFMA];
- forward, the outputs from each segment's carried-in state: the same, and y += C h [1 FFMA];
- backward: the state recomputed [as above, 3 + 1 MUFU]; the adjoint lam = mu + C g, mu = a lam [2]; du's
  sum lam B [1]; d(delta)'s sum lam (a h) A and dA's lam (a h) delta [4: a h, lam (a h), an FFMA each]; dB =
  lam (delta u) and dC = h g, each a product and at least one add of the sum over channels [4].

That is 21 fp32 operations and 3 exponentials per element. Everything per (token, channel) (softplus, the gate,
loads, conversions) is left out, so the floor is below any real kernel. The SFU's exponentials can partly move to
the FMA pipe as a polynomial (`--exp-ops` instructions each, as FlashAttention-4 does); the floor takes the best
split. Each instruction, the SFU's too, takes an issue slot (4 warp-instructions a clock per SM).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

from bench.fused import BANDWIDTH, graphed_ms, scan_floor_bytes, scan_tensors
from pipeline.models.ops.bimamba import bidirectional_selective_scan

FP32_OPS = 21  # per element, fwd+bwd: summary 3, output 4, backward 14 (the docstring)
EXPS = 3  # per element: summary, output, backward
DEFAULT_SHAPES = ["8,1152,1569,16", "1,384,12545,16"]


def elements(b: int, e: int, l: int, n: int) -> int:
    """(token, channel, state, direction) elements of a bidirectional scan."""
    return 2 * b * e * l * n


def split_floor_s(x: int, fp32_rate: float, sfu_rate: float, issue_rate: float, exp_ops: int) -> tuple:
    """The fastest time for X elements' arithmetic when a fraction f of the exponentials runs on the FMA pipe as a
    polynomial of exp_ops instructions and the rest on the SFU: (seconds, f). Rates are per second: fp32 lane
    operations, SFU lane operations, warp instructions issued."""
    best = (float("inf"), 0.0)
    for step in range(101):
        f = step / 100
        fma_s = x * (FP32_OPS + EXPS * f * exp_ops) / fp32_rate
        sfu_s = x * EXPS * (1 - f) / sfu_rate
        issue_s = x * (FP32_OPS + EXPS * (1 - f) + EXPS * f * exp_ops) / 32 / issue_rate
        best = min(best, (max(fma_s, sfu_s, issue_s), f))
    return best


def nominal_peaks(sms: int, clock_ghz: float, bandwidth: float) -> dict:
    """Hopper's per-SM rates: 128 fp32 lanes, 16 SFU lanes, 4 schedulers issuing one warp instruction a clock."""
    clock = clock_ghz * 1e9
    return dict(bandwidth=bandwidth, fp32=sms * 128 * clock, sfu=sms * 16 * clock, issue=sms * 4 * clock)


def bound_row(shape: tuple, peaks: dict, exp_ops: int, nominal_bandwidth: float) -> dict:
    b, e, l, n = shape
    x = elements(b, e, l, n)
    floor_bytes = scan_floor_bytes(b, e, l, n, 2, True)
    arith_s, f = split_floor_s(x, peaks["fp32"], peaks["sfu"], peaks["issue"], exp_ops)
    return dict(shape=shape, elements=x, floor_bytes=floor_bytes,
                memory_floor_ms=floor_bytes / peaks["bandwidth"] * 1e3,
                memory_floor_nominal_ms=floor_bytes / nominal_bandwidth * 1e3,
                sfu_only_ms=x * EXPS / peaks["sfu"] * 1e3,
                issue_only_ms=x * (FP32_OPS + EXPS) / 32 / peaks["issue"] * 1e3,
                arithmetic_floor_ms=arith_s * 1e3, exps_on_fma=f)


# ------------------------------------------------------------------------------------------------ GPU peaks
@triton.jit
def _sfu_chains(out_ptr, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    x = (tl.arange(0, BLOCK) + tl.program_id(0)).to(tl.float32) * 1e-6
    for _ in range(ITERS):  # each element an independent chain: x <- 2^(-x/2), stays in (0.7, 1]
        x = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x * -0.5], dtype=tl.float32,
                                      is_pure=True, pack=1)
    tl.store(out_ptr + tl.program_id(0) * BLOCK + tl.arange(0, BLOCK), x)


@triton.jit
def _fma_chains(out_ptr, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    x = (tl.arange(0, BLOCK) + tl.program_id(0)).to(tl.float32) * 1e-6
    for _ in range(ITERS):  # x <- 0.999 x + 1e-4: a fixed point near 0.1, never denormal
        x = x * 0.999 + 1e-4
        x = x * 0.999 + 1e-4
        x = x * 0.999 + 1e-4
        x = x * 0.999 + 1e-4
    tl.store(out_ptr + tl.program_id(0) * BLOCK + tl.arange(0, BLOCK), x)


def measured_peaks() -> dict:
    """The copy bandwidth (bytes read + written per second), fp32 FMA and SFU exp2 lane rates of GPU 0."""
    from triton.testing import do_bench
    props = torch.cuda.get_device_properties(0)
    warps, per_thread, iters = 8, 8, 4096
    block = warps * 32 * per_thread
    grid = props.multi_processor_count * 8  # 64 warps per SM
    out = torch.empty(grid * block, device="cuda")
    lanes = grid * block
    sfu_ms = do_bench(lambda: _sfu_chains[(grid,)](out, iters, block, num_warps=warps), return_mode="median")
    fma_ms = do_bench(lambda: _fma_chains[(grid,)](out, iters, block, num_warps=warps), return_mode="median")
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    fp32 = lanes * iters * 4 / (fma_ms * 1e-3)
    # a Hopper scheduler issues one warp instruction a clock and has 32 fp32 lanes: FFMAs run at the issue rate
    return dict(bandwidth=2 * src.numel() / (copy_ms * 1e-3), fp32=fp32, sfu=lanes * iters / (sfu_ms * 1e-3),
                issue=fp32 / 32)


def measured_scan_ms(shape: tuple) -> float:
    """The fused scan's forward+backward at (B, E, L, N), bf16, replayed as one CUDA graph (bench/fused.py's way)."""
    _, leaves, dout = scan_tensors(shape)
    return graphed_ms(lambda: bidirectional_selective_scan(**leaves).backward(dout), list(leaves.values()))


# ------------------------------------------------------------------------------------------------ main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, metavar="B,E,L,N")
    parser.add_argument("--exp-ops", type=int, default=7,
                        help="FMA-pipe instructions of a polynomial exp2 accurate to fp32 (default 7)")
    parser.add_argument("--sms", type=int, default=132, help="without a GPU: SMs (H200: 132)")
    parser.add_argument("--clock-ghz", type=float, default=1.98, help="without a GPU: SM clock (H200 boost)")
    parser.add_argument("--bandwidth", type=float, default=4.8e12, help="without a GPU: bytes/s (H200 nominal)")
    parser.add_argument("--nominal-bandwidth", type=float, default=BANDWIDTH,
                        help="the bandwidth issue 7's floors were stated at (bench/fused.py's BANDWIDTH)")
    parser.add_argument("--out", default=os.environ.get("OUT"))
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes]
    if torch.cuda.is_available():
        peaks = measured_peaks()
        source = f"measured on {torch.cuda.get_device_name()}"
    else:
        peaks = nominal_peaks(args.sms, args.clock_ghz, args.bandwidth)
        source = f"nominal: {args.sms} SMs at {args.clock_ghz} GHz, {args.bandwidth / 1e12:.1f} TB/s"
    print(f"peaks ({source}): copy {peaks['bandwidth'] / 1e12:.2f} TB/s, fp32 {peaks['fp32'] / 1e12:.1f} T lane-ops/s, "
          f"SFU exp2 {peaks['sfu'] / 1e12:.2f} T/s, issue {peaks['issue'] / 1e12:.3f} T warp-instructions/s")
    rows = []
    for shape in shapes:
        row = bound_row(shape, peaks, args.exp_ops, args.nominal_bandwidth)
        if torch.cuda.is_available():
            row["scan_graphed_ms"] = measured_scan_ms(shape)
        rows.append(row)
    print("\n| shape (B, E, L, N) | memory floor ms (measured BW / 3.0 TB/s) | SFU-only ms | issue-only ms | "
          "arithmetic floor ms (exps on FMA) | arithmetic / memory floor | fused scan ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        scan = f"{r['scan_graphed_ms']:.3f}" if "scan_graphed_ms" in r else "-"
        print(f"| {r['shape']} | {r['memory_floor_ms']:.3f} / {r['memory_floor_nominal_ms']:.3f} | "
              f"{r['sfu_only_ms']:.3f} | {r['issue_only_ms']:.3f} | {r['arithmetic_floor_ms']:.3f} "
              f"({r['exps_on_fma']:.0%}) | {r['arithmetic_floor_ms'] / r['memory_floor_ms']:.2f}x / "
              f"{r['arithmetic_floor_ms'] / r['memory_floor_nominal_ms']:.2f}x | {scan} |")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bound.json"), "w") as f:
            json.dump(dict(peaks=peaks, source=source, exp_ops=args.exp_ops, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
