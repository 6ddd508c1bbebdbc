"""Corpus manifests -> rows: CSV/TSV, JSONL, JSON list, Parquet, or a folder of media with sidecar caption files.

Every storage access goes through fsspec, so the manifest and the media it names may live on any URL. A media path
that is not a URL is resolved against the manifest's folder. A row that cannot be parsed does not stop the job: it
keeps its row number and carries the reason in `ManifestRow.error`, so it ends up in the failures file.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import fsspec
from fsspec.core import url_to_fs

from pipeline.errors import ConfigError

MEDIA_ALIASES = ("path", "video", "videoLoc", "url", "image", "filepath")
CAPTION_ALIASES = ("caption", "captions", "text", "name")
KEY_ALIASES = ("key", "id", "video_id", "videoid")
START_ALIASES = ("start", "start_time", "clip_start", "timestamp_start")
END_ALIASES = ("end", "end_time", "clip_end", "timestamp_end")

VIDEO_EXTS = ("mp4", "webm", "mkv", "mov", "avi", "m4v")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TABLE_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
                  ".parquet": "parquet", ".pq": "parquet"}
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")


@dataclass(frozen=True)
class ManifestRow:
    """One input sample. `media` is the resolved URL; `meta` holds every column that is not a caption column."""

    row: int
    key: str
    media: Optional[str]
    captions: tuple[str, ...] = ()
    start: Optional[float] = None
    end: Optional[float] = None
    meta: dict = field(default_factory=dict)
    error: Optional[tuple[str, str]] = None  # (reason, detail) when the row itself is unusable


@dataclass
class Manifest:
    url: str
    format: str
    rows: list[ManifestRow]
    columns: list[str]
    media_column: Optional[str]  # None for a folder of media
    caption_columns: list[str]


# ------------------------------------------------------------------------------------------------------ public entry
def read_manifest(url: str, media_column: Optional[str] = None,
                  caption_columns: Sequence[str] = ()) -> Manifest:
    """Returns the manifest at `url` (a table file or a folder of media); raises ConfigError when it cannot be used."""
    url = url if "://" in url else os.path.abspath(url)  # Ray workers do not share the driver's working directory
    fs, path = url_to_fs(url)
    if not fs.exists(path):
        raise ConfigError(f"--input: manifest not found: {url}")
    if fs.isdir(path):
        return _read_folder(fs, url, path)
    fmt = manifest_format(path)
    if fmt is None:
        raise ConfigError(f"--input {url}: unknown manifest format; expected one of "
                          f"{', '.join(sorted(TABLE_SUFFIXES))} (optionally compressed) or a folder of media")
    records = _read_records(url, fmt)
    return _rows_from_records(url, fmt, records, media_column, list(caption_columns))


def manifest_format(path: str) -> Optional[str]:
    """Returns csv|tsv|jsonl|json|parquet from the file name (compression suffixes ignored), or None."""
    name = path.lower()
    for suffix in COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return TABLE_SUFFIXES.get(posixpath.splitext(name)[1])


def media_kind(url: str) -> Optional[str]:
    """Returns "video" or "image" from the URL's extension, or None when the extension says neither."""
    ext = extension(url)
    if ext in VIDEO_EXTS:
        return "video"
    if ext in IMAGE_EXTS:
        return "image"
    return None


def extension(url: str) -> str:
    """Returns the lower-case extension of the URL's path (query string ignored), '' when it has none."""
    tail = url.split("?", 1)[0].rsplit("/", 1)[-1]
    return tail.rsplit(".", 1)[1].lower() if "." in tail else ""


def resolve(base_url: str, path: str) -> str:
    """Returns `path` as a URL: unchanged when it is a URL or an absolute path, else joined to the manifest's folder
    (same protocol as `base_url`)."""
    if "://" in path or path.startswith("/"):
        return path
    protocol, sep, rest = base_url.rpartition("://")
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(rest), path))
    return f"{protocol}{sep}{joined}"


