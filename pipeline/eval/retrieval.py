"""Zero-shot text-video retrieval of a built video-text model on an eval set, scored as UMT scores it
(tasks/retrieval_utils.py `evaluation` and `itm_eval`; the per-benchmark settings of VideoMamba's exp_zs configs).

`scored_retrieval(model, cfg, annotations, videos)`:
1. reads and decodes every listed video (DALI on the GPU when installed, else PyAV in `eval.num_workers` processes)
   with the model's own test frames (`model.frames`): UMT's "middle" frames of the video (DiDeMo: of its first 30
   seconds), resized and normalized as the model wants; and encodes them `eval.batch_size` at a time;
2. stops there, listing them, when a video is missing or cannot be decoded, unless `eval.allow_missing` (then the
   rest is scored, their texts only, and the result says "on N of M videos");
3. encodes the texts (cleaned as UMT's pre_text, cut at the benchmark's length), 256 at a time as UMT does;
4. scores every text against every video by the cosine similarity (contrastive), and, for a model with a matching
   head, re-ranks as UMT does (`pipeline.eval.rerank`: match logit in each query's top k_test, -100 elsewhere);
5. returns the result (UMT's metrics and ours, for both scores: `pipeline.eval.metrics`; counts; skipped videos;
   where the time went) and the score matrices, which `pipeline.eval.report` writes.
Everything after decoding stays on the model's device. `videomamba eval` (`pipeline.stages.retrieval`) builds the
model from a checkpoint and calls this; training calls it every train.eval_every steps.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import fsspec
import torch
from tqdm import tqdm

from pipeline.config import RetrievalConfig, RetrievalEvalConfig
from pipeline.data.decode import (CpuDecoder, DaliDecoder, DecodeError, EncodedSample, dali_device, opened,
                                  resolved_decoder_name)
from pipeline.data.transforms import eval_plan, run_eval_frames
from pipeline.errors import ConfigError
from pipeline.eval.annotations import RetrievalAnnotations, read_annotations
from pipeline.eval.metrics import contrastive_metrics, reranked_metrics
from pipeline.eval.models import VideoMambaRetrieval, VideoTextModel
from pipeline.eval.protocol import BENCHMARKS
from pipeline.eval.rerank import umt_reranked

TEXT_BATCH = 256  # texts encoded per forward (UMT's extract_text_feats: text_bs = 256)
LISTED = 10  # missing or broken videos named in a message (all of them are in the result)


class NoUsableVideos(RuntimeError):
    """Not one listed video could be read and decoded."""


class MissingVideos(RuntimeError):
    """Some listed videos are missing or cannot be decoded and eval.allow_missing is false; `skipped` lists them."""

    def __init__(self, message: str, skipped: list[dict]):
        super().__init__(message)
        self.skipped = skipped


@dataclass
class RetrievalScores:
    """The matrices an evaluation ranked by (see `pipeline.eval.scores` for what each is)."""

    similarity: torch.Tensor
    text_video: list[int]
    videos: list[str]
    texts: list[str]
    t2v: Optional[torch.Tensor] = None
    v2t: Optional[torch.Tensor] = None


@dataclass
class Evaluation:
    result: dict
    scores: RetrievalScores


@dataclass
class _Timer:
    seconds: dict = field(default_factory=lambda: {"decode": 0.0, "video_encoding": 0.0, "text_encoding": 0.0,
                                                   "similarity": 0.0, "rerank": 0.0, "metrics": 0.0})

    def add(self, key: str, started: float, device: torch.device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        self.seconds[key] += now - started
        return now


def check_retrieval_config(cfg: RetrievalConfig) -> None:
    """Raises ConfigError for values no evaluation can use."""
    for key, value, least in (("data.num_frames", cfg.data.num_frames, 1), ("data.img_size", cfg.data.img_size, 1),
                              ("eval.batch_size", cfg.eval.batch_size, 1), ("eval.rerank_k", cfg.eval.rerank_k, 0),
                              ("eval.rerank_batch", cfg.eval.rerank_batch, 1),
                              ("eval.num_workers", cfg.eval.num_workers, 0)):
        if value is not None and value < least:
            raise ConfigError(f"{key}={value}: must be at least {least}")


def allows_missing(cfg: RetrievalConfig, dataset: str) -> bool:
    """eval.allow_missing, or the benchmark's default when it is null."""
    return BENCHMARKS[dataset].allow_missing if cfg.eval.allow_missing is None else cfg.eval.allow_missing


