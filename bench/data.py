"""Streaming data: clips/s that `build_loader` delivers, by decoder, at T frames and S x S pixels.

    python -m bench.data [--decoder cpu dali] [--device cpu|cuda] [--frames 8 16] [--size 224] [--workers W]
                         [--clips N] [--dali BATCHxTHREADSxPIPELINES ...] [--step-clips-per-s X] [--quick]

It writes a small corpus of real clips (PyAV; H.264, or VP9 where DALI must run on its CPU backend) into WebDataset
shards in a temporary folder and times the training loader over it end to end: tar reading, planning, decoding the
T planned frames, random resized crop, flip, normalization and batching (with --device cuda every decoder hands
CUDA tensors over and the time includes a synchronize; --dali lists the `DaliSettings` to time, default the
loader's). Before timing DALI it decodes one sample with both decoders under the same plan and prints their
max / mean difference (normalized units and grey levels): DALI's mixed (GPU) decoder on H.264 with --device cuda,
its CPU backend on VP9 otherwise.

With --step-clips-per-s (the clips/s one training step consumes: bench/backbone.py's clips/s for the model, frames
and device at hand) the table also gives each row's multiple of it; the goal for DALI on one GPU is at least 3x
what a VideoMamba-M step consumes.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from typing import Optional

import numpy as np
import torch

from pipeline.config import DataConfig
from pipeline.data import build_loader
from pipeline.data.decode import CpuDecoder, DaliDecoder, EncodedSample, dali_available, dali_ready, probe
from pipeline.data.loader import DaliSettings, default_dali_settings
from pipeline.data.transforms import NORMALIZATIONS, clip_plan
from shards.synth import encode_mp4


def source_clip(seed: int, frames: int, width: int, height: int) -> np.ndarray:
    """Returns (T, H, W, 3) uint8 frames with texture and motion, so the encoded sizes look like real footage."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (height // 8 + 3, width // 8 + 3, 3), dtype=np.uint8)
    big = np.kron(base, np.ones((8, 8, 1), np.uint8))
    out = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        dy, dx = (t * 2) % 16, (t * 3) % 16
        out[t] = big[dy:dy + height, dx:dx + width]
    noise = rng.integers(0, 24, out.shape, dtype=np.uint8)
    return out // 2 + noise + 40


