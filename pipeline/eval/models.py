"""The video-text model that zero-shot retrieval evaluates, and the models that provide it.

Protocol (`VideoTextModel`):
- `frames`: how the model wants its test frames (`pipeline.data.transforms.EvalFrames`: box, resize, normalization);
- `encode_videos(clips (B, 3, T, H, W)) -> (B, D)` and `encode_texts(list[str], max_len) -> (N, D)`, both
  L2-normalized, so a dot product is the cosine similarity; `text_length(max_len)` is the token count it will use;
- `match_logits`: None, or the video-text matching head's raw "match" logit `(text_indices, video_indices) -> (n,)`
  over the texts and videos encoded so far (in encoding order), which UMT's re-ranking uses
  (`pipeline.eval.rerank`). Build a fresh wrapper for each evaluation.

Implementations (`videomamba eval` builds them from --checkpoint by `model.kind`, in `pipeline.stages.retrieval`):
- `open_clip`: `OpenClipMeanP`, an image CLIP applied frame by frame with the frame features mean-pooled over time
  (CLIP4Clip's zero-shot "meanP" baseline); any open_clip model, the demo's `tiny-clip` included; its own
  preprocessing (bicubic shorter-side resize, centre crop, its mean and std) and its own text length.
- `videomamba`: `VideoMambaRetrieval`, a stage-2 video-text model (a stage-2 run, or a released video_mm .pth
  file) with its matching head, fed as the official video_mm evaluation feeds VideoMamba (the whole frame resized
  bicubic, ImageNet mean and std) under bf16 autocast on a GPU (video_mm's `fp16 = bf16 = True`); texts through its
  BERT tokenizer. A clip's embedding is the mean of its L2-normalized per-frame embeddings (the official similarity,
  averaged over frames), not renormalized.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Protocol

import torch
import torch.nn.functional as F

from pipeline.data.transforms import CLIP_MEAN, CLIP_STD, VIDEOMAMBA_EVAL_FRAMES, EvalFrames, open_clip_eval_frames


class VideoTextModel(Protocol):
    frames: EvalFrames
    match_logits: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]

    def encode_videos(self, clips: torch.Tensor) -> torch.Tensor:
        ...

    def encode_texts(self, texts: list[str], max_len: int) -> torch.Tensor:
        ...

    def text_length(self, max_len: int) -> int:
        ...


class OpenClipMeanP:
    """An open_clip CLIP as a video-text model: frame features normalized, averaged over T, normalized again."""

    match_logits = None  # CLIP has no matching head

    def __init__(self, model: torch.nn.Module, tokenizer, device: torch.device):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device
        visual = getattr(model, "visual", None)
        self.frames = open_clip_eval_frames(getattr(visual, "image_mean", None) or CLIP_MEAN,
                                            getattr(visual, "image_std", None) or CLIP_STD)

    def text_length(self, max_len: int) -> int:
        return int(getattr(self.tokenizer, "context_length", 77))  # CLIP's own, whatever the benchmark's

    @torch.no_grad()
    def encode_videos(self, clips: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = clips.shape
        frames = clips.to(self.device).transpose(1, 2).reshape(b * t, c, h, w)
        features = F.normalize(self.model.encode_image(frames).float(), dim=-1)
        return F.normalize(features.view(b, t, -1).mean(dim=1), dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts: list[str], max_len: int) -> torch.Tensor:
        tokens = self.tokenizer(texts).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)


class VideoMambaRetrieval:
    """A stage-2 VideoMamba video-text model (already on `device`; the caller sets eval mode). It keeps the video
    tokens and text states of everything it encoded, on the device, so that `match_logits` can run the cross-modal
    layers on any batch of (text, video) pairs."""

    def __init__(self, model: torch.nn.Module, tokenizer, max_len: int, device: torch.device,
                 frames: EvalFrames = VIDEOMAMBA_EVAL_FRAMES):
        self.model, self.tokenizer, self.max_len, self.device, self.frames = model, tokenizer, max_len, device, frames
        self._videos: list[torch.Tensor] = []
        self._texts: list[torch.Tensor] = []
        self._masks: list[torch.Tensor] = []

    def text_length(self, max_len: int) -> int:
        """The benchmark's length, or the model's own position count when that is shorter."""
        return min(max_len, self.max_len)

    def _autocast(self):
        """bf16 autocast on a GPU (the official evaluation's); a model whose weights are in half precision (a bf16
        or fp16 training run evaluated as it trains) runs under autocast to its own dtype, on the CPU too."""
        weights = next(self.model.parameters()).dtype
        if weights in (torch.float16, torch.bfloat16):
            return torch.autocast(self.device.type, dtype=weights)
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def encode_videos(self, clips: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            embed, tokens, _ = self.model.encode_video(clips.to(self.device))
        self._videos.append(tokens)
        return embed.float()

    @torch.no_grad()
    def encode_texts(self, texts: list[str], max_len: int) -> torch.Tensor:
        tokens = self.tokenizer(texts, self.text_length(max_len))
        attention_mask = tokens.attention_mask.to(self.device)
        with self._autocast():
            embed, hidden = self.model.encode_text(tokens.ids.to(self.device), attention_mask)
        self._texts.append(hidden)
        self._masks.append(attention_mask)
        return embed.float()

    @torch.no_grad()
    def match_logits(self, text_index: torch.Tensor, video_index: torch.Tensor) -> torch.Tensor:
        """The matching head's "match" logit (itm_head(...)[:, 1], as UMT re-ranks by) of each (text, video) pair,
        indices in encoding order; one call of the fusion layers for all the pairs given."""
        if len(self._videos) > 1:
            self._videos = [torch.cat(self._videos)]
        if len(self._texts) > 1:
            self._texts, self._masks = [torch.cat(self._texts)], [torch.cat(self._masks)]
        t, v = text_index.to(self.device), video_index.to(self.device)
        with self._autocast():
            logits = self.model.match_logits(self._texts[0][t], self._masks[0][t], self._videos[0][v])
        return logits[:, 1].float()
