"""The evaluation on a GPU (skipped without one): a small stage-2 model on CUDA scores the synthetic eval set with
the decoder `auto` picks (DALI when installed), features, similarity and UMT's re-ranking on the GPU, the fusion
layers called on many (text, video) pairs at a time; the scores agree with the same model on the CPU.

    python -m pytest -q tests/eval/test_eval_cuda.py
"""
import copy

import pytest
import torch

from pipeline.config import RetrievalConfig, VideoTextStageConfig
from pipeline.eval.annotations import read_annotations
from pipeline.eval.models import VideoMambaRetrieval
from pipeline.eval.retrieval import scored_retrieval
from pipeline.eval.scores import metrics_from_scores, write_scores
from pipeline.models.factory import build_video_text_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def small_stage2(frames: int, size: int, bert_dir: str):
    cfg = VideoTextStageConfig()
    cfg.model.depth, cfg.model.embed_dim = 4, 96
    cfg.text.pretrained, cfg.text.fusion_layer, cfg.text.embed_dim = bert_dir, 1, 32  # the tiny BERT: 3 layers
    torch.manual_seed(0)
    model, tokenizer = build_video_text_model(cfg, frames, size)
    return model.eval(), tokenizer, cfg.text.max_len


class CountingCalls:
    """The wrapper's match_logits, recording how many pairs each call of the fusion layers gets."""

    def __init__(self, match_logits):
        self.match_logits, self.sizes = match_logits, []

    def __call__(self, texts, videos):
        self.sizes.append(len(texts))
        out = self.match_logits(texts, videos)
        assert out.is_cuda
        return out


def test_the_evaluation_runs_on_the_gpu_and_agrees_with_the_cpu(synth_corpus, tiny_bert_dir, tmp_path):
    ann = read_annotations(str(synth_corpus / "eval" / "msrvtt_test.json"), "msrvtt")
    videos = str(synth_corpus / "eval" / "videos")
    cfg = RetrievalConfig()
    cfg.data.num_frames, cfg.data.img_size = 4, 64
    cfg.eval.num_workers, cfg.eval.batch_size, cfg.eval.rerank_k, cfg.eval.rerank_batch = 2, 4, 3, 16
    model, tokenizer, max_len = small_stage2(4, 64, tiny_bert_dir)
    cuda = torch.device("cuda")
    wrapper = VideoMambaRetrieval(copy.deepcopy(model).to(cuda), tokenizer, max_len, cuda)
    counting = CountingCalls(wrapper.match_logits)
    wrapper.match_logits = counting
    gpu = scored_retrieval(wrapper, cfg, ann, videos, cuda, progress=False)
    assert gpu.scores.similarity.is_cuda and gpu.scores.t2v.is_cuda and gpu.scores.v2t.is_cuda
    assert gpu.result["counts"]["videos_evaluated"] == len(ann.videos) and gpu.result["rerank"]["applied"]
    assert max(counting.sizes) == 16 > cfg.eval.rerank_k  # many queries' pairs per call of the fusion layers

    url = str(tmp_path / "scores.npz")
    s = gpu.scores
    write_scores(url, s.similarity, s.text_video, s.videos, s.texts, s.t2v, s.v2t)
    assert metrics_from_scores(url) == gpu.result["metrics"]

    cfg.eval.decoder = "cpu"
    cpu = scored_retrieval(VideoMambaRetrieval(model, tokenizer, max_len, torch.device("cpu")), cfg, ann, videos,
                           torch.device("cpu"), progress=False)
    # bf16 autocast and the GPU decoder's rounding against fp32 and PyAV on the CPU
    assert torch.allclose(gpu.scores.similarity.cpu(), cpu.scores.similarity, atol=0.05)
    same = ((gpu.scores.t2v.cpu() == -100) == (cpu.scores.t2v == -100)).all(dim=1)  # rows with the same top k
    assert same.any() and torch.allclose(gpu.scores.t2v.cpu()[same], cpu.scores.t2v[same], atol=0.1)
