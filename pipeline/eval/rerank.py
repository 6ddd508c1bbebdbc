"""UMT's re-ranking with the video-text matching head (tasks/retrieval_utils.py, `evaluation`).

For each query (a text for text->video, a video for video->text) the k_test candidates with the highest contrastive
similarity are scored by the matching head's raw "match" logit, `itm_head(...)[:, 1]`, and nothing else (no
similarity added, no softmax); every other candidate gets -100. The re-ranked order is that score's.

Here the pairs of both directions are scored together: a (text, video) pair in the top k of both directions is
scored once (UMT scores it twice, to the same value), and the pairs go through the fusion layers `pairs_per_call`
at a time, many queries per call (UMT: 32 candidates of one query per call).
"""
from __future__ import annotations

from typing import Callable

import torch

OUTSIDE_TOP_K = -100.0  # UMT's fill value for the candidates a query does not re-rank
# (text indices (n,), video indices (n,)) -> the matching head's "match" logit of each pair (n,)
PairLogits = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def top_k_pairs(similarity: torch.Tensor, k_test: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns the (texts, min(k, videos)) text->video and (videos, min(k, texts)) video->text top-k candidate
    indices of a (texts, videos) similarity, as UMT's `sims.topk(k)` per row picks them."""
    t2v = similarity.topk(min(k_test, similarity.shape[1]), dim=1).indices
    v2t = similarity.T.topk(min(k_test, similarity.shape[0]), dim=1).indices
    return t2v, v2t


def umt_reranked(similarity: torch.Tensor, k_test: int, pair_logits: PairLogits, pairs_per_call: int = 512
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns UMT's re-ranked (texts, videos) text->video and (videos, texts) video->text score matrices (float32,
    on the similarity's device): the match logit in each query's top k_test, -100 elsewhere."""
    num_texts, num_videos = similarity.shape
    t2v_top, v2t_top = top_k_pairs(similarity, k_test)
    device = similarity.device
    texts = torch.cat([torch.arange(num_texts, device=device).repeat_interleave(t2v_top.shape[1]), v2t_top.flatten()])
    videos = torch.cat([t2v_top.flatten(), torch.arange(num_videos, device=device).repeat_interleave(v2t_top.shape[1])])
    pairs, where = torch.unique(texts * num_videos + videos, return_inverse=True)
    logits = torch.cat([pair_logits(chunk // num_videos, chunk % num_videos).float().to(device)
                        for chunk in pairs.split(pairs_per_call)])
    scores = logits[where]
    t2v = torch.full((num_texts, num_videos), OUTSIDE_TOP_K, device=device)
    v2t = torch.full((num_videos, num_texts), OUTSIDE_TOP_K, device=device)
    split = t2v_top.numel()
    t2v.scatter_(1, t2v_top, scores[:split].view(t2v_top.shape))
    v2t.scatter_(1, v2t_top, scores[split:].view(v2t_top.shape))
    return t2v, v2t
