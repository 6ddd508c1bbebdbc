"""VTM re-ranking of each query's top-k candidates, as UMT evaluates with its video-text matching head.

For every query the k most similar candidates get the score similarity + match score (UMT adds the two); every other
candidate keeps its similarity order, placed below all k. Models without a matching head skip this step.
"""
from __future__ import annotations

from typing import Callable

import torch

# (query indices (n,), candidate indices (n,)) -> match scores (n,) of those pairs
PairScore = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def reranked(similarity: torch.Tensor, k: int, pair_score: PairScore) -> torch.Tensor:
    """Returns a (queries, candidates) score matrix whose row order is each query's re-ranked candidate order.

    The top-k scores are similarity + pair_score; the rest are shifted to lie below the row's lowest top-k score
    (their order among themselves unchanged), so ranks computed from the result are the re-ranked ranks.
    """
    k = min(k, similarity.shape[1])
    out = torch.empty_like(similarity)
    for q in range(similarity.shape[0]):
        row = similarity[q]
        top_scores, top = row.topk(k)
        rescored = top_scores + pair_score(torch.full_like(top, q), top).to(row)
        floor = rescored.min()
        out[q] = row - row.max() + floor - 1  # every candidate strictly below the re-scored ones, order kept
        out[q, top] = rescored
    return out
