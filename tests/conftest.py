"""Shared fixtures: tiny real media written once, in tmp dirs, with nothing downloaded.

- `make_mp4(path, frames=8, size=32, codec="h264", fps=8)` writes a real mp4 and returns its path. Frame i is a flat
  grey of level 30 + 180 * i / (frames - 1) (within a few levels after decoding), so a decoder test can tell which
  frames it got, with a white square moving left to right across the middle rows (the corners stay grey). `size`
  is an int (square) or (width, height), both even. `codec` is "h264" or "vp9".
- `synth_corpus` is the directory of a small synthetic corpus (`shards.synth.write_corpus`), written once per test
  session: 12 training videos (8 frames, 64 px, h264, 8 fps), 6 images, 8 held-out eval videos; see
  docs/CONTRACTS.md. Its settings are in `synth_corpus / "corpus.json"`. Treat it as read-only; copy it first to
  change anything.
- `tiny_clip(folder, name, image_size=32, embed_dim=48, patch_size=16)` registers a tiny open_clip CLIP config (its
  `<name>.json` written in `folder`, as open_clip keeps custom configs beside checkpoints) and returns the model,
  seeded, with random weights: a real open_clip model for loading-path tests, never presented as a trained teacher.
- `tiny_bert_dir` is a tiny BERT in the transformers layout (`pipeline.models.text.build_tiny_bert`: a WordPiece
  vocabulary from a few captions, hidden 32, 3 layers, 2 heads, random weights), written once per test session; what
  `text.pretrained` names in tests. Read-only.
- `one_thread` runs a test's torch work on one thread: on a shared 2-core machine two OpenMP threads spin against
  other processes and make tiny models many times slower; one thread is fast under any load.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union

import numpy as np
import pytest
import torch

from shards.synth import encode_mp4

Size = Union[int, tuple[int, int]]


def mp4_frame_level(index: int, frames: int) -> int:
    """Returns the grey level (0-255) of frame `index` of a `make_mp4` clip of `frames` frames."""
    return int(round(30 + 180 * index / max(frames - 1, 1)))


def mp4_test_frames(frames: int, size: Size) -> np.ndarray:
    """Returns the (T, H, W, 3) uint8 RGB frames `make_mp4` encodes."""
    width, height = (size, size) if isinstance(size, int) else size
    clip = np.empty((frames, height, width, 3), np.uint8)
    side = max(2, min(width, height) // 4)
    for i in range(frames):
        clip[i] = mp4_frame_level(i, frames)
        left = (width - side) * i // max(frames - 1, 1)
        clip[i, height // 2 - side // 2: height // 2 - side // 2 + side, left: left + side] = 255
    return clip


def write_mp4(path: Union[str, os.PathLike], frames: int = 8, size: Size = 32, codec: str = "h264",
              fps: int = 8) -> Path:
    """Writes the `make_mp4` test clip to `path` (parents created) and returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_mp4(mp4_test_frames(frames, size), fps=fps, codec=codec))
    return path


@pytest.fixture
def make_mp4():
    """The `write_mp4` function: `make_mp4(tmp_path / "a.mp4", frames=8, size=32, codec="h264"|"vp9", fps=8)`."""
    return write_mp4


# The session corpus: small enough to write in a couple of seconds, big enough to cover every attribute value.
SYNTH_CORPUS = dict(videos=12, images=6, seed=0, codec="h264", size=64, frames=8, fps=8, eval_videos=8)


@pytest.fixture(scope="session")
def synth_corpus(tmp_path_factory) -> Path:
    """The directory of a synthetic corpus written once per session with `SYNTH_CORPUS`'s settings (read-only)."""
    from shards.synth import write_corpus

    out = tmp_path_factory.mktemp("synth_corpus")
    write_corpus(str(out), workers=1, progress=False, **SYNTH_CORPUS)
    return out


def tiny_clip_config(image_size: int = 32, embed_dim: int = 48, patch_size: int = 16) -> dict:
    """Returns an open_clip model config of a 2-layer ViT and a 1-layer text tower."""
    return {"embed_dim": embed_dim,
            "vision_cfg": {"image_size": image_size, "layers": 2, "width": 64, "head_width": 16,
                           "patch_size": patch_size},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def tiny_clip(folder: Union[str, os.PathLike], name: str, **config):
    """Writes `folder/<name>.json` (a `tiny_clip_config(**config)`), registers it with open_clip and returns the model
    created from it with seed 0."""
    import open_clip

    path = Path(folder) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(tiny_clip_config(**config)))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    return open_clip.create_model(name, pretrained=None)


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY_BERT_CAPTIONS = ["a red ball rolls to the left", "two blue squares move up slowly",
                      "a green circle spins on a white background", "the yellow triangle jumps to the right"]


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> str:
    from pipeline.models.text import build_tiny_bert
    return build_tiny_bert(TINY_BERT_CAPTIONS * 4, str(tmp_path_factory.mktemp("tiny_bert")), hidden=32, layers=3,
                           heads=2, max_positions=64)