def scored_retrieval(model: VideoTextModel, cfg: RetrievalConfig, ann: RetrievalAnnotations, videos: str,
                     device: torch.device, progress: bool = True) -> Evaluation:
    """Evaluates `model` (on `device`, in eval mode) on `ann` with the videos under `videos`; see the module."""
    timer = _Timer()
    bench = BENCHMARKS[ann.dataset]
    video_features, kept, skipped = encoded_videos(model, ann, videos, cfg, device, timer, progress)
    if not kept:
        first = skipped[0]
        raise NoUsableVideos(f"none of the {len(ann.videos)} videos under {videos} could be used: "
                             f"{first['video']}: {first['reason']} (and {len(skipped) - 1} more)")
    if skipped and not allows_missing(cfg, ann.dataset):
        listed = "; ".join(f"{s['video']}: {s['kind']}" for s in skipped[:LISTED])
        more = f" (and {len(skipped) - LISTED} more)" if len(skipped) > LISTED else ""
        raise MissingVideos(f"{len(skipped)} of the {len(ann.videos)} {ann.dataset} videos under {videos} are missing "
                            f"or cannot be decoded: {listed}{more}. Nothing was scored; eval.allow_missing=true scores "
                            f"the other {len(kept)}", skipped)
    texts, text_video = kept_texts(ann, kept)
    text_len = model.text_length(bench.max_text_len)
    started = time.perf_counter()
    text_features = encoded_texts(model, texts, text_len)
    started = timer.add("text_encoding", started, device)
    similarity = (text_features.float() @ video_features.float().T)
    started = timer.add("similarity", started, device)
    t2v = v2t = None
    if model.match_logits is not None and cfg.eval.rerank_k > 0:
        t2v, v2t = umt_reranked(similarity, cfg.eval.rerank_k, model.match_logits, cfg.eval.rerank_batch)
        started = timer.add("rerank", started, device)
    metrics = {"contrastive": contrastive_metrics(similarity, text_video)}
    if t2v is not None:
        metrics["reranked"] = reranked_metrics(t2v, v2t, similarity, text_video)
    timer.add("metrics", started, device)
    names = [ann.videos[i] for i in kept]
    result = {
        "dataset": ann.dataset,
        "format": ann.format,
        "protocol": {"frames": cfg.data.num_frames, "img_size": cfg.data.img_size, "sampling": "middle",
                     "trim_seconds": bench.trim_seconds, "text_length": text_len,
                     "benchmark_text_length": bench.max_text_len, "paragraphs": bench.paragraph,
                     "frames_preprocessing": vars(model.frames).copy()},
        "counts": {"videos": len(ann.videos), "texts": len(ann.texts), "videos_evaluated": len(kept),
                   "texts_evaluated": len(texts), "videos_skipped": len(skipped)},
        "coverage": f"on {len(kept)} of {len(ann.videos)} videos" if skipped else None,
        "chance_r1": 100.0 / len(kept),
        "metrics": metrics,
        "rerank": rerank_outcome(model, cfg.eval.rerank_k),
        "skipped": skipped,
        "timing": {k: round(v, 3) for k, v in timer.seconds.items()},
    }
    return Evaluation(result, RetrievalScores(similarity, text_video, names, texts, t2v, v2t))


def training_evaluation(settings: RetrievalEvalConfig, annotations: str, videos: str, dataset: Optional[str],
                        num_frames: int, img_size: int, tokenizer, max_len: int, normalize: str
                        ) -> Callable[[torch.nn.Module, int], dict]:
    """Returns `evaluate(model, step)` for the trainer: this evaluation of the training stage-2 model (eval mode,
    no_grad: the trainer's part) on the set, at the run's frame count and size, with the normalization it is
    trained with (`normalize`: its data.normalize); it returns R@1 both ways and R mean (re-ranked when the model
    re-ranks, also the contrastive ones), in %. The annotations are read now, so a bad file stops the run before
    training."""
    ann = read_annotations(annotations, dataset)
    cfg = RetrievalConfig()
    cfg.data.num_frames, cfg.data.img_size = num_frames, img_size
    cfg.eval = RetrievalEvalConfig(**{f.name: getattr(settings, f.name)
                                      for f in dataclasses.fields(RetrievalEvalConfig)})
    check_retrieval_config(cfg)

    def evaluate(model: torch.nn.Module, step: int) -> dict:
        device = next(model.parameters()).device
        wrapper = VideoMambaRetrieval(model, tokenizer, max_len, device, run_eval_frames(normalize))
        metrics = scored_retrieval(wrapper, cfg, ann, videos, device, progress=False).result["metrics"]
        out = {}
        for kind, prefix in (("contrastive", "eval/itc_"), ("reranked", "eval/")):
            if kind in metrics:
                m = metrics[kind]
                out.update({f"{prefix}t2v_r1": m["img_r1"], f"{prefix}v2t_r1": m["txt_r1"],
                            f"{prefix}r_mean": m["r_mean"]})
        return out

    return evaluate


def rerank_outcome(model: VideoTextModel, k: int) -> dict:
    if model.match_logits is None:
        return {"k": k, "applied": False, "why": "the model has no video-text matching head"}
    if k == 0:
        return {"k": k, "applied": False, "why": "eval.rerank_k is 0"}
    return {"k": k, "applied": True, "score": "the matching head's match logit in each query's top k, -100 elsewhere"}


