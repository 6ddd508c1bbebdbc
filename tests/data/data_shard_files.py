"""Helpers of the data tests: tars of `{key}.{ext}` members and shard sets with their index.json."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path


def tar_bytes(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    """Returns a tar holding `{key}.{ext}` members for each (key, {ext: bytes}) in order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sample_files(media: bytes, ext: str, key: str, captions) -> dict[str, bytes]:
    files = {ext: media}
    if captions is not None:
        files["txt"] = captions[0].encode()
        files["json"] = json.dumps({"captions": captions, "key": key}).encode()
    return files


class ShardWriter:
    """Writes shard sets: `corpus(name, shards, per_shard, media="video", ...)` -> the path of its index.json."""

    def __init__(self, root: Path, clip: bytes, image: bytes):
        self.root, self.clip, self.image = root, clip, image

    def corpus(self, name: str, shards: int, per_shard: int, media: str = "video", clip: bytes | None = None,
               special: dict[str, dict[str, bytes]] | None = None) -> str:
        """Keys are f"{name}{i:04d}"; `special` replaces the files of the named keys (corrupt samples)."""
        out = self.root / name
        out.mkdir(parents=True, exist_ok=True)
        data, ext = (clip or self.clip, "mp4") if media == "video" else (self.image, "jpg")
        entries = []
        for s in range(shards):
            samples = []
            for j in range(per_shard):
                key = f"{name}{s * per_shard + j:04d}"
                files = sample_files(data, ext, key, [f"caption a of {key}", f"caption b of {key}"])
                samples.append((key, (special or {}).get(key, files)))
            url = f"{name}-{s:06d}.tar"
            (out / url).write_bytes(tar_bytes(samples))
            entries.append({"url": url, "samples": per_shard})
        (out / "index.json").write_text(json.dumps({"shards": entries, "media": media}))
        return str(out / "index.json")
