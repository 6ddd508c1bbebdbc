"""The demo's CLIP teacher: a small open_clip model trained briefly on the synthetic corpus, then saved and frozen.

Stage 1 aligns the student to a CLIP teacher's patch features. With no hub access there is no pretrained CLIP, and
random targets would teach nothing; so the demo first trains a tiny open_clip model (ViT 128 wide, 4 blocks, 16 px
patches; a 3-block text tower) contrastively on frames of its own training clips and their captions for a minute or
two on a CPU, and saves it the way open_clip does (``{"state_dict": ...}`` plus the model config JSON ``tiny-clip.json``
beside it), so that `pipeline.models.teacher.build_teacher` loads it through open_clip's own API like any other CLIP.

A tenth of the clips are held out: the metrics JSON beside the checkpoint gives the contrastive loss at the start
and the end, and image->text top-1 on training and held-out frames (with chance level), so one can see that the
teacher learnt something (its features tell colours, shapes, counts and backgrounds apart).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass

import fsspec
import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from pipeline.data.decode import VideoSource
from pipeline.data.transforms import centre_box, clip_plan, planned_clip, ClipPlan
from pipeline.engine.schedule import lr_factor
from pipeline.losses import contrastive_loss

TINY_CLIP_NAME = "tiny-clip"
FRAMES_PER_CLIP = 8  # frames decoded per clip (evenly spread); each step samples one of them per clip
HOLD_OUT_EVERY = 10  # every 10th clip is held out for the retrieval check
BATCH = 48


def tiny_clip_config(img_size: int) -> dict:
    """Returns the open_clip model config of the tiny CLIP (16 px patches at `img_size`)."""
    return {
        "embed_dim": 128,
        "vision_cfg": {"image_size": img_size, "layers": 4, "width": 128, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3},
    }


def save_open_clip(model: torch.nn.Module, name: str, model_cfg: dict, out_file: str, **extra) -> str:
    """Writes `model` in open_clip's checkpoint format to `out_file` and its config to `<name>.json` beside it.

    Both go through fsspec; the checkpoint is written aside and renamed, so it is complete or absent.
    """
    fs, path = fsspec.core.url_to_fs(out_file)
    folder = os.path.dirname(path)
    fs.makedirs(folder, exist_ok=True)
    with fs.open(os.path.join(folder, f"{name}.json"), "w") as f:
        json.dump(model_cfg, f, indent=2)
    with fs.open(path + ".tmp", "wb") as f:
        torch.save({"name": name, "state_dict": model.state_dict(), **extra}, f)
    fs.mv(path + ".tmp", path)
    return out_file


@dataclass
class FramePool:
    """Decoded frames of a set of clips: uint8 (clips, FRAMES_PER_CLIP, H, W, 3) and each clip's captions."""

    frames: np.ndarray
    captions: list[list[str]]


