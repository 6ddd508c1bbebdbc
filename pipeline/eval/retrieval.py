"""Zero-shot text-video retrieval of a built video-text model on an eval set: R@1/5/10, median and mean rank,
text->video and video->text.

`retrieval_result(model, cfg, annotations, videos)` decodes every listed video (T frames: the middle frame of each
of T equal segments, shorter side resized and centre-cropped, CLIP-normalized; on the CPU), encodes the videos and
the texts, ranks them by cosine similarity and, for a model with a video-text matching head, re-ranks each query's
top eval.rerank_k by it (UMT's protocol). A video that is missing or cannot be decoded is counted, listed with the
reason and left out of the metrics together with its texts. `videomamba eval` (`pipeline.stages.retrieval`) builds
the model from a checkpoint and calls it; `pipeline.eval.report` writes the result.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import fsspec
import numpy as np
import torch
from tqdm import tqdm

from pipeline.config import RetrievalConfig
from pipeline.data.decode import CpuDecoder, DecodeError, EncodedSample, probe
from pipeline.data.transforms import clip_plan
from pipeline.errors import ConfigError
from pipeline.eval.annotations import RetrievalAnnotations
from pipeline.eval.metrics import retrieval_metrics
from pipeline.eval.models import VideoTextModel
from pipeline.eval.rerank import reranked


class NoUsableVideos(RuntimeError):
    """Not one listed video could be read and decoded."""


def check_retrieval_config(cfg: RetrievalConfig) -> None:
    """Raises ConfigError for values no evaluation can use."""
    for key, value, least in (("data.num_frames", cfg.data.num_frames, 1), ("data.img_size", cfg.data.img_size, 1),
                              ("eval.batch_size", cfg.eval.batch_size, 1), ("eval.rerank_k", cfg.eval.rerank_k, 0),
                              ("eval.num_workers", cfg.eval.num_workers, 0)):
        if value < least:
            raise ConfigError(f"{key}={value}: must be at least {least}")


def retrieval_result(model: VideoTextModel, cfg: RetrievalConfig, ann: RetrievalAnnotations, videos: str,
                     progress: bool) -> dict:
    """Returns the metrics, counts, skipped videos and re-ranking outcome of `model` on `ann`."""
    video_features, kept, skipped = encoded_videos(model, ann.videos, videos, cfg, progress)
    if not kept:
        raise NoUsableVideos(f"none of the {len(ann.videos)} videos under {videos} could be used: "
                             f"{skipped[0]['video']}: {skipped[0]['reason']} (and {len(skipped) - 1} more)")
    texts, text_video = kept_texts(ann, kept)
    text_features = encoded_texts(model, texts, cfg.eval.batch_size)
    similarity = (text_features @ video_features.T).float().cpu()
    result = {
        "counts": {"videos": len(ann.videos), "texts": len(ann.texts), "videos_evaluated": len(kept),
                   "texts_evaluated": len(texts), "videos_skipped": len(skipped)},
        "chance_r1": 1.0 / len(kept),
        "metrics": retrieval_metrics(similarity, text_video),
        "skipped": skipped,
    }
    result.update(rerank_outcome(model, similarity, text_video, cfg.eval.rerank_k))
    return result


def kept_texts(ann: RetrievalAnnotations, kept: list[int]) -> tuple[list[str], list[int]]:
    """Returns the texts of the kept videos and, for each, its video's column among the kept ones."""
    column = {v: j for j, v in enumerate(kept)}
    pairs = [(t, column[v]) for t, v in zip(ann.texts, ann.text_video) if v in column]
    return [t for t, _ in pairs], [v for _, v in pairs]


def encoded_texts(model: VideoTextModel, texts: list[str], batch_size: int) -> torch.Tensor:
    """Returns the features (N, D) of `texts`, encoded `batch_size` at a time."""
    return torch.cat([model.encode_texts(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)])


def rerank_outcome(model: VideoTextModel, similarity: torch.Tensor, text_video: list[int], k: int) -> dict:
    """Returns {"rerank": what was done} and, when the model has a matching head and k > 0, the re-ranked metrics.

    The head's indices count the texts and videos in the order they were encoded (each once, skipped ones never)."""
    match = getattr(model, "match_score", None)
    if match is None or k == 0:
        why = "eval.rerank_k is 0" if k == 0 else "the model has no video-text matching head"
        return {"rerank": {"k": k, "applied": False, "why": why}}
    t2v = reranked(similarity, k, match)
    v2t = reranked(similarity.T, k, lambda q, c: match(c, q))
    t2v_metrics = retrieval_metrics(t2v, text_video)["text_to_video"]
    v2t_metrics = retrieval_metrics(v2t.T, text_video)["video_to_text"]
    return {"rerank": {"k": k, "applied": True},
            "reranked_metrics": {"text_to_video": t2v_metrics, "video_to_text": v2t_metrics}}


# ---------------------------------------------------------------------------------------------------- decoding
@dataclass
class _Decoded:
    index: int
    clip: Optional[torch.Tensor]
    kind: str = ""
    reason: str = ""


class EvalClips(torch.utils.data.Dataset):
    """The listed videos decoded with the evaluation plan; one that cannot be read comes back with the reason."""

    def __init__(self, root: str, names: list[str], num_frames: int, img_size: int):
        self.root, self.names, self.num_frames, self.img_size = root.rstrip("/"), names, num_frames, img_size
        self.decoder = CpuDecoder(threads=1)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> _Decoded:
        url = f"{self.root}/{self.names[i]}"
        try:
            with fsspec.open(url, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return _Decoded(i, None, "missing", f"no such file: {url}")
        try:
            info = probe(data, "video")
            plan = clip_plan(info.frames, info.fps, info.width, info.height, self.num_frames, self.img_size,
                             train=False, target_fps=None, rng=np.random.default_rng(0))
            return _Decoded(i, self.decoder.decode_one(EncodedSample(self.names[i], "video", data, plan)))
        except DecodeError as e:
            return _Decoded(i, None, e.kind, str(e))


def encoded_videos(model: VideoTextModel, names: list[str], root: str, cfg: RetrievalConfig,
                   progress: bool) -> tuple[torch.Tensor, list[int], list[dict]]:
    """Returns the features (kept, D) of the videos that decoded, their indices into `names`, and the skipped ones
    as {"video", "kind", "reason"}."""
    loader = torch.utils.data.DataLoader(EvalClips(root, names, cfg.data.num_frames, cfg.data.img_size),
                                         batch_size=cfg.eval.batch_size, num_workers=cfg.eval.num_workers,
                                         collate_fn=list)
    features, kept, skipped = [], [], []
    with tqdm(total=len(names), desc="[eval] encoding videos", unit="video", disable=not progress) as bar:
        for batch in loader:
            good = [d for d in batch if d.clip is not None]
            skipped += [{"video": names[d.index], "kind": d.kind, "reason": d.reason} for d in batch if d.clip is None]
            if good:
                features.append(model.encode_videos(torch.stack([d.clip for d in good])).cpu())
                kept += [d.index for d in good]
            bar.update(len(batch))
    return (torch.cat(features) if features else torch.empty(0)), kept, skipped
