"""Retrieval metrics from a (texts x videos) similarity matrix: R@1/5/10 (fractions of queries), median rank (MdR)
and mean rank (MnR), text->video and video->text.

A query's rank is the 1-based position of its best-ranked correct candidate; a video with several captions counts
its best-ranked caption. Ties are broken pessimistically: a correct candidate is ranked below every candidate with
an equal score (so a constant similarity matrix gives every query the last rank, never a lucky R@1).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

RECALL_AT = (1, 5, 10)


def text_video_mask(text_video: Sequence[int], num_videos: int) -> torch.Tensor:
    """Returns the bool (texts, videos) matrix that is True where the text describes the video."""
    mask = torch.zeros(len(text_video), num_videos, dtype=torch.bool)
    mask[torch.arange(len(text_video)), torch.as_tensor(list(text_video), dtype=torch.long)] = True
    return mask


def target_ranks(scores: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """Returns each query's (row's) 1-based rank of its best correct candidate, ties counted against it.

    scores: (queries, candidates) float; correct: bool of the same shape with at least one True per row.
    """
    if not bool(correct.any(dim=1).all()):
        empty = torch.nonzero(~correct.any(dim=1)).flatten().tolist()
        raise ValueError(f"queries {empty[:10]} have no correct candidate")
    best = scores.masked_fill(~correct, float("-inf")).max(dim=1, keepdim=True).values
    return (scores >= best).sum(dim=1)


def rank_metrics(ranks: torch.Tensor) -> dict[str, float]:
    """Returns R@1/5/10 (fraction of queries ranked within k), MdR and MnR of 1-based ranks."""
    r = ranks.double().cpu().numpy()
    out = {f"R@{k}": float(np.mean(r <= k)) for k in RECALL_AT}
    out.update({"MdR": float(np.median(r)), "MnR": float(np.mean(r)), "queries": int(len(r))})
    return out


def retrieval_metrics(similarity: torch.Tensor, text_video: Sequence[int]) -> dict[str, dict[str, float]]:
    """Returns {"text_to_video": metrics, "video_to_text": metrics} of a (texts, videos) similarity matrix."""
    correct = text_video_mask(text_video, similarity.shape[1])
    return {"text_to_video": rank_metrics(target_ranks(similarity, correct)),
            "video_to_text": rank_metrics(target_ranks(similarity.T, correct.T))}
