"""Retrieval annotations in the formats test sets are found in, and which benchmark a file is.

Formats (told apart by content, whatever the file is called):
- UMT / VideoMamba JSON: a list of ``{"video": "<file>", "caption": ...}`` (``"image"`` for image-text sets such as
  COCO and Flickr30K); ``"caption"`` a string or a list of strings, each its own query. Extra fields are ignored.
- JSON Lines: one such object per line.
- CLIP4Clip's ``MSRVTT_JSFUSION_test.csv`` (columns key, vid_key, video_id, sentence: the MSRVTT 1k-A test, one
  caption per video, video file ``<video_id>.mp4``).
- CLIP4Clip's ``MSRVTT_data.json`` (``{"videos": [...], "sentences": [...]}``): the videos whose "split" is "test"
  (MSRVTT's full 2,990-video test split) with all their sentences, each its own query.

For the paragraph benchmarks (DiDeMo, ActivityNet) a video's sentences are joined with spaces into one query, as
UMT's `preprocess_para_retrieval_data` does (a string is taken as it is). Every text is cleaned by UMT's `pre_text`.
Several entries that name the same file are one video with all their texts (a column of the similarity matrix once).

The benchmark (its text length, paragraphs, trimming) is the one named, or else the one whose name the file's name
holds (msrvtt_ret_test1k.json, didemo_ret_test.json, anet_ret_val.json, lsmdc_ret_test_1000.json,
msvd_ret_test.json, coco_test.json, flickr30k_test.json, the CLIP4Clip files: msrvtt).
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from typing import Any, Optional

import fsspec

from pipeline.config import ConfigError
from pipeline.eval.protocol import BENCHMARKS, DATASETS, pre_text

EXPECTED = ("UMT's JSON list of {\"video\" or \"image\", \"caption\"} objects, JSON Lines of such objects, "
            "CLIP4Clip's MSRVTT_JSFUSION_test.csv (key,vid_key,video_id,sentence) or MSRVTT_data.json "
            "({\"videos\", \"sentences\"})")
CSV_COLUMNS = ("key", "vid_key", "video_id", "sentence")
NAME_HINTS = (("msrvtt", "msrvtt"), ("didemo", "didemo"), ("activitynet", "anet"), ("anet", "anet"),
              ("lsmdc", "lsmdc"), ("msvd", "msvd"), ("coco", "coco"), ("flickr", "flickr"))


class AnnotationError(ConfigError):
    """An annotations file that cannot be used; the message names the file and the entry."""


@dataclass
class RetrievalAnnotations:
    """The videos (file names under the videos folder), the text queries, each text's video index, what the files
    are ("video" or "image"), the benchmark and the format the file was read as."""

    videos: list[str]
    texts: list[str]
    text_video: list[int]
    media: str = "video"
    dataset: str = "msrvtt"
    format: str = "umt-json"


def read_annotations(url: str, dataset: Optional[str] = None) -> RetrievalAnnotations:
    """Returns the annotations in the file at `url` (any fsspec URL), as benchmark `dataset` (None: from the name)."""
    if dataset is not None and dataset not in DATASETS:
        raise AnnotationError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    text = _read_text(url)
    fmt, entries = _parsed(text, url)
    named = dataset or detected_dataset(url, fmt)
    paragraph = BENCHMARKS[named].paragraph
    videos: list[str] = []
    index: dict[str, int] = {}
    texts: list[str] = []
    text_video: list[int] = []
    media = None
    for i, entry in enumerate(entries):
        entry_media, video, captions = _media_and_captions(entry, url, i)
        if media is not None and entry_media != media:
            raise AnnotationError(f"{url}: entry {i}: an {entry_media!r} entry among {media!r} entries")
        media = entry_media
        entry_texts = [" ".join(captions)] if paragraph else captions
        if video not in index:
            index[video] = len(videos)
            videos.append(video)
        texts += [pre_text(t) for t in entry_texts]
        text_video += [index[video]] * len(entry_texts)
    if not videos:
        raise AnnotationError(f"{url}: no entries")
    return RetrievalAnnotations(videos, texts, text_video, media or "video", named, fmt)


def detected_dataset(url: str, fmt: str) -> str:
    """Returns the benchmark a file is, from its format (CLIP4Clip's files are MSRVTT) or its name."""
    if fmt.startswith("clip4clip"):
        return "msrvtt"
    name = os.path.basename(url.rstrip("/")).lower()
    for hint, dataset in NAME_HINTS:
        if hint in name:
            return dataset
    raise AnnotationError(f"{url}: cannot tell which benchmark this is from its name; name it with --dataset "
                          f"{'|'.join(DATASETS)}")


def _read_text(url: str) -> str:
    try:
        with fsspec.open(url, "r", encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise AnnotationError(f"annotations file not found: {url}") from None
    except UnicodeDecodeError:
        raise AnnotationError(f"{url}: not text; expected {EXPECTED}") from None


def _parsed(text: str, url: str) -> tuple[str, list]:
    """Returns (format, the entries as UMT-style objects) of the file's text, or refuses it in one line."""
    stripped = text.lstrip("\ufeff").strip()
    if stripped.split("\n", 1)[0].replace(" ", "").lower().startswith(",".join(CSV_COLUMNS)):
        return "clip4clip-csv", _csv_entries(stripped, url)
    try:
        value = json.loads(stripped)
    except json.JSONDecodeError as e:
        lines = [line for line in stripped.splitlines() if line.strip()]
        if len(lines) > 1 and lines[0].lstrip().startswith("{"):
            return "jsonl", _jsonl_entries(lines, url)
        raise AnnotationError(f"{url}: not valid JSON ({e}); expected {EXPECTED}") from None
    if isinstance(value, list):
        return "umt-json", value
    if isinstance(value, dict) and "videos" in value and "sentences" in value:
        return "clip4clip-data-json", _msrvtt_data_entries(value, url)
    if isinstance(value, dict) and ("video" in value or "image" in value):
        return "jsonl", [value]  # JSON Lines with a single line
    got = f"an object with keys {', '.join(map(repr, list(value)[:6]))}" if isinstance(value, dict) \
        else type(value).__name__
    raise AnnotationError(f"{url}: got {got}; expected {EXPECTED}")


def _csv_entries(text: str, url: str) -> list[dict]:
    rows = list(csv.DictReader(io.StringIO(text)))
    entries = []
    for i, row in enumerate(rows):
        video, sentence = (row.get("video_id") or "").strip(), row.get("sentence")
        if not video or sentence is None:
            raise AnnotationError(f"{url}: row {i + 2}: needs video_id and sentence, got {row!r:.80}")
        entries.append({"video": f"{video}.mp4", "caption": sentence})
    return entries


def _jsonl_entries(lines: list[str], url: str) -> list:
    entries = []
    for i, line in enumerate(lines):
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise AnnotationError(f"{url}: line {i + 1}: not valid JSON ({e}); expected {EXPECTED}") from None
    return entries


def _msrvtt_data_entries(data: dict, url: str) -> list[dict]:
    """The test split of CLIP4Clip's MSRVTT_data.json as UMT-style entries, one per sentence."""
    videos, sentences = data["videos"], data["sentences"]
    if not isinstance(videos, list) or not isinstance(sentences, list):
        raise AnnotationError(f"{url}: \"videos\" and \"sentences\" must be lists; expected {EXPECTED}")
    try:
        test = [v["video_id"] for v in videos if v["split"] == "test"]
        captions: dict[str, list[str]] = {v: [] for v in test}
        for s in sentences:
            if s["video_id"] in captions:
                captions[s["video_id"]].append(s["caption"])
    except (KeyError, TypeError) as e:
        raise AnnotationError(f"{url}: a video without \"video_id\"/\"split\" or a sentence without "
                              f"\"video_id\"/\"caption\" ({e!r}); expected CLIP4Clip's MSRVTT_data.json") from None
    if not test:
        raise AnnotationError(f"{url}: no video of split \"test\"")
    return [{"video": f"{v}.mp4", "caption": captions[v]} for v in test]


def _media_and_captions(entry: Any, url: str, i: int) -> tuple[str, str, list[str]]:
    """Returns the entry's media ("video" or "image"), its file name and its captions (non-empty strings)."""
    where = f"{url}: entry {i}"
    if not isinstance(entry, dict):
        raise AnnotationError(f"{where}: expected an object with \"video\" (or \"image\") and \"caption\", got "
                              f"{entry!r:.80}")
    media = "video" if "video" in entry else "image" if "image" in entry else None
    if media is None:
        raise AnnotationError(f"{where}: missing field 'video' (or 'image') (has "
                              f"{', '.join(map(repr, entry)) or 'none'})")
    if "caption" not in entry:
        raise AnnotationError(f"{where}: missing field 'caption' (has {', '.join(map(repr, entry)) or 'none'})")
    video, caption = entry[media], entry["caption"]
    if not isinstance(video, str) or not video:
        raise AnnotationError(f"{where}: \"{media}\" must be a non-empty file name, got {video!r:.80}")
    captions = [caption] if isinstance(caption, str) else caption
    if not isinstance(captions, list) or not captions or not all(isinstance(c, str) and c for c in captions):
        raise AnnotationError(f"{where} ({video}): \"caption\" must be a non-empty string or a non-empty list of "
                              f"them, got {caption!r:.80}")
    return media, video, captions
