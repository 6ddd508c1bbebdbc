"""The video-text model that zero-shot retrieval evaluates, and the models that provide it.

Protocol (`VideoTextModel`): `encode_videos(clips (B, 3, T, H, W) CLIP-normalized) -> (B, D)` and
`encode_texts(list[str]) -> (N, D)`, both L2-normalized, so a dot product is the cosine similarity; `match_score`
is None, or a video-text matching head `(text_indices, video_indices) -> scores` over the texts and videos encoded
last, which the evaluation uses to re-rank the top-k (see `pipeline.eval.rerank`).

Implementations, picked by `model.kind` in `build_video_text_model`:
- `open_clip`: `OpenClipMeanP`, an image CLIP applied frame by frame with the frame features mean-pooled over time
  (CLIP4Clip's zero-shot "meanP" baseline); any open_clip model, the demo's `tiny-clip` included.
Stage 2's VideoMamba video-text model is meant to be the next kind here.
"""
from __future__ import annotations

from typing import Callable, Optional, Protocol

import open_clip
import torch
import torch.nn.functional as F

from pipeline.config import RetrievalModelConfig
from pipeline.models.teacher import OpenClipKeys, create_open_clip


class VideoTextModel(Protocol):
    match_score: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]

    def encode_videos(self, clips: torch.Tensor) -> torch.Tensor:
        ...

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        ...


class OpenClipMeanP:
    """An open_clip CLIP as a video-text model: frame features normalized, averaged over T, normalized again."""

    match_score = None  # CLIP has no matching head

    def __init__(self, model: torch.nn.Module, tokenizer, device: torch.device):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device

    @torch.no_grad()
    def encode_videos(self, clips: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = clips.shape
        frames = clips.to(self.device).transpose(1, 2).reshape(b * t, c, h, w)
        features = F.normalize(self.model.encode_image(frames).float(), dim=-1)
        return F.normalize(features.view(b, t, -1).mean(dim=1), dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)


def build_video_text_model(model_cfg: RetrievalModelConfig, checkpoint: str, img_size: int,
                           device: torch.device) -> VideoTextModel:
    """Returns the model of `model_cfg.kind` with the weights of `checkpoint` (for open_clip: a checkpoint file or
    URL with `<model.name>.json` beside it for a custom model, or a pretrained tag)."""
    if model_cfg.kind == "open_clip":
        model = create_open_clip(model_cfg.name, checkpoint, img_size, OpenClipKeys("model.name", "--checkpoint"))
        return OpenClipMeanP(model, open_clip.get_tokenizer(model_cfg.name), device)
    raise ValueError(f"model.kind {model_cfg.kind!r} has no implementation")
