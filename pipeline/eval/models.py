"""The video-text model that zero-shot retrieval evaluates, and the models that provide it.

Protocol (`VideoTextModel`): `encode_videos(clips (B, 3, T, H, W) CLIP-normalized) -> (B, D)` and
`encode_texts(list[str]) -> (N, D)`, both L2-normalized, so a dot product is the cosine similarity; `match_score`
is None, or a video-text matching head `(text_indices, video_indices) -> scores` over the texts and videos encoded
last, which the evaluation uses to re-rank the top-k (see `pipeline.eval.rerank`).

Implementations (`videomamba eval` builds them from --checkpoint by `model.kind`, in `pipeline.stages.retrieval`):
- `open_clip`: `OpenClipMeanP`, an image CLIP applied frame by frame with the frame features mean-pooled over time
  (CLIP4Clip's zero-shot "meanP" baseline); any open_clip model, the demo's `tiny-clip` included.
- `videomamba`: `VideoMambaRetrieval`, a stage-2 run (`--checkpoint`: its folder or one of its checkpoints; the
  model comes from the run's config.yaml), with its matching head for re-ranking. Position embeddings follow the
  evaluation's frame count and size.
"""
from __future__ import annotations

from typing import Callable, Optional, Protocol

import torch
import torch.nn.functional as F


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


class VideoMambaRetrieval:
    """A stage-2 VideoMamba video-text model. It keeps the video tokens and text states of everything it encoded
    (in fp16 on the CPU) so that `match_score` can run the cross-modal layers on any (text, video) pair."""

    def __init__(self, model, tokenizer, max_len: int, device: torch.device):
        self.model = model.to(device).eval()
        self.tokenizer, self.max_len, self.device = tokenizer, max_len, device
        self._videos: list[torch.Tensor] = []
        self._texts: list[torch.Tensor] = []
        self._pads: list[torch.Tensor] = []

    @torch.no_grad()
    def encode_videos(self, clips: torch.Tensor) -> torch.Tensor:
        embed, tokens, _ = self.model.encode_video(clips.to(self.device))
        self._videos.append(tokens.half().cpu())
        return embed.float()

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(texts, context_length=self.max_len).to(self.device)
        embed, hidden = self.model.encode_text(ids, ids == 0)
        self._texts.append(hidden.half().cpu())
        self._pads.append((ids == 0).cpu())
        return embed.float()

    @torch.no_grad()
    def match_score(self, text_index: torch.Tensor, video_index: torch.Tensor, batch: int = 64) -> torch.Tensor:
        """P(match) from the matching head for each (text, video) pair, indices in encoding order."""
        if len(self._videos) > 1:
            self._videos = [torch.cat(self._videos)]
        if len(self._texts) > 1:
            self._texts, self._pads = [torch.cat(self._texts)], [torch.cat(self._pads)]
        scores = []
        for i in range(0, len(text_index), batch):
            t, v = text_index[i:i + batch].cpu(), video_index[i:i + batch].cpu()
            logits = self.model.match_logits(self._texts[0][t].to(self.device).float(),
                                             self._pads[0][t].to(self.device),
                                             self._videos[0][v].to(self.device).float())
            scores.append(logits.float().softmax(dim=-1)[:, 1].cpu())
        return torch.cat(scores)