def train_tiny_clip(videos_jsonl: str, out_file: str, steps: int = 300, img_size: int = 64, seed: int = 0,
                    lr: float = 2e-3, log_every: int = 50) -> str:
    """Trains the tiny CLIP on frames of the clips in `videos_jsonl` and saves it to `out_file`; returns the path.

    Writes `<out_file without extension>_metrics.json` beside it (loss at start and end, retrieval top-1).
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    train, held_out = _frame_pools(videos_jsonl)
    model_cfg = tiny_clip_config(img_size)
    model = _created_model(model_cfg)
    tokenizer = open_clip.get_tokenizer(TINY_CLIP_NAME)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.98))
    started = time.perf_counter()
    losses = []
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:  # linear warm-up over the first 10% of steps, then cosine to zero
            group["lr"] = lr * lr_factor(step, lr, 0.0, max(1, steps // 10), steps)
        images, texts = _train_batch(train, img_size, rng)
        loss = contrastive_loss(F.normalize(model.encode_image(images), dim=-1),
                                F.normalize(model.encode_text(tokenizer(texts)), dim=-1),
                                1.0 / model.logit_scale.exp())  # CLIP's logit scale is 1 / temperature
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"[teacher] step {step + 1}/{steps} loss {np.mean(losses[-log_every:]):.3f}", flush=True)
    metrics = {
        "steps": steps, "seconds": round(time.perf_counter() - started, 1),
        "loss_first10": float(np.mean(losses[:10])), "loss_last10": float(np.mean(losses[-10:])),
        "train": retrieval_top1(model, tokenizer, train, img_size),
        "held_out": retrieval_top1(model, tokenizer, held_out, img_size),
    }
    model.eval()
    save_open_clip(model, TINY_CLIP_NAME, model_cfg, out_file, steps=steps, metrics=metrics)
    with fsspec.open(os.path.splitext(out_file)[0] + "_metrics.json", "w") as f:
        json.dump(metrics, f, indent=2)
    print(f"[teacher] loss {metrics['loss_first10']:.3f} -> {metrics['loss_last10']:.3f}; image->text top-1 "
          f"train {metrics['train']['top1']:.2f} (chance {metrics['train']['chance']:.3f}), held-out "
          f"{metrics['held_out']['top1']:.2f} (chance {metrics['held_out']['chance']:.3f}); saved {out_file}",
          flush=True)
    return out_file


@torch.no_grad()
def retrieval_top1(model: torch.nn.Module, tokenizer, pool: FramePool, img_size: int) -> dict:
    """Returns image->text top-1 of every frame of `pool` against the first caption of each of its clips.

    Clips whose first captions are equal count as one class (the frame is right if it picks any of them).
    """
    model.eval()
    texts = [c[0] for c in pool.captions]
    text = F.normalize(model.encode_text(tokenizer(texts)), dim=-1)
    clips, frames = pool.frames.shape[:2]
    flat = pool.frames.reshape(clips * frames, *pool.frames.shape[2:])
    picked = torch.cat([(F.normalize(model.encode_image(_frames_tensor(flat[i:i + 256], img_size)), dim=-1) @ text.T)
                        .argmax(dim=-1) for i in range(0, len(flat), 256)])
    hits = sum(texts[j] == texts[i // frames] for i, j in enumerate(picked.tolist()))
    model.train()
    return {"top1": hits / (clips * frames), "chance": 1.0 / len(set(texts)), "clips": clips, "frames": clips * frames}


def _created_model(model_cfg: dict) -> torch.nn.Module:
    """Returns a fresh tiny CLIP that open_clip builds from `model_cfg` (registered under TINY_CLIP_NAME)."""
    with tempfile.TemporaryDirectory(prefix="tiny_clip_") as folder:
        path = os.path.join(folder, f"{TINY_CLIP_NAME}.json")
        with open(path, "w") as f:
            json.dump(model_cfg, f)
        open_clip.add_model_config(path)
    return open_clip.create_model(TINY_CLIP_NAME, pretrained=None)


def _frame_pools(videos_jsonl: str) -> tuple[FramePool, FramePool]:
    """Returns the decoded frames of the training clips and of the held-out clips of the manifest."""
    root = videos_jsonl.rsplit("/", 1)[0] if "/" in videos_jsonl else "."
    with fsspec.open(videos_jsonl, "r") as f:
        records = [json.loads(line) for line in f if line.strip()]
    if len(records) < 2 * HOLD_OUT_EVERY:
        raise ValueError(f"{videos_jsonl}: {len(records)} clips; the teacher warm-up needs at least "
                         f"{2 * HOLD_OUT_EVERY}")
    frames, captions = [], []
    for record in records:
        with fsspec.open(f"{root}/{record['path']}", "rb") as f:
            data = f.read()
        with VideoSource(data) as video:
            indices = np.linspace(0, video.info.frames - 1, FRAMES_PER_CLIP).round().astype(int).tolist()
            frames.append(video.frames(indices))
        captions.append(list(record["captions"]))
    held = np.arange(len(records)) % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1
    stacked = np.stack(frames)
    return (FramePool(stacked[~held], [c for c, h in zip(captions, held) if not h]),
            FramePool(stacked[held], [c for c, h in zip(captions, held) if h]))


def _train_batch(pool: FramePool, img_size: int, rng: np.random.Generator) -> tuple[torch.Tensor, list[str]]:
    """Returns BATCH distinct clips' frames (one random frame, random crop and flip each) and one caption each."""
    clips = rng.choice(len(pool.captions), size=min(BATCH, len(pool.captions)), replace=False)
    height, width = pool.frames.shape[2:4]
    images, texts = [], []
    for c in clips:
        # a CLIP is trained on CLIP-normalized images (open_clip's), with the multimodal recipes' crop
        plan = clip_plan(FRAMES_PER_CLIP, 0.0, width, height, 1, img_size, True, None, rng, crop="random_resized",
                         normalize="clip")
        frame = torch.from_numpy(pool.frames[c, list(plan.indices)])
        images.append(planned_clip(frame, plan)[:, 0])
        texts.append(pool.captions[c][rng.integers(len(pool.captions[c]))])
    return torch.stack(images), texts


def _frames_tensor(frames: np.ndarray, img_size: int) -> torch.Tensor:
    """Returns (T, 3, S, S) CLIP-normalized centre crops of uint8 frames (T, H, W, 3)."""
    height, width = frames.shape[1:3]
    plan = ClipPlan(tuple(range(len(frames))), centre_box(width, height), False, img_size)
    return planned_clip(torch.from_numpy(np.ascontiguousarray(frames)), plan).transpose(0, 1)
