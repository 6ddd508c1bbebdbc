"""Retrieval metrics on hand-made similarity matrices whose ranks are worked out in the comments."""
import pytest
import torch

from pipeline.eval.metrics import rank_metrics, retrieval_metrics, target_ranks


def test_one_caption_per_video_with_a_pessimistic_tie():
    sim = torch.tensor([[0.9, 0.1, 0.0],   # text 0 -> video 0 first: rank 1
                        [0.8, 0.5, 0.2],   # text 1 -> video 1 behind video 0: rank 2
                        [0.3, 0.3, 0.3]])  # text 2 -> video 2 ties with both others: ranked last, 3
    m = retrieval_metrics(sim, [0, 1, 2])
    assert m["text_to_video"] == {"R@1": pytest.approx(1 / 3), "R@5": 1.0, "R@10": 1.0, "MdR": 2.0, "MnR": 2.0,
                                  "queries": 3}
    # columns: video 0 [0.9 0.8 0.3] text 0 first; video 1 [0.1 0.5 0.3] text 1 first; video 2 [0 0.2 0.3] text 2 first
    assert m["video_to_text"] == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0, "MdR": 1.0, "MnR": 1.0, "queries": 3}


def test_a_video_with_several_captions_counts_its_best_ranked_one():
    sim = torch.tensor([[0.2, 0.9],   # t0 (video 0): rank 2
                        [0.7, 0.1],   # t1 (video 0): rank 1
                        [0.6, 0.4],   # t2 (video 1): rank 2
                        [0.5, 0.3]])  # t3 (video 1): rank 2
    m = retrieval_metrics(sim, [0, 0, 1, 1])
    assert m["text_to_video"]["R@1"] == 0.25 and m["text_to_video"]["MdR"] == 2.0
    assert m["text_to_video"]["MnR"] == 1.75
    # video 0's column [0.2 0.7 0.6 0.5]: t1 is first (t0 would be 4th); video 1's [0.9 0.1 0.4 0.3]: t2 is 2nd
    assert m["video_to_text"] == {"R@1": 0.5, "R@5": 1.0, "R@10": 1.0, "MdR": 1.5, "MnR": 1.5, "queries": 2}


def test_recall_at_5_and_10_and_the_median_of_an_even_count():
    scores = torch.arange(12, 0, -1).float()  # candidate j is ranked j + 1 by every query
    correct = torch.zeros(2, 12, dtype=torch.bool)
    correct[0, 6] = correct[1, 10] = True  # ranks 7 and 11
    ranks = target_ranks(torch.stack([scores, scores]), correct)
    assert ranks.tolist() == [7, 11]
    assert rank_metrics(ranks) == {"R@1": 0.0, "R@5": 0.0, "R@10": 0.5, "MdR": 9.0, "MnR": 9.0, "queries": 2}


def test_a_video_without_any_text_is_refused():
    with pytest.raises(ValueError, match=r"queries \[1\] have no correct candidate"):
        retrieval_metrics(torch.eye(2), [0, 0])
