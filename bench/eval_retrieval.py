"""The whole zero-shot retrieval evaluation at MSRVTT-1k scale on a GPU, and where its time goes.

    python -m bench.eval_retrieval [--videos 1000] [--frames 8] [--size 224] [--k-test 128] [--batch 64]
                                   [--rerank-batch 512] [--workers 16] [--decoder auto|cpu|dali] [--runs 2]
                                   [--text-size bert-base|small] [--keep DIR] [--quick]

(from the repository root; or `videomamba bench eval_retrieval -- ARGS`; `--full` is needed there, else --quick.)

A synthetic set shaped like MSRVTT's 1k-A test: `--videos` real mp4 files (H.264, `--frames` frames at `--size`²,
8 fps; a moving square on a gradient, each video its own colours), written first with all CPU cores and not timed,
and one caption per video in UMT's json (msrvtt_ret_test1k.json). The model: VideoMamba-M (32 layers, width 576)
with a text encoder shaped like BERT-base (12 layers of width 768, 12 heads, 30,522 ids, the last 3 cross-attending
to the video, as UMT's BERT with fusion_layer 9; a WordPiece vocabulary from the captions), random weights,
bf16 autocast (the evaluation's own). Then `pipeline.eval.retrieval.scored_retrieval`, exactly what `videomamba eval`
runs after loading the model: decode (DALI when installed, else PyAV in `--workers` processes), encode the videos
and the texts, the similarity, UMT's re-ranking with k_test both ways, the metrics. Timed after the model is built
and on the GPU; the first run includes the kernels' compilation and autotuning, so `--runs 2` times a second one.
Prints the wall time of each run and its split: decode (waiting for frames), video encoding, text encoding,
similarity, re-rank (with the number of (text, video) pairs scored), metrics. `--quick` (what `videomamba bench`
passes): 16 videos of 4 frames at 64², the small text encoder, k_test 8, one run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

from pipeline.config import RetrievalConfig, VideoTextStageConfig
from pipeline.eval.annotations import read_annotations
from pipeline.eval.models import VideoMambaRetrieval
from pipeline.eval.retrieval import scored_retrieval
from pipeline.models.factory import build_video_text_model
from pipeline.models.text import build_tiny_bert
from shards.synth import encode_mp4

WORDS = ("a man woman dog cat car ball red blue green walks runs plays sings cooks talks about the on in with "
         "kitchen street park song video game news people two small large").split()
# random BERTs (pipeline.models.text.build_tiny_bert) and where their fusion starts
TEXT_SIZES = {"bert-base": dict(hidden=768, layers=12, heads=12, embedding_rows=30522, fusion_layer=9, embed_dim=512),
              "small": dict(hidden=256, layers=6, heads=4, embedding_rows=None, fusion_layer=4, embed_dim=256)}


def synthetic_video(index: int, frames: int, size: int) -> bytes:
    """Returns the mp4 bytes of video `index`: a gradient in its own colours and a square crossing it."""
    rng = np.random.default_rng(index)
    colour, other = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    ramp = np.linspace(0.0, 1.0, size)[None, :, None]
    background = (colour * (1 - ramp) + other * ramp).astype(np.uint8)
    clip = np.broadcast_to(background, (frames, size, size, 3)).copy()
    side = size // 4
    for t in range(frames):
        left = (size - side) * t // max(frames - 1, 1)
        clip[t, size // 2 - side // 2:size // 2 + side // 2, left:left + side] = 255 - colour
    return encode_mp4(clip, fps=8)


def _write_video(job: tuple[str, int, int, int]) -> None:
    folder, index, frames, size = job
    with open(os.path.join(folder, f"video{index}.mp4"), "wb") as f:
        f.write(synthetic_video(index, frames, size))


def write_set(folder: str, count: int, frames: int, size: int, workers: int) -> str:
    """Writes the videos and msrvtt_ret_test1k.json under `folder`; returns the annotations' path."""
    videos = os.path.join(folder, "videos")
    os.makedirs(videos, exist_ok=True)
    with ProcessPoolExecutor(max(1, workers)) as pool:
        list(pool.map(_write_video, [(videos, i, frames, size) for i in range(count)], chunksize=16))
    rng = np.random.default_rng(0)
    entries = [{"video": f"video{i}.mp4", "caption": " ".join(rng.choice(WORDS, int(rng.integers(6, 14))))}
               for i in range(count)]
    path = os.path.join(folder, "msrvtt_ret_test1k.json")
    with open(path, "w") as f:
        json.dump(entries, f)
    return path


