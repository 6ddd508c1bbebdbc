"""Shared fixtures: tiny real media written once, in tmp dirs, with nothing downloaded.

- `make_mp4(path, frames=8, size=32, codec="h264", fps=8)` writes a real mp4 and returns its path. Frame i is a flat
  grey of level 30 + 180 * i / (frames - 1) (within a few levels after decoding), so a decoder test can tell which
  frames it got, with a white square moving left to right across the middle rows (the corners stay grey). `size`
  is an int (square) or (width, height), both even. `codec` is "h264" or "vp9".
- `synth_corpus` is the directory of a small synthetic corpus (`shards.synth.write_corpus`), written once per test
  session: 12 training videos (8 frames, 64 px, h264, 8 fps), 6 images, 8 held-out eval videos; see
  docs/CONTRACTS.md. Its settings are in `synth_corpus / "corpus.json"`. Treat it as read-only; copy it first to
  change anything.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np
import pytest

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
