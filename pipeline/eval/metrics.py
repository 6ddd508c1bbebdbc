"""Retrieval metrics as UMT reports them (`itm_eval`, tasks/retrieval_utils.py), plus median and mean rank.

UMT's names, all in percent: `txt_r1/5/10` are video->text recalls (a video query finds one of its texts within the
first k; UMT calls videos "images"), `img_r1/5/10` text->video recalls, `txt_r_mean`/`img_r_mean` their means and
`r_mean` the mean of those two. Ours: `t2v_MdR`/`t2v_MnR` and `v2t_MdR`/`v2t_MnR`, the median and mean of the 1-based
rank of each query's best-ranked correct candidate (a video with several texts counts its best-ranked one).

Ties. UMT orders a row with `np.argsort(score)[::-1]`, which leaves ties in no defined order. Here a tie is counted
against the query: its correct candidate is placed below every wrong candidate with the same score (a constant
matrix gives every query the last rank, never a lucky R@1). A `tiebreak` matrix (the contrastive similarity, for
re-ranked scores whose candidates outside the top k all share UMT's -100) orders equal scores before that rule
applies, so the rank of a correct candidate outside the re-ranked top k is its contrastive rank there: this changes
no R@1/5/10 while k_test >= 10 and makes MdR/MnR of the re-ranked scores meaningful.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

RECALL_AT = (1, 5, 10)
ROWS_PER_SORT = 4096  # queries ranked at a time (bounds the sort's memory on benchmark-sized matrices)


def text_video_mask(text_video: Sequence[int], num_videos: int, device=None) -> torch.Tensor:
    """Returns the bool (texts, videos) matrix that is True where the text describes the video."""
    mask = torch.zeros(len(text_video), num_videos, dtype=torch.bool, device=device)
    mask[torch.arange(len(text_video), device=device),
         torch.as_tensor(list(text_video), dtype=torch.long, device=device)] = True
    return mask


def target_ranks(scores: torch.Tensor, correct: torch.Tensor, tiebreak: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Returns each query's (row's) 1-based rank of its best correct candidate (ties as the module says).

    scores: (queries, candidates) float; correct: bool of the same shape with at least one True per row; tiebreak:
    None or a float matrix of the same shape ordering equal scores (higher first).
    """
    if not bool(correct.any(dim=1).all()):
        empty = torch.nonzero(~correct.any(dim=1)).flatten().tolist()
        raise ValueError(f"queries {empty[:10]} have no correct candidate")
    ranks = []
    for start in range(0, scores.shape[0], ROWS_PER_SORT):
        rows = slice(start, start + ROWS_PER_SORT)
        ranks.append(_rows_target_ranks(scores[rows], correct[rows], None if tiebreak is None else tiebreak[rows]))
    return torch.cat(ranks) if ranks else torch.empty(0, dtype=torch.long)


def _rows_target_ranks(scores: torch.Tensor, correct: torch.Tensor, tiebreak: Optional[torch.Tensor]) -> torch.Tensor:
    # stable sorts from the least to the most significant key: wrong before correct, then tiebreak, then score
    order = torch.sort(correct.to(torch.uint8), dim=1, stable=True).indices
    keys = ([tiebreak] if tiebreak is not None else []) + [scores]
    for key in keys:
        order = order.gather(1, torch.sort(key.gather(1, order), dim=1, descending=True, stable=True).indices)
    position = correct.gather(1, order).to(torch.uint8).argmax(dim=1)  # first correct in the final order
    return position + 1


def rank_summary(ranks: torch.Tensor) -> dict[str, float]:
    """Returns R@1/5/10 (percent of queries ranked within k), MdR and MnR of 1-based ranks."""
    r = ranks.double().cpu().numpy()
    out = {f"R@{k}": 100.0 * float(np.mean(r <= k)) for k in RECALL_AT}
    out.update({"MdR": float(np.median(r)), "MnR": float(np.mean(r)), "queries": int(len(r))})
    return out


def umt_metrics(t2v: torch.Tensor, v2t: torch.Tensor, text_video: Sequence[int],
                t2v_tiebreak: Optional[torch.Tensor] = None, v2t_tiebreak: Optional[torch.Tensor] = None
                ) -> dict[str, float]:
    """Returns UMT's metrics and ours (see the module) of a (texts, videos) text->video score matrix and a
    (videos, texts) video->text one (for contrastive scores, the similarity and its transpose)."""
    correct = text_video_mask(text_video, t2v.shape[1], device=t2v.device)
    t2v_ranks = rank_summary(target_ranks(t2v, correct, t2v_tiebreak))
    v2t_ranks = rank_summary(target_ranks(v2t, correct.T, v2t_tiebreak))
    out = {f"txt_r{k}": v2t_ranks[f"R@{k}"] for k in RECALL_AT}
    out["txt_r_mean"] = sum(out[f"txt_r{k}"] for k in RECALL_AT) / len(RECALL_AT)
    out.update({f"img_r{k}": t2v_ranks[f"R@{k}"] for k in RECALL_AT})
    out["img_r_mean"] = sum(out[f"img_r{k}"] for k in RECALL_AT) / len(RECALL_AT)
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    for prefix, summary in (("t2v", t2v_ranks), ("v2t", v2t_ranks)):
        out.update({f"{prefix}_MdR": summary["MdR"], f"{prefix}_MnR": summary["MnR"],
                    f"{prefix}_queries": summary["queries"]})
    return out


def contrastive_metrics(similarity: torch.Tensor, text_video: Sequence[int]) -> dict[str, float]:
    """Returns the metrics of a (texts, videos) contrastive similarity, both directions."""
    return umt_metrics(similarity, similarity.T, text_video)


def reranked_metrics(t2v: torch.Tensor, v2t: torch.Tensor, similarity: torch.Tensor,
                     text_video: Sequence[int]) -> dict[str, float]:
    """Returns the metrics of re-ranked score matrices, their ties (the -100 outside each top k) broken by the
    contrastive `similarity` (texts, videos)."""
    return umt_metrics(t2v, v2t, text_video, similarity, similarity.T)
