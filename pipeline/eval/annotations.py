"""Retrieval annotations in the JSON formats UMT / VideoMamba use for their test sets.

Every format is a JSON list of ``{"video": "<file name>", "caption": ...}``:
- MSRVTT (1k-A test), LSMDC and the synthetic corpus: ``"caption"`` is one string per video;
- MSVD: ``"caption"`` is a list of strings, each its own text query;
- DiDeMo and ActivityNet (paragraph retrieval): a video's sentences are joined with spaces into one text (a string is
  taken as it is), as UMT's ``preprocess_para_retrieval_data`` does.
Several entries that name the same video are one video with all their texts (a video is a column of the similarity
matrix once). Extra fields (UMT's "duration", ...) are ignored.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.config import ConfigError, read_json

DATASETS = ("msrvtt", "didemo", "anet", "lsmdc", "msvd", "synthetic")
PARAGRAPH_DATASETS = ("didemo", "anet")


class AnnotationError(ConfigError):
    """An annotations file that cannot be used; the message names the file and the entry."""


@dataclass
class RetrievalAnnotations:
    """The videos (file names under the videos folder), the text queries, and each text's video index."""

    videos: list[str]
    texts: list[str]
    text_video: list[int]


def read_annotations(url: str, dataset: str) -> RetrievalAnnotations:
    """Returns the annotations of `dataset` (one of DATASETS) in the file at `url` (any fsspec URL)."""
    if dataset not in DATASETS:
        raise AnnotationError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    entries = _json_list(url)
    videos: list[str] = []
    index: dict[str, int] = {}
    texts: list[str] = []
    text_video: list[int] = []
    for i, entry in enumerate(entries):
        video, captions = _video_and_captions(entry, url, i)
        entry_texts = [" ".join(captions)] if dataset in PARAGRAPH_DATASETS else captions
        if video not in index:
            index[video] = len(videos)
            videos.append(video)
        texts += entry_texts
        text_video += [index[video]] * len(entry_texts)
    if not videos:
        raise AnnotationError(f"{url}: no entries")
    return RetrievalAnnotations(videos, texts, text_video)


def _json_list(url: str) -> list:
    raw = read_json(url, "annotations file", error=AnnotationError)
    if not isinstance(raw, list):
        raise AnnotationError(f"{url}: expected a JSON list of {{\"video\", \"caption\"}} entries, got "
                              f"{type(raw).__name__}")
    return raw


def _video_and_captions(entry: Any, url: str, i: int) -> tuple[str, list[str]]:
    """Returns the entry's video file name and its captions (a list of one or more non-empty strings)."""
    where = f"{url}: entry {i}"
    if not isinstance(entry, dict):
        raise AnnotationError(f"{where}: expected an object with \"video\" and \"caption\", got {entry!r:.80}")
    for key in ("video", "caption"):
        if key not in entry:
            raise AnnotationError(f"{where}: missing field {key!r} (has {', '.join(map(repr, entry)) or 'none'})")
    video, caption = entry["video"], entry["caption"]
    if not isinstance(video, str) or not video:
        raise AnnotationError(f"{where}: \"video\" must be a non-empty file name, got {video!r:.80}")
    captions = [caption] if isinstance(caption, str) else caption
    if not isinstance(captions, list) or not captions or not all(isinstance(c, str) and c for c in captions):
        raise AnnotationError(f"{where} ({video}): \"caption\" must be a non-empty string or a non-empty list of "
                              f"them, got {caption!r:.80}")
    return video, captions
