"""Retrieval metrics (UMT's names, in percent; MdR/MnR ours) on hand-made score matrices whose ranks are worked out
in the comments."""
import pytest
import torch

from pipeline.eval.metrics import contrastive_metrics, rank_summary, reranked_metrics, target_ranks


def test_one_caption_per_video_with_a_pessimistic_tie():
    sim = torch.tensor([[0.9, 0.1, 0.0],   # text 0 -> video 0 first: rank 1
                        [0.8, 0.5, 0.2],   # text 1 -> video 1 behind video 0: rank 2
                        [0.3, 0.3, 0.3]])  # text 2 -> video 2 ties with both others: ranked last, 3
    m = contrastive_metrics(sim, [0, 1, 2])
    assert (m["img_r1"], m["img_r5"], m["img_r10"]) == (pytest.approx(100 / 3), 100.0, 100.0)
    assert (m["t2v_MdR"], m["t2v_MnR"], m["t2v_queries"]) == (2.0, 2.0, 3)
    # columns: video 0 [0.9 0.8 0.3] text 0 first; video 1 [0.1 0.5 0.3] text 1 first; video 2 [0 0.2 0.3] text 2 first
    assert (m["txt_r1"], m["txt_r5"], m["txt_r10"], m["v2t_MdR"], m["v2t_MnR"]) == (100.0, 100.0, 100.0, 1.0, 1.0)
    assert m["txt_r_mean"] == 100.0 and m["img_r_mean"] == pytest.approx(700 / 9)
    assert m["r_mean"] == pytest.approx((100.0 + 700 / 9) / 2)


def test_a_video_with_several_captions_counts_its_best_ranked_one():
    sim = torch.tensor([[0.2, 0.9],   # t0 (video 0): rank 2
                        [0.7, 0.1],   # t1 (video 0): rank 1
                        [0.6, 0.4],   # t2 (video 1): rank 2
                        [0.5, 0.3]])  # t3 (video 1): rank 2
    m = contrastive_metrics(sim, [0, 0, 1, 1])
    assert m["img_r1"] == 25.0 and m["t2v_MdR"] == 2.0 and m["t2v_MnR"] == 1.75
    # video 0's column [0.2 0.7 0.6 0.5]: t1 is first; video 1's [0.9 0.1 0.4 0.3]: t2 is 2nd
    assert (m["txt_r1"], m["v2t_MdR"], m["v2t_MnR"], m["v2t_queries"]) == (50.0, 1.5, 1.5, 2)


def test_recall_at_5_and_10_and_the_median_of_an_even_count():
    scores = torch.arange(12, 0, -1).float()  # candidate j is ranked j + 1 by every query
    correct = torch.zeros(2, 12, dtype=torch.bool)
    correct[0, 6] = correct[1, 10] = True  # ranks 7 and 11
    ranks = target_ranks(torch.stack([scores, scores]), correct)
    assert ranks.tolist() == [7, 11]
    assert rank_summary(ranks) == {"R@1": 0.0, "R@5": 0.0, "R@10": 50.0, "MdR": 9.0, "MnR": 9.0, "queries": 2}


def test_re_ranked_ties_at_minus_100_are_ordered_by_the_similarity():
    sim = torch.tensor([[0.9, 0.8, 0.7, 0.6],   # text 0's video is 3, outside its top 2
                        [0.1, 0.2, 0.3, 0.4]])  # text 1's video is 2, outside its top 2 
    t2v = torch.tensor([[2.0, 1.0, -100.0, -100.0],
                        [-100.0, -100.0, 3.0, 4.0]])
    correct = torch.tensor([[False, False, False, True], [False, False, True, False]])
    # text 0: behind the two re-ranked ones and video 2 (0.7 > 0.6): 4; text 1: re-ranked 2nd behind video 3
    assert target_ranks(t2v, correct, sim).tolist() == [4, 2]
    assert target_ranks(t2v, correct).tolist() == [4, 2]  # without the tie-break, the -100 tie counts against it
    sim[0, 2] = 0.5  # now video 3 is ahead of video 2 among the -100s
    assert target_ranks(t2v, correct, sim).tolist() == [3, 2]
    m = reranked_metrics(t2v[:, 2:], t2v[:, 2:].T.clone(), sim[:, 2:], [1, 0])  # videos 2 and 3 only
    assert (m["img_r1"], m["t2v_MdR"]) == (50.0, 1.5)


def test_a_video_without_any_text_is_refused():
    with pytest.raises(ValueError, match=r"queries \[1\] have no correct candidate"):
        contrastive_metrics(torch.eye(2), [0, 0])
