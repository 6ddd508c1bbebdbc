"""Fixtures of the data tests: real tar shards of real mp4s (PyAV) and their index.json, written in tmp dirs."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import DataConfig

from data_shard_files import ShardWriter


@pytest.fixture(scope="session")
def clip_h264(tmp_path_factory, make_mp4_session) -> bytes:
    return make_mp4_session(tmp_path_factory.mktemp("clips") / "h264.mp4", frames=8, size=32).read_bytes()


@pytest.fixture(scope="session")
def clip_vp9(tmp_path_factory, make_mp4_session) -> bytes:
    return make_mp4_session(tmp_path_factory.mktemp("clips") / "vp9.mp4", frames=8, size=32, codec="vp9").read_bytes()


@pytest.fixture(scope="session")
def make_mp4_session():
    from shards.synth import encode_mp4

    def write(path: Path, frames: int = 8, size: int = 32, codec: str = "h264") -> Path:
        clip = np.zeros((frames, size, size, 3), np.uint8)
        for i in range(frames):
            clip[i] = 30 + 200 * i // max(frames - 1, 1)
            clip[i, size // 4: size // 2, (size - 8) * i // max(frames - 1, 1):][:, :8] = (255, 0, 0)
        path.write_bytes(encode_mp4(clip, fps=8, codec=codec))
        return path

    return write


@pytest.fixture(scope="session")
def jpg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((24, 40, 3), 200, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def shard_writer(tmp_path, clip_h264, jpg_bytes) -> ShardWriter:
    return ShardWriter(tmp_path, clip_h264, jpg_bytes)


@pytest.fixture
def data_cfg():
    """Returns DataConfig(**overrides) with tiny clips and the CPU decoder."""

    def make(train: str, **overrides) -> DataConfig:
        base = dict(train=train, num_frames=4, img_size=32, decoder="cpu", num_workers=0, shuffle_buffer=8)
        base.update(overrides)
        return DataConfig(**base)

    return make
