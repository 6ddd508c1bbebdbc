"""One shard: read, validate and optionally process its rows, write a deterministic tar, publish it atomically.

`write_shard` is the body of one Ray task and knows nothing about Ray. The tar is built in a local file and becomes
visible under its final name only when complete: on a local disk it is renamed into place, on an object store the
finished file is uploaded in one put. After the tar, a sidecar `{prefix}-{i:06d}.json` records the shard's index entry
and failures; a shard counts as complete only when both exist (see `shards.index.completed_shards`).

The tar bytes depend only on the rows and the options (fixed member order, times, owners and modes; JSON with sorted
keys), so a run that was killed and resumed ends with the same shards, sha256 and index as an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Optional, Union

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from shards.manifest import ManifestRow, extension, media_kind
from shards.media import MediaError, MediaInfo, ProcessOptions, RetryPolicy, process_image, process_video, \
    read_bytes, retried, validate

PROCESS_LOCAL_PROTOCOLS = ("memory",)  # filesystems that live inside one process: the driver does their I/O
TAR_MTIME = 0  # fixed member times keep the tar bytes reproducible


@dataclass(frozen=True)
class ShardPlan:
    """Shard `index` holds manifest rows [first_row, end_row); `fingerprint` changes when its rows or options do."""

    index: int
    name: str
    rows: tuple[ManifestRow, ...]
    first_row: int
    end_row: int
    fingerprint: str

    @property
    def sidecar(self) -> str:
        return self.name.rsplit(".", 1)[0] + ".json"


@dataclass(frozen=True)
class ShardOptions:
    out: str  # the output folder URL
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    process: ProcessOptions = field(default_factory=ProcessOptions)


@dataclass
class ShardResult:
    """What one task returns: the index entry, the failures, sample counts by media kind; `tar` holds the bytes only
    when the output filesystem is process-local and the driver must publish them."""

    entry: dict
    failures: list[dict]
    kinds: dict
    fingerprint: str
    tar: Optional[bytes] = None

    def sidecar_record(self) -> dict:
        return {"entry": self.entry, "failures": self.failures, "kinds": self.kinds, "fingerprint": self.fingerprint}


Prefetched = dict[int, Union[bytes, MediaError]]


def is_process_local(url: str) -> bool:
    return url.split("://", 1)[0] in PROCESS_LOCAL_PROTOCOLS if "://" in url else False


def prefetch(plan: ShardPlan, retry: RetryPolicy) -> Prefetched:
    """Returns the bytes (or the error) of the plan's process-local media, read here because a task cannot see them."""
    out: Prefetched = {}
    for row in plan.rows:
        if row.error is None and row.media and is_process_local(row.media):
            try:
                out[row.row] = read_bytes(row.media, retry)
            except MediaError as e:
                out[row.row] = e
    return out


