"""Fixtures of the shard tests: a small corpus of real media with one input of every kind of bad."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from PIL import Image

# (key, media path relative to the manifest or a URL, captions, reason it must fail or None)
MIXED_ROWS = [
    ("v0", "videos/v0.mp4", ["a red square moves right", "red square"], None),
    ("v1", "videos/v1.mp4", ["two blue circles"], None),
    ("corrupt", "videos/corrupt.mp4", ["never decodes"], "corrupt_video"),
    ("i0", "images/i0.jpg", ["a green field"], None),
    ("empty", "videos/empty.mp4", ["zero bytes"], "empty_file"),
    ("v2", "videos/v2.mp4", ["a yellow triangle"], None),
    ("gone", "videos/gone.mp4", ["this file was never written"], "missing_file"),
    ("nocap", "videos/v3.mp4", ["", "  "], "empty_caption"),
    ("offline", "http://127.0.0.1:{port}/clip.mp4", ["nothing listens there"], "unreachable"),
    ("i1", "images/i1.jpg", ["a white sky"], None),
    ("badjpg", "images/bad.jpg", ["a cut-off jpeg"], "corrupt_image"),
    ("v4", "videos/v4.mp4", ["the last clip"], None),
]


def closed_port() -> int:
    """Returns a local TCP port that nothing listens on (bound once, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_jpg(path: Path, color: str, size=(40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format="JPEG")
    return path


def write_mixed_media(root: Path, make_mp4) -> None:
    """Writes the media files MIXED_ROWS names (the good ones, a corrupt and an empty mp4, a truncated jpg)."""
    for i in range(5):
        make_mp4(root / "videos" / f"v{i}.mp4", frames=8, size=32)
    (root / "videos" / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    (root / "videos" / "empty.mp4").write_bytes(b"")
    write_jpg(root / "images" / "i0.jpg", "green")
    write_jpg(root / "images" / "i1.jpg", "white")
    full = write_jpg(root / "images" / "full.jpg", "blue", size=(64, 48)).read_bytes()
    (root / "images" / "bad.jpg").write_bytes(full[: len(full) // 2])


def mixed_records(port: int) -> list[dict]:
    return [{"key": key, "path": path.format(port=port), "captions": caps, "duration": 1.0, "source": "test"}
            for key, path, caps, _ in MIXED_ROWS]


def expected_failures() -> dict[int, str]:
    """{row: reason} for the rows of MIXED_ROWS that must fail."""
    return {i: reason for i, (_, _, _, reason) in enumerate(MIXED_ROWS) if reason}


@pytest.fixture
def mixed_corpus(tmp_path, make_mp4) -> Path:
    """A JSONL manifest (tmp/corpus/manifest.jsonl) over MIXED_ROWS with the media beside it."""
    root = tmp_path / "corpus"
    write_mixed_media(root, make_mp4)
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in mixed_records(closed_port())))
    return manifest
