"""scores.npz: every matrix and index written, read back without pickles, and the metrics recomputed from it."""
import numpy as np
import torch

from pipeline.eval.metrics import contrastive_metrics, reranked_metrics
from pipeline.eval.rerank import umt_reranked
from pipeline.eval.scores import metrics_from_scores, read_scores, write_scores


def test_metrics_recomputed_from_scores_npz_equal_the_written_ones(tmp_path):
    torch.manual_seed(3)
    similarity = torch.randn(9, 4)
    text_video = [0, 1, 2, 3, 0, 1, 2, 3, 3]
    t2v, v2t = umt_reranked(similarity, 2, lambda t, v: torch.randn(len(t)))
    written = {"contrastive": contrastive_metrics(similarity, text_video),
               "reranked": reranked_metrics(t2v, v2t, similarity, text_video)}
    url = str(tmp_path / "scores.npz")
    write_scores(url, similarity, text_video, [f"v{i}.mp4" for i in range(4)], [f"text {i}" for i in range(9)],
                 t2v, v2t)
    assert metrics_from_scores(url) == written
    data = read_scores(url)
    assert data["similarity"].shape == (9, 4) and data["t2v"].shape == (9, 4) and data["v2t"].shape == (4, 9)
    assert data["text_video"].dtype == np.int64 and data["videos"].tolist()[3] == "v3.mp4"
    assert (data["t2v"] == -100).sum() == 9 * 2 and data["texts"].tolist()[8] == "text 8"


def test_without_re_ranking_only_the_similarity(tmp_path):
    url = "memory://eval/scores.npz"
    write_scores(url, torch.eye(3), [0, 1, 2], ["a", "b", "c"], ["x", "y", "z"])
    out = metrics_from_scores(url)
    assert list(out) == ["contrastive"] and out["contrastive"]["img_r1"] == 100.0
