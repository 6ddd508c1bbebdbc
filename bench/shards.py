"""Sharding throughput: samples/s and MB/s of `videomamba shard` on the synthetic corpus with 1 and 2 Ray workers.

    python -m bench.shards [--videos 512] [--size 128] [--frames 48] [--samples-per-shard 32] [--workers 1 2]
                           [--reencode-side 32] [--quick]

Writes the synthetic corpus once into a temporary folder, starts one local Ray cluster with as many CPUs as the
largest worker count, runs a small warm-up job (so that worker start-up and imports are not timed), then shards the
corpus once per worker count and mode into a fresh output folder: `copy` stores the original bytes (read, validate
with PyAV, write the tar), `reencode` also decodes and re-encodes every video to a short side of --reencode-side px
with libx264. Throughput is the job's own figure: samples and tar bytes written over the time from the first task's
submission to the last result (Ray's start-up excluded). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile

from shards.media import ProcessOptions
from shards.runner import ShardJobConfig, shard_corpus
from shards.synth import write_corpus


def measured(manifest: str, out: str, workers: int, samples_per_shard: int, process: ProcessOptions) -> dict:
    """Returns the summary of one sharding job."""
    cfg = ShardJobConfig(input=manifest, out=out, samples_per_shard=samples_per_shard, workers=workers,
                         process=process, progress=False)
    return shard_corpus(cfg).summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=512)
    parser.add_argument("--size", type=int, default=128, help="frame side of the synthetic videos")
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--samples-per-shard", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reencode-side", type=int, default=32, help="short side of the `reencode` mode; 0: skip it")
    parser.add_argument("--quick", action="store_true", help="a small corpus (a smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.videos, args.size, args.frames, args.samples_per_shard = 64, 64, 16, 16

    import ray

    modes = [("copy", ProcessOptions())]
    if args.reencode_side:
        modes.append(("reencode", ProcessOptions(short_side=args.reencode_side)))
    with tempfile.TemporaryDirectory(prefix="bench_shards_") as tmp:
        corpus = os.path.join(tmp, "corpus")
        write_corpus(corpus, videos=args.videos, images=0, seed=0, size=args.size, frames=args.frames, fps=8,
                     eval_videos=0, progress=False)
        manifest = os.path.join(corpus, "videos.jsonl")
        ray.init(address="local", num_cpus=max(args.workers), include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR)
        try:
            measured(manifest, os.path.join(tmp, "warmup"), max(args.workers), max(1, args.videos // 8),
                     ProcessOptions())
            rows = []
            for mode, process in modes:
                for w in args.workers:
                    s = measured(manifest, os.path.join(tmp, f"{mode}-{w}"), w, args.samples_per_shard, process)
                    rows.append((mode, w, s))
        finally:
            ray.shutdown()
    print(f"\nSynthetic corpus: {args.videos} videos, {args.size}x{args.size} px, {args.frames} frames (h264 mp4); "
          f"{args.samples_per_shard} samples per shard; {os.cpu_count()} CPUs on this machine.\n")
    print("| mode | workers | samples | shards | tasks s | samples/s | MB/s |")
    print("|---|---|---|---|---|---|---|")
    for mode, w, s in rows:
        print(f"| {mode} | {w} | {s['samples']} | {s['shards']} | {s['tasks_s']:.2f} | {s['samples_per_s']:.1f} "
              f"| {s['mb_per_s']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
