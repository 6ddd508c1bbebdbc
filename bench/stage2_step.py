"""Stage 2's model as the paper trains it, one forward+backward per step on a GPU: VideoMamba-M (8 x 224 px, 20% of
the tokens visible: a random mask, as no teacher runs here) with a BERT-base-shaped text encoder (random weights, nothing
downloaded; layers 9-11 cross-attend to the video), the official VTC + VTM (hard negatives) + MLM (0.5) through
`pipeline.objectives.VideoTextObjective`, bf16 autocast. A smoke test of the whole stage-2 model on CUDA, and its
time and peak memory per step.

    python -m bench.stage2_step [--size middle] [--batch 16] [--frames 8] [--steps 5] [--backend triton]

The WordPiece vocabulary is built from a few captions (the model keeps BERT-base's 30,522 ids); the video is random.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from pipeline.models.factory import build_video_text_model
from pipeline.models.text import build_tiny_bert
from pipeline.objectives import VideoTextObjective

CAPTIONS = ["a man is playing a guitar on a stage", "two dogs run across a green field",
            "a woman cooks pasta in a small kitchen", "cars drive along a highway at night"]


class _Config:
    """The parts of a VideoTextStageConfig that the builder reads."""

    def __init__(self, size: str, backend: str, bert_dir: str):
        from pipeline.config import ModelConfig, TextConfig
        self.model = ModelConfig(size=size, scan_backend=backend)
        self.text = TextConfig(pretrained=bert_dir)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="middle")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as bert_dir:
        # BERT-base's shape (768 x 12 layers, 12 heads, 30,522 ids, 512 positions) with random weights
        build_tiny_bert(CAPTIONS * 8, bert_dir, hidden=768, layers=12, heads=12, max_positions=512,
                        embedding_rows=30522)
        model, tokenizer = build_video_text_model(_Config(args.size, args.backend, bert_dir), args.frames,
                                                  args.img_size)
    model.to(device).train()
    grid = model.backbone.patch_grid
    objective = VideoTextObjective(tokenizer, 32, grid, "random", 0.8, {"vtc": 1.0, "vtm": 1.0, "mlm": 1.0}, 0.5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    params = sum(p.numel() for p in model.parameters())
    text_params = sum(p.numel() for p in model.text_encoder.parameters())
    print(f"{device}: VideoMamba-{args.size} + BERT-base-shaped text encoder: {params / 1e6:.1f}M parameters "
          f"({text_params / 1e6:.1f}M text), batch {args.batch} x {args.frames} x {args.img_size} px", flush=True)
    for step in range(args.steps):
        batch = {"video": torch.randn(args.batch, 3, args.frames, args.img_size, args.img_size, device=device),
                 "text": [CAPTIONS[i % len(CAPTIONS)] for i in range(args.batch)],
                 "key": [f"sample-{step}-{i}" for i in range(args.batch)]}
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss, parts = objective(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else 0.0
        print(f"step {step}: loss {loss.item():.3f} {' '.join(f'{k} {v:.3f}' for k, v in parts.items())} "
              f"{time.perf_counter() - start:.2f} s, peak {peak:.1f} GiB, parameters without gradient: "
              f"{len(missing)}{' ' + str(missing[:3]) if missing else ''}", flush=True)
        if not torch.isfinite(loss):
            raise SystemExit("the loss is not finite")


if __name__ == "__main__":
    main()