def write_corpus(root: str, distinct: int, samples: int, frames: int, width: int, height: int, fps: int,
                 codec: str) -> tuple[str, bytes]:
    """Writes `samples` samples (cycling over `distinct` clips) as shards of 16 + index.json; returns (index, a clip)."""
    clips = [encode_mp4(source_clip(i, frames, width, height), fps=fps, codec=codec) for i in range(distinct)]
    entries = []
    for s, first in enumerate(range(0, samples, 16)):
        name = f"bench-{s:06d}.tar"
        with tarfile.open(os.path.join(root, name), "w") as tar:
            for i in range(first, min(first + 16, samples)):
                for ext, data in (("mp4", clips[i % distinct]), ("txt", f"clip {i}".encode())):
                    info = tarfile.TarInfo(f"k{i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        entries.append({"url": name, "samples": min(16, samples - first)})
    index = os.path.join(root, "index.json")
    with open(index, "w") as f:
        json.dump({"shards": entries, "media": "video"}, f)
    return index, clips[0]


def clips_per_second(cfg: DataConfig, batch_size: int, clips: int, cuda: bool,
                     dali: Optional[DaliSettings] = None) -> float:
    """Returns clips/s over `clips` clips after a warm-up (worker start-up, DALI build and filling DALI's groups in
    flight excluded: at least 2 batches and 2 groups per pipeline, so the timed span starts in the steady state)."""
    built = build_loader(cfg, batch_size, rank=0, world_size=1, seed=0, train=True)
    if dali is not None:
        built.dali = dali
    warmup = max(2 * batch_size, 2 * dali.batch * dali.pipelines if dali else 0)
    loader, seen = iter(built), 0
    while seen < warmup:
        seen += len(next(loader)["key"])
    if cuda:
        torch.cuda.synchronize()
    start, done = time.perf_counter(), 0
    while done < clips:
        done += len(next(loader)["key"])
    if cuda:
        torch.cuda.synchronize()
    return done / (time.perf_counter() - start)


def decoder_difference(clip: bytes, frames: int, size: int, device: str) -> tuple[float, float]:
    """Returns (max, mean) |DALI - PyAV| in normalized units for one sample under one training plan."""
    info = probe(clip, "video")
    plan = clip_plan(info.frames, info.fps, info.width, info.height, frames, size, True, None,
                     np.random.default_rng(0), crop=DataConfig.crop, normalize=DataConfig.normalize)
    sample = EncodedSample("check", "video", clip, plan)
    cpu = CpuDecoder().decode([sample])[0]
    dali = DaliDecoder(device, max_batch=1, threads=1).decode([dali_ready(sample)])[0].cpu()  # as the loader does
    diff = (dali - cpu).abs()
    return diff.max().item(), diff.mean().item()


def dali_settings(text: str) -> DaliSettings:
    """Parses BATCHxTHREADSxPIPELINES (e.g. 32x8x2) for --dali."""
    try:
        batch, threads, pipelines = (int(v) for v in text.lower().split("x"))
        return DaliSettings(batch, threads, pipelines)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--dali takes BATCHxTHREADSxPIPELINES such as 32x8x2, got {text!r}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decoder", nargs="+", choices=["cpu", "dali"], default=None,
                        help="decoders to time (default: cpu, and dali where it is installed)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="DataLoader workers")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--clips", type=int, default=None, help="clips timed per row (default 256, quick 16)")
    parser.add_argument("--source", default="340x256x90@30", help="source clips: WIDTHxHEIGHTxFRAMES@FPS")
    parser.add_argument("--step-clips-per-s", type=float, default=None,
                        help="clips/s a training step consumes, to print each row's multiple of it")
    parser.add_argument("--dali", nargs="+", type=dali_settings, default=[default_dali_settings()],
                        help="DALI settings to time, each BATCHxTHREADSxPIPELINES (default: the loader's)")
    parser.add_argument("--quick", action="store_true", help="16 clips, 8 frames, 2 workers (a smoke run)")
    args = parser.parse_args(argv)
    decoders = args.decoder or (["cpu", "dali"] if dali_available() else ["cpu"])
    if "dali" in decoders and not dali_available():
        parser.error("--decoder dali needs nvidia-dali (pip install nvidia-dali-cuda130)")
    frames_list = args.frames[:1] if args.quick else args.frames
    clips = args.clips or (16 if args.quick else 256)
    workers = min(args.workers, 2) if args.quick else args.workers
    size_part, fps = args.source.split("@")
    width, height, length = (int(v) for v in size_part.split("x"))
    cuda = args.device == "cuda"
    # DALI's CPU backend has no H.264; without a GPU every decoder reads VP9 so the rows compare like with like
    codec = "h264" if cuda or "dali" not in decoders else "vp9"
    dali_device = "gpu" if cuda else "cpu"

    with tempfile.TemporaryDirectory() as root:
        index, one_clip = write_corpus(root, distinct=2 if args.quick else 8, samples=max(64, clips * 2),
                                       frames=length, width=width, height=height, fps=int(fps), codec=codec)
        print(f"data loader, device {args.device}, source {width}x{height}, {length} frames @ {fps} fps ({codec}), "
              f"output {args.size}x{args.size}, batch {args.batch_size}, {workers} workers, {clips} clips timed")
        if "dali" in decoders:
            for t in frames_list:
                worst, mean = decoder_difference(one_clip, t, args.size, dali_device)
                grey = 255 * max(NORMALIZATIONS[DataConfig.normalize][1])
                print(f"DALI ({'mixed' if cuda else 'cpu'}, {codec}) vs PyAV, same sample and plan, T={t}: "
                      f"max |diff| {worst:.3f} (~{worst * grey:.0f} grey levels), mean {mean:.4f} "
                      f"(~{mean * grey:.1f} grey levels)")
        rows = ["| decoder | device | DALI batch x threads x pipelines | frames | size | workers | clips/s |"
                + (" x step |" if args.step_clips_per_s else ""),
                "|---|---|---|---:|---:|---:|---:|" + ("---:|" if args.step_clips_per_s else "")]
        runs = [(d, s) for d in decoders for s in (args.dali if d == "dali" else [None])]
        for decoder, dali in runs:
            for t in frames_list:
                cfg = DataConfig(train=index, num_frames=t, img_size=args.size, decoder=decoder, num_workers=workers,
                                 shuffle_buffer=16)
                rate = clips_per_second(cfg, args.batch_size, clips, cuda, dali)
                where = ("gpu" if cuda else "cpu backend") if decoder == "dali" else "cpu"
                how = f"{dali.batch} x {dali.threads} x {dali.pipelines}" if dali else "-"
                row = f"| {decoder} | {where} | {how} | {t} | {args.size} | {workers} | {rate:.1f} |"
                if args.step_clips_per_s:
                    row += f" {rate / args.step_clips_per_s:.1f} |"
                rows.append(row)
                print(row, file=sys.stderr, flush=True)  # progress; the table follows on stdout
        print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