# ------------------------------------------------------------------------------------------------------ table files
def _read_records(url: str, fmt: str) -> list[Any]:
    """Returns one entry per data row: a dict, or a ValueError for a line that could not be parsed."""
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            with fsspec.open(url, "rb") as f:
                return pq.read_table(f).to_pylist()
        with fsspec.open(url, "rt", compression="infer", encoding="utf-8", newline="") as f:
            text = f.read()
    except (OSError, ValueError) as e:
        raise ConfigError(f"--input {url}: cannot read the manifest: {e}") from None
    if fmt in ("csv", "tsv"):
        return list(csv.DictReader(io.StringIO(text), delimiter="\t" if fmt == "tsv" else ","))
    if fmt == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--input {url}: not valid JSON: {e}") from None
        if not isinstance(data, list):
            raise ConfigError(f"--input {url}: a .json manifest must hold a list of objects, got {type(data).__name__}")
        return data
    return [_parse_json_line(line) for line in text.splitlines() if line.strip()]


def _parse_json_line(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        return ValueError(f"not valid JSON: {e}")


def _columns(records: Iterable[Any]) -> list[str]:
    seen: dict[str, None] = {}
    for rec in records:
        if isinstance(rec, dict):
            seen.update(dict.fromkeys(rec))
    return list(seen)


def _rows_from_records(url: str, fmt: str, records: list[Any], media_column: Optional[str],
                       caption_columns: list[str]) -> Manifest:
    columns = _columns(records)
    media_col = _pick_column(url, columns, media_column, MEDIA_ALIASES, "media", "--media-column")
    caption_cols = [_pick_column(url, columns, c, (), "caption", "--caption-column") for c in caption_columns] or \
        [_pick_column(url, columns, None, CAPTION_ALIASES, "caption", "--caption-column")]
    key_col = next((c for c in KEY_ALIASES if c in columns), None)
    start_col = next((c for c in START_ALIASES if c in columns), None)
    end_col = next((c for c in END_ALIASES if c in columns), None)
    rows = []
    used_keys: set[str] = set()
    for i, rec in enumerate(records):
        key = _unique_key(rec.get(key_col) if key_col and isinstance(rec, dict) else None, i, used_keys)
        rows.append(_row(url, i, key, rec, media_col, caption_cols, start_col, end_col))
    return Manifest(url, fmt, rows, columns, media_col, caption_cols)


def _pick_column(url: str, columns: list[str], wanted: Optional[str], aliases: Sequence[str], what: str,
                 option: str) -> str:
    if wanted is not None:
        if wanted in columns:
            return wanted
        raise ConfigError(f"--input {url}: {option} {wanted!r} is not a column; its columns are: "
                          f"{', '.join(columns) or '(none)'}")
    found = next((c for c in aliases if c in columns), None)
    if found is None:
        raise ConfigError(f"--input {url}: no {what} column (looked for {', '.join(aliases)}); its columns are: "
                          f"{', '.join(columns) or '(none)'}; name one with {option}")
    return found


def _row(url: str, i: int, key: str, rec: Any, media_col: str, caption_cols: list[str],
         start_col: Optional[str], end_col: Optional[str]) -> ManifestRow:
    if isinstance(rec, Exception):
        return ManifestRow(i, key, None, error=("bad_manifest_row", str(rec)))
    if not isinstance(rec, dict):
        return ManifestRow(i, key, None, error=("bad_manifest_row", f"expected an object, got {type(rec).__name__}"))
    meta = {k: json_safe(v) for k, v in rec.items() if k not in caption_cols}
    captions = tuple(c for col in caption_cols for c in _captions(rec.get(col)))
    media = rec.get(media_col)
    if not isinstance(media, str) or not media.strip():
        return ManifestRow(i, key, None, captions, meta=meta, error=("missing_media_field",
                           f"column {media_col!r} is empty"))
    try:
        start = _seconds(rec.get(start_col)) if start_col else None
        end = _seconds(rec.get(end_col)) if end_col else None
    except ValueError as e:
        return ManifestRow(i, key, resolve(url, media.strip()), captions, meta=meta, error=("bad_time", str(e)))
    return ManifestRow(i, key, resolve(url, media.strip()), captions, start, end, meta)


def _captions(value: Any) -> list[str]:
    """Returns the non-empty captions in a cell: a string, or a list of strings (JSON/Parquet lists)."""
    if value is None:
        return []
    values = value if isinstance(value, (list, tuple)) else [value]
    return [str(v).strip() for v in values if v is not None and str(v).strip()]


def _seconds(value: Any) -> Optional[float]:
    """Returns seconds from a number, a numeric string or an "HH:MM:SS.fff" time; None for an empty cell."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if math.isnan(value):
            return None
        return float(value)
    text = str(value).strip()
    try:
        parts = [float(p) for p in text.split(":")]
    except ValueError:
        raise ValueError(f"time {value!r} is neither seconds nor HH:MM:SS") from None
    seconds = 0.0
    for p in parts:
        seconds = seconds * 60 + p
    return seconds


def _unique_key(raw: Any, row: int, used: set[str]) -> str:
    """Returns a WebDataset-safe key (no dots or slashes: WebDataset splits the key at the first dot); a repeated
    key gets the row number appended so that no two samples merge."""
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", str(raw)).strip("_") if raw not in (None, "") else ""
    key = key or f"{row:09d}"
    if key in used:
        key = f"{key}-r{row}"
    used.add(key)
    return key


def json_safe(value: Any) -> Any:
    """Returns `value` as plain JSON data (Parquet cells may hold dates, bytes, numpy scalars)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item"):
        return json_safe(value.item())
    return str(value)


# ------------------------------------------------------------------------------------------------------ media folder
def _read_folder(fs, url: str, path: str) -> Manifest:
    """Rows from a folder: every media file (sorted by path) with `stem.txt` (one caption per line) and optionally
    `stem.json` (metadata, may hold "caption"/"captions") beside it."""
    files = sorted(fs.find(path))
    media = [f for f in files if media_kind(f) is not None]
    if not media:
        raise ConfigError(f"--input {url}: the folder holds no media files ({', '.join(VIDEO_EXTS + IMAGE_EXTS)})")
    present = set(files)
    sidecars = [s for f in media for s in (_stem(f) + ".txt", _stem(f) + ".json") if s in present]
    contents = fs.cat(sidecars, on_error="return") if sidecars else {}
    rows = []
    used: set[str] = set()
    root = path.rstrip("/") + "/"
    for i, f in enumerate(media):
        rel = f[len(root):] if f.startswith(root) else posixpath.basename(f)
        key = _unique_key(_stem(rel), i, used)
        rows.append(_folder_row(i, key, fs.unstrip_protocol(f), rel,
                                contents.get(_stem(f) + ".txt"), contents.get(_stem(f) + ".json")))
    return Manifest(url, "folder", rows, ["path", "caption"], None, ["caption"])


def _folder_row(i: int, key: str, media_url: str, rel: str, txt: Any, meta_raw: Any) -> ManifestRow:
    for name, raw in (("txt", txt), ("json", meta_raw)):
        if isinstance(raw, Exception):
            return ManifestRow(i, key, media_url, error=("unreadable_sidecar", f"{rel}: .{name}: {raw}"))
    meta: dict = {"path": rel}
    if meta_raw is not None:
        try:
            loaded = json.loads(meta_raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return ManifestRow(i, key, media_url, error=("bad_sidecar", f"{rel}: .json: {e}"))
        if isinstance(loaded, dict):
            meta.update({k: json_safe(v) for k, v in loaded.items()})
    captions = _captions(meta.pop("captions", None)) + _captions(meta.pop("caption", None))
    if txt is not None:
        captions = [line.strip() for line in txt.decode("utf-8", "replace").splitlines() if line.strip()] + captions
    return ManifestRow(i, key, media_url, tuple(captions), meta=meta)


def _stem(path: str) -> str:
    return path.rsplit(".", 1)[0]
