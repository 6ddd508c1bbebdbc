"""`scores.npz`: every score an evaluation ranked by, so anyone can recompute its numbers and study its failures.

Arrays (float32 unless said):
  similarity   (texts, videos) contrastive similarity (cosine of the projected, normalized features)
  t2v          (texts, videos) re-ranked text->video scores (UMT: match logit in each text's top k, -100 elsewhere);
               absent when nothing was re-ranked
  v2t          (videos, texts) re-ranked video->text scores, likewise
  text_video   (texts,) int64: the column of each text's video
  videos       (videos,) str: the video file names, in column order
  texts        (texts,) str: the queries as scored (cleaned), in row order
Only the videos that were scored are columns (with eval.allow_missing some may be left out: the JSON lists them).
Read with `numpy.load(path)` (no pickles inside).
"""
from __future__ import annotations

import io
from typing import Optional, Sequence

import fsspec
import numpy as np
import torch

from pipeline.eval.metrics import contrastive_metrics, reranked_metrics


def write_scores(url: str, similarity: torch.Tensor, text_video: Sequence[int], videos: Sequence[str],
                 texts: Sequence[str], t2v: Optional[torch.Tensor] = None, v2t: Optional[torch.Tensor] = None) -> None:
    """Writes the arrays above to `url` (any fsspec URL), compressed."""
    arrays = {"similarity": _numpy(similarity), "text_video": np.asarray(list(text_video), dtype=np.int64),
              "videos": np.asarray(list(videos), dtype=str), "texts": np.asarray(list(texts), dtype=str)}
    if t2v is not None:
        arrays.update(t2v=_numpy(t2v), v2t=_numpy(v2t))
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    with fsspec.open(url, "wb") as f:
        f.write(buffer.getvalue())


def read_scores(url: str) -> dict[str, np.ndarray]:
    """Returns the arrays of a scores.npz."""
    with fsspec.open(url, "rb") as f:
        with np.load(io.BytesIO(f.read()), allow_pickle=False) as data:
            return {k: data[k] for k in data.files}


def metrics_from_scores(url: str) -> dict[str, dict[str, float]]:
    """Returns {"contrastive": metrics, "reranked": metrics (when re-ranked)} recomputed from a scores.npz."""
    data = read_scores(url)
    similarity = torch.from_numpy(data["similarity"])
    text_video = data["text_video"].tolist()
    out = {"contrastive": contrastive_metrics(similarity, text_video)}
    if "t2v" in data:
        out["reranked"] = reranked_metrics(torch.from_numpy(data["t2v"]), torch.from_numpy(data["v2t"]), similarity,
                                           text_video)
    return out


def _numpy(scores: torch.Tensor) -> np.ndarray:
    return scores.detach().float().cpu().numpy()
