"""VTM re-ranking: the top-k candidates re-scored by similarity + match score, the rest kept below in their order."""
import torch

from pipeline.eval.rerank import reranked


def order(scores):
    return scores.argsort(dim=1, descending=True).tolist()


def embedding_match(queries, candidates):
    """A small real matching function: the dot product of two fixed embedding tables."""
    q_table = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    c_table = torch.tensor([[0.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, 0.0], [5.0, 5.0]])
    return (q_table[queries] * c_table[candidates]).sum(dim=-1)


def test_top_k_are_re_scored_and_the_rest_keep_their_order_below():
    sim = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5],
                        [0.5, 0.9, 0.4, 0.8, 0.7]])
    out = reranked(sim, 3, embedding_match)
    # query 0, top 3 = {0, 1, 2}: 0.9 + 0, 0.8 + 0, 0.7 + 3 -> 2, 0, 1; then 3, 4 (candidate 4's match 5 is unused)
    # query 1, top 3 = {1, 3, 4}: 0.9 + 2, 0.8 + 0, 0.7 + 5 -> 4, 1, 3; then 0, 2 in similarity order
    assert order(out) == [[2, 0, 1, 3, 4], [4, 1, 3, 0, 2]]
    assert torch.allclose(out[0, [2, 0, 1]], torch.tensor([3.7, 0.9, 0.8]))


def test_k_larger_than_the_candidates_re_scores_them_all():
    sim = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5]])
    assert order(reranked(sim, 100, embedding_match)) == [[4, 2, 0, 1, 3]]  # 0.5 + 5 wins now
    assert order(reranked(sim, 5, lambda q, c: -c.float())) == [[0, 1, 2, 3, 4]]
