"""The retrieval library on a built model: the scores of a small real model with a matching head, re-ranked."""
import pytest
import torch

from pipeline.config import RetrievalConfig
from pipeline.eval.annotations import read_annotations
from pipeline.eval.retrieval import retrieval_result


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory):
    """5 held-out synthetic videos and their MSRVTT-format annotations."""
    from shards.synth import write_corpus

    root = tmp_path_factory.mktemp("eval_set")
    write_corpus(str(root / "corpus"), videos=1, images=0, seed=3, size=32, frames=8, fps=8, eval_videos=5,
                 workers=1, progress=False)
    return root / "corpus" / "eval"


class _MatchingClip:
    """A small real model with a matching head: videos are their mean colour, every text the same vector (so all
    texts rank the videos alike and only one of the 5 finds its video first), and the head knows each text's video
    (a perfect judge), so re-ranking the top 5 of 5 must give R@1 = 1 both ways."""

    def __init__(self, texts_video):
        self.texts_video = torch.as_tensor(texts_video)

    def encode_videos(self, clips):
        return torch.nn.functional.normalize(clips.mean(dim=(2, 3, 4))[:, :3], dim=-1)

    def encode_texts(self, texts):
        return torch.nn.functional.normalize(torch.ones(len(texts), 3), dim=-1)

    def match_score(self, text_indices, video_indices):
        return (self.texts_video[text_indices] == video_indices).float() * 10


def test_a_matching_head_re_ranks_the_top_k(eval_set, one_thread):
    ann = read_annotations(str(eval_set / "msrvtt_test.json"), "msrvtt")
    cfg = RetrievalConfig()
    cfg.data.num_frames, cfg.data.img_size, cfg.eval.num_workers, cfg.eval.rerank_k = 2, 32, 0, 5
    result = retrieval_result(_MatchingClip(ann.text_video), cfg, ann, str(eval_set / "videos"), progress=False)
    assert result["rerank"] == {"k": 5, "applied": True}
    assert result["metrics"]["text_to_video"]["R@1"] == 0.2  # one video is everyone's first
    assert result["reranked_metrics"]["text_to_video"]["R@1"] == 1.0
    assert result["reranked_metrics"]["video_to_text"]["R@1"] == 1.0
