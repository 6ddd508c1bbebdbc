"""The retrieval library on a built model: UMT's re-ranking by a small real model's matching head, allow_missing
both ways, and the result's scores recomputed."""
import json

import pytest
import torch

from pipeline.config import RetrievalConfig
from pipeline.data.transforms import open_clip_eval_frames
from pipeline.eval.annotations import read_annotations
from pipeline.eval.retrieval import MissingVideos, scored_retrieval


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
    texts rank the videos alike and only one of the 5 finds its video first), and the head's match logit knows each
    text's video (a perfect judge), so re-ranking the top 5 of 5 must give R@1 = 100% both ways."""

    frames = open_clip_eval_frames((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))

    def __init__(self, texts_video):
        self.texts_video = torch.as_tensor(texts_video)

    def text_length(self, max_len):
        return max_len

    def encode_videos(self, clips):
        return torch.nn.functional.normalize(clips.mean(dim=(2, 3, 4))[:, :3], dim=-1)

    def encode_texts(self, texts, max_len):
        return torch.nn.functional.normalize(torch.ones(len(texts), 3), dim=-1)

    def match_logits(self, text_indices, video_indices):
        return (self.texts_video[text_indices] == video_indices).float() * 10 - 5


def config(**eval_keys):
    cfg = RetrievalConfig()
    cfg.data.num_frames, cfg.data.img_size, cfg.eval.num_workers, cfg.eval.rerank_k = 2, 32, 0, 5
    for key, value in eval_keys.items():
        setattr(cfg.eval, key, value)
    return cfg


def test_a_matching_head_re_ranks_the_top_k_by_its_logit(eval_set, one_thread):
    ann = read_annotations(str(eval_set / "msrvtt_test.json"), "msrvtt")
    evaluation = scored_retrieval(_MatchingClip(ann.text_video), config(), ann, str(eval_set / "videos"),
                                  torch.device("cpu"), progress=False)
    result = evaluation.result
    assert result["rerank"]["applied"] and result["rerank"]["k"] == 5
    assert result["metrics"]["contrastive"]["img_r1"] == 20.0  # one video is everyone's first
    assert result["metrics"]["reranked"]["img_r1"] == result["metrics"]["reranked"]["txt_r1"] == 100.0
    assert set(evaluation.scores.t2v.unique().tolist()) == {-5.0, 5.0}  # the raw logit, no similarity added
    assert result["coverage"] is None and result["protocol"]["text_length"] == 32  # MSRVTT's


def test_allow_missing_both_ways(eval_set, tmp_path, one_thread):
    entries = json.loads((eval_set / "msrvtt_test.json").read_text())
    entries.append({"video": "gone.mp4", "caption": "a lost clip"})
    path = tmp_path / "msrvtt_ret_test1k.json"
    path.write_text(json.dumps(entries))
    ann = read_annotations(str(path))
    model = _MatchingClip(ann.text_video)
    with pytest.raises(MissingVideos, match=r"1 of the 6 msrvtt videos .* gone.mp4: missing. Nothing was scored") as e:
        scored_retrieval(model, config(), ann, str(eval_set / "videos"), torch.device("cpu"), progress=False)
    assert [s["video"] for s in e.value.skipped] == ["gone.mp4"]
    result = scored_retrieval(model, config(allow_missing=True), ann, str(eval_set / "videos"), torch.device("cpu"),
                              progress=False).result
    assert result["coverage"] == "on 5 of 6 videos" and result["counts"]["texts_evaluated"] == 5
    assert result["metrics"]["reranked"]["t2v_queries"] == 5


def test_dali_gets_only_the_packets_an_eval_plan_needs_and_decodes_the_same_clip(tmp_path):
    """A long test video spans many GOPs but the eval plan takes 8 frames: the workers hand DALI the GOPs those
    frames need (DALI decodes every frame of what it gets), and DALI's clip is the one the whole video gives."""
    pytest.importorskip("nvidia.dali")
    import numpy as np

    from pipeline.data.decode import DaliDecoder, EncodedSample, probe
    from pipeline.data.transforms import VIDEOMAMBA_EVAL_FRAMES, eval_plan
    from pipeline.eval.annotations import RetrievalAnnotations
    from pipeline.eval.retrieval import EvalMedia
    from shards.synth import encode_mp4

    base = np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8)
    data = encode_mp4(np.stack([np.roll(base, 2 * i, axis=1) for i in range(240)]), fps=30, codec="vp9",
                      options={"g": "30"})
    (tmp_path / "long.webm").write_bytes(data)
    ann = RetrievalAnnotations(["long.webm"], ["a caption"], [0])
    handed = EvalMedia(str(tmp_path), ann, 8, 32, VIDEOMAMBA_EVAL_FRAMES, decode=False)[0].sample
    assert probe(handed.data, "video").frames <= 240 // 2  # of 8 GOPs, the ones the 8 frames need
    plan = eval_plan(240, 30.0, 48, 32, 8, 32, VIDEOMAMBA_EVAL_FRAMES)
    dali = DaliDecoder("cpu", max_batch=1)
    trimmed, whole = dali.decode([handed]), dali.decode([EncodedSample("long.webm", "video", data, plan)])
    assert trimmed[1] == whole[1] == [] and torch.equal(trimmed[0], whole[0])
