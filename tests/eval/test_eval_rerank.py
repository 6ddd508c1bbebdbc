"""UMT's re-ranking: each query's top k by similarity scored by the match logit alone, -100 for the rest; pairs of
both directions scored once, many per call."""
import torch

from pipeline.eval.rerank import OUTSIDE_TOP_K, umt_reranked


class TableLogits:
    """A real matching function (a fixed (text, video) logit table) that records the pairs of each call."""

    def __init__(self, table):
        self.table = torch.as_tensor(table, dtype=torch.float32)
        self.calls = []

    def __call__(self, texts, videos):
        self.calls.append(list(zip(texts.tolist(), videos.tolist())))
        return self.table[texts, videos]


def order(scores):
    return scores.argsort(dim=1, descending=True).tolist()


def test_umt_scores_the_top_k_by_the_match_logit_alone_where_sim_plus_probability_ranks_otherwise():
    # one text, three videos. Top 2 by similarity: videos 0 (0.9) and 1 (0.2); video 2 (0.1) is outside.
    sim = torch.tensor([[0.9, 0.2, 0.1]])
    logits = TableLogits([[0.25, 0.75, 9.0]])  # the head prefers video 1 over 0 by a little, video 2 by a lot
    t2v, v2t = umt_reranked(sim, 2, logits)
    # UMT: 0.25 vs 0.75 -> video 1 first; video 2 is never scored, it gets -100
    assert t2v.tolist() == [[0.25, 0.75, OUTSIDE_TOP_K]] and order(t2v) == [[1, 0, 2]]
    # the project's former rule, similarity + P(match) with P from softmax([0, logit]), keeps video 0 first
    p = torch.sigmoid(torch.tensor([0.25, 0.75]))
    assert (sim[0, :2] + p).argmax().item() == 0
    # video->text: each video has one text, so k = 1 and every video scores its only pair
    assert v2t.tolist() == [[0.25], [0.75], [9.0]]


def test_both_directions_share_pairs_and_batch_many_queries_per_call():
    torch.manual_seed(0)
    sim = torch.randn(7, 5)
    table = torch.randn(7, 5)
    logits = TableLogits(table)
    t2v, v2t = umt_reranked(sim, 3, logits, pairs_per_call=4)
    pairs = [p for call in logits.calls for p in call]
    assert len(pairs) == len(set(pairs))  # each pair scored once
    assert all(len(call) <= 4 for call in logits.calls) and len({t for call in logits.calls[:1] for t, _ in call}) > 1
    for t in range(7):
        top = set(sim[t].topk(3).indices.tolist())
        for v in range(5):
            assert t2v[t, v].item() == (table[t, v].item() if v in top else OUTSIDE_TOP_K)
    for v in range(5):
        top = set(sim[:, v].topk(3).indices.tolist())
        for t in range(7):
            assert v2t[v, t].item() == (table[t, v].item() if t in top else OUTSIDE_TOP_K)
    assert {(t, v) for t in range(7) for v in range(5) if t2v[t, v] != OUTSIDE_TOP_K or v2t[v, t] != OUTSIDE_TOP_K} \
        == set(pairs)


def test_k_larger_than_the_candidates_scores_them_all():
    sim = torch.tensor([[0.9, 0.8, 0.7]])
    t2v, _ = umt_reranked(sim, 128, TableLogits([[1.0, 3.0, 2.0]]))
    assert t2v.tolist() == [[1.0, 3.0, 2.0]]