# ---------------------------------------------------------------------------------------------------------- task body
def write_shard(plan: ShardPlan, opts: ShardOptions, prefetched: Optional[Prefetched] = None) -> ShardResult:
    """Builds and publishes one shard; returns its result. Bad rows become failures; only storage errors on the
    output side raise (the driver then reports the shard as failed and a rerun retries it)."""
    fs, out_dir = url_to_fs(opts.out)
    local_out = isinstance(fs, LocalFileSystem)
    tmp_dir = out_dir if local_out else None
    fd, tmp = tempfile.mkstemp(prefix=f".{plan.name}.tmp-", dir=tmp_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            failures, kinds = _write_tar(f, plan, opts, prefetched or {})
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the shard is meant to be read by others
        result = ShardResult(_entry(plan, tmp, sum(kinds.values())), failures, kinds, plan.fingerprint)
        if is_process_local(opts.out):
            with open(tmp, "rb") as f:
                result.tar = f.read()
            return result
        final = f"{out_dir.rstrip('/')}/{plan.name}"
        if local_out:
            os.replace(tmp, final)
        else:
            retried(partial(fs.put_file, tmp, final), opts.retry)
        retried(partial(write_sidecar, fs, f"{out_dir.rstrip('/')}/{plan.sidecar}", result), opts.retry)
        return result
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def publish_from_driver(result: ShardResult, plan: ShardPlan, out: str) -> None:
    """Publishes a shard whose bytes came back from the task (process-local outputs such as memory://)."""
    fs, out_dir = url_to_fs(out)
    fs.pipe_file(f"{out_dir.rstrip('/')}/{plan.name}", result.tar)
    result.tar = None
    write_sidecar(fs, f"{out_dir.rstrip('/')}/{plan.sidecar}", result)


def write_sidecar(fs, path: str, result: ShardResult) -> None:
    fs.pipe_file(path, json.dumps(result.sidecar_record(), sort_keys=True).encode())


def _entry(plan: ShardPlan, tar_path: str, samples: int) -> dict:
    digest = hashlib.sha256()
    with open(tar_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"url": plan.name, "samples": samples, "bytes": os.path.getsize(tar_path), "sha256": digest.hexdigest(),
            "rows": [plan.first_row, plan.end_row]}


def _write_tar(f, plan: ShardPlan, opts: ShardOptions, prefetched: Prefetched) -> tuple[list[dict], dict]:
    failures: list[dict] = []
    kinds: dict[str, int] = {}
    with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for row in plan.rows:
            try:
                files, kind = sample_files(row, opts, prefetched.get(row.row))
            except MediaError as e:
                failures.append(failure_record(row, plan.name, e.reason, e.detail))
                continue
            except Exception as e:  # noqa: BLE001 - an unexpected error with one row must not stop the shard
                failures.append(failure_record(row, plan.name, "internal_error", f"{type(e).__name__}: {e}"))
                continue
            for name, data in files:
                _add_member(tar, name, data)
            kinds[kind] = kinds.get(kind, 0) + 1
    return failures, kinds


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = TAR_MTIME
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def failure_record(row: ManifestRow, shard: str, reason: str, detail: str) -> dict:
    return {"row": row.row, "key": row.key, "media": row.media, "shard": shard, "reason": reason, "detail": detail}


# ------------------------------------------------------------------------------------------------------ one sample
def sample_files(row: ManifestRow, opts: ShardOptions, prefetched: Union[bytes, MediaError, None] = None
                 ) -> tuple[list[tuple[str, bytes]], str]:
    """Returns the tar members of one row ({key}.{ext}, {key}.txt, {key}.json) and its media kind; raises MediaError
    for a row that cannot become a sample."""
    if row.error is not None:
        raise MediaError(*row.error)
    if not row.captions:
        raise MediaError("empty_caption", "the row has no non-empty caption")
    if isinstance(prefetched, MediaError):
        raise prefetched
    data = prefetched if prefetched is not None else read_bytes(row.media, opts.retry)
    info = validate(data, media_kind(row.media), extension(row.media))
    data, ext, done = _processed(data, info, row, opts.process)
    meta = {**row.meta, "key": row.key, "row": row.row, "captions": list(row.captions),
            "media_info": {k: v for k, v in asdict(info).items() if v is not None and k != "ext"}}
    if done:
        meta["processing"] = done
    return [(f"{row.key}.{ext}", data), (f"{row.key}.txt", row.captions[0].encode()),
            (f"{row.key}.json", json.dumps(meta, sort_keys=True, ensure_ascii=False).encode())], info.kind


def _processed(data: bytes, info: MediaInfo, row: ManifestRow, opts: ProcessOptions) -> tuple[bytes, str, dict]:
    """Returns (bytes, extension, what was done); the original bytes when no processing applies."""
    if info.kind == "video" and opts.touches_video(row.start, row.end):
        out, done = process_video(data, opts, row.start, row.end)
        return out, "mp4", done
    if info.kind == "image" and opts.short_side:
        out, done = process_image(data, opts)
        return out, "jpg", done
    return data, info.ext, {}