def built_model(frames: int, size: int, text_size: str, device: torch.device) -> tuple[torch.nn.Module, object, int]:
    shape = dict(TEXT_SIZES[text_size])
    cfg = VideoTextStageConfig()
    cfg.model.size = "middle"
    cfg.text.fusion_layer, cfg.text.embed_dim = shape.pop("fusion_layer"), shape.pop("embed_dim")
    with tempfile.TemporaryDirectory() as bert_dir:
        cfg.text.pretrained = build_tiny_bert([" ".join(WORDS)] * 4, bert_dir, max_positions=512, **shape)
        model, tokenizer = build_video_text_model(cfg, frames, size)
    return model.to(device).eval(), tokenizer, cfg.text.max_len


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=1000)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--k-test", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64, help="videos per forward (eval.batch_size)")
    parser.add_argument("--rerank-batch", type=int, default=512, help="pairs per fusion call (eval.rerank_batch)")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--decoder", default="auto", choices=("auto", "cpu", "dali"))
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--text-size", default="bert-base", choices=tuple(TEXT_SIZES))
    parser.add_argument("--keep", metavar="DIR", help="write the set here (and keep it) instead of a temporary folder")
    parser.add_argument("--quick", action="store_true", help="a small run that checks the script (see above)")
    args = parser.parse_args()
    if args.quick:
        args.videos, args.frames, args.size, args.text_size, args.k_test, args.runs = 16, 4, 64, "small", 8, 1
        args.batch, args.workers = 8, min(args.workers, 2)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        print("note: no GPU here; this runs on the CPU and its times say nothing about the target")

    folder = args.keep or tempfile.mkdtemp(prefix="bench_eval_")
    try:
        timed_runs(args, folder, device)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


def timed_runs(args: argparse.Namespace, folder: str, device: torch.device) -> None:
    started = time.perf_counter()
    annotations = write_set(folder, args.videos, args.frames, args.size, args.workers)
    print(f"synthetic set: {args.videos} mp4s of {args.frames} frames at {args.size}² written in "
          f"{time.perf_counter() - started:.1f} s (not timed below) under {folder}")
    started = time.perf_counter()
    model, tokenizer, max_len = built_model(args.frames, args.size, args.text_size, device)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"model: VideoMamba-M + {args.text_size}-shaped text encoder ({params:.0f} M parameters) built in "
          f"{time.perf_counter() - started:.1f} s (not timed below)")

    cfg = RetrievalConfig()
    cfg.data.num_frames, cfg.data.img_size = args.frames, args.size
    cfg.eval.batch_size, cfg.eval.rerank_k, cfg.eval.rerank_batch = args.batch, args.k_test, args.rerank_batch
    cfg.eval.num_workers, cfg.eval.decoder = args.workers, args.decoder
    ann = read_annotations(annotations, "msrvtt")
    for run in range(1, args.runs + 1):
        wrapper = VideoMambaRetrieval(model, tokenizer, max_len, device)
        started = time.perf_counter()
        evaluation = scored_retrieval(wrapper, cfg, ann, os.path.join(folder, "videos"), device, progress=False)
        wall = time.perf_counter() - started
        timing = evaluation.result["timing"]
        t2v = evaluation.scores.t2v
        pairs = int((t2v > -100).sum() + (evaluation.scores.v2t > -100).sum()) if t2v is not None else 0
        split = ", ".join(f"{k} {v:.2f} s" for k, v in timing.items())
        print(f"run {run}: {wall:.1f} s wall for {len(ann.videos)} videos, {len(ann.texts)} texts, k_test "
              f"{args.k_test} both ways ({pairs} ranked pairs, each distinct pair scored once); {split}; "
              f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else
              f"run {run}: {wall:.1f} s wall; {split}")


if __name__ == "__main__":
    main()