def kept_texts(ann: RetrievalAnnotations, kept: list[int]) -> tuple[list[str], list[int]]:
    """Returns the texts of the kept videos and, for each, its video's column among the kept ones."""
    column = {v: j for j, v in enumerate(kept)}
    pairs = [(t, column[v]) for t, v in zip(ann.texts, ann.text_video) if v in column]
    return [t for t, _ in pairs], [v for _, v in pairs]


def encoded_texts(model: VideoTextModel, texts: list[str], max_len: int) -> torch.Tensor:
    """Returns the features (N, D) of `texts`, encoded TEXT_BATCH at a time."""
    return torch.cat([model.encode_texts(texts[i:i + TEXT_BATCH], max_len) for i in range(0, len(texts), TEXT_BATCH)])


# ---------------------------------------------------------------------------------------------------- decoding
@dataclass
class _Item:
    index: int
    sample: Optional[EncodedSample] = None  # read and planned, to be decoded by DALI
    clip: Optional[torch.Tensor] = None  # decoded here (the CPU decoder)
    kind: str = ""
    reason: str = ""


class EvalMedia(torch.utils.data.Dataset):
    """The listed files read and planned with the test-time plan, and decoded when `decode` (the CPU decoder), else
    trimmed for DALI (`dali_ready`); one that cannot be read comes back with the reason."""

    def __init__(self, root: str, ann: RetrievalAnnotations, num_frames: int, img_size: int, frames, decode: bool):
        self.root, self.ann, self.decode = root.rstrip("/"), ann, decode
        self.num_frames, self.img_size, self.frames = num_frames, img_size, frames
        self.trim = BENCHMARKS[ann.dataset].trim_seconds
        self.decoder = CpuDecoder(threads=1)

    def __len__(self) -> int:
        return len(self.ann.videos)

    def __getitem__(self, i: int) -> _Item:
        name = self.ann.videos[i]
        url = f"{self.root}/{name}"
        try:
            with fsspec.open(url, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return _Item(i, kind="missing", reason=f"no such file: {url}")
        try:
            with opened(data, self.ann.media) as source:
                info = source.info
                plan = eval_plan(info.frames, info.fps, info.width, info.height, self.num_frames, self.img_size,
                                 self.frames, self.trim)
                sample = EncodedSample(name, self.ann.media, data, plan)
                if not self.decode:  # for DALI: only the packets the plan needs (a long video's few GOPs)
                    return _Item(i, sample=source.dali_ready(sample))
                return _Item(i, clip=self.decoder.decode_one(sample, source))
        except DecodeError as e:
            return _Item(i, kind=e.kind, reason=str(e))


def decoded_batches(ann: RetrievalAnnotations, root: str, cfg: RetrievalConfig, frames, device: torch.device,
                    timer: _Timer) -> Iterator[tuple[list[int], Optional[torch.Tensor], list[dict]]]:
    """Yields (indices, clips (B', 3, T, S, S) or None, skipped [{"video", "kind", "reason"}]) per batch."""
    dali = resolved_decoder_name(cfg.eval.decoder) == "dali"
    dataset = EvalMedia(root, ann, cfg.data.num_frames, cfg.data.img_size, frames, decode=not dali)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.eval.batch_size, num_workers=cfg.eval.num_workers,
                                         collate_fn=list)
    decoder = DaliDecoder(dali_device(), max_batch=cfg.eval.batch_size) if dali else None
    started = time.perf_counter()
    for batch in loader:
        skipped = [{"video": ann.videos[d.index], "kind": d.kind, "reason": d.reason} for d in batch if d.kind]
        good = [d for d in batch if not d.kind]
        clips = None
        if good and decoder is not None:
            clips, failures = decoder.decode([d.sample for d in good])
            failed = {i for i, _ in failures}
            skipped += [{"video": ann.videos[good[i].index], "kind": kind, "reason": "DALI could not decode it"}
                        for i, kind in failures]
            good = [d for i, d in enumerate(good) if i not in failed]
        elif good:
            clips = torch.stack([d.clip for d in good])
        timer.add("decode", started, device)
        yield [d.index for d in good], (clips if good else None), skipped
        started = time.perf_counter()


def encoded_videos(model: VideoTextModel, ann: RetrievalAnnotations, root: str, cfg: RetrievalConfig,
                   device: torch.device, timer: _Timer, progress: bool) -> tuple[torch.Tensor, list[int], list[dict]]:
    """Returns the features (kept, D) of the videos that decoded (on `device`), their indices into `ann.videos`,
    and the skipped ones."""
    features, kept, skipped = [], [], []
    with tqdm(total=len(ann.videos), desc="[eval] encoding videos", unit="video", disable=not progress) as bar:
        for indices, clips, missed in decoded_batches(ann, root, cfg, model.frames, device, timer):
            skipped += missed
            if clips is not None:
                started = time.perf_counter()
                features.append(model.encode_videos(clips.to(device, non_blocking=True)))
                timer.add("video_encoding", started, device)
                kept += indices
            bar.update(len(indices) + len(missed))
    return (torch.cat(features) if features else torch.empty(0)), kept, skipped
