"""The video-text model that zero-shot retrieval evaluates, and the models that provide it.

Protocol (`VideoTextModel`): `encode_videos(clips (B, 3, T, H, W) CLIP-normalized) -> (B, D)` and
`encode_texts(list[str]) -> (N, D)`, both L2-normalized, so a dot product is the cosine similarity; `match_score`
is None, or a video-text matching head `(text_indices, video_indices) -> scores` over the texts and videos encoded
last, which the evaluation uses to re-rank the top-k (see `pipeline.eval.rerank`).

Implementations (`videomamba eval` builds them from --checkpoint by `model.kind`, in `pipeline.stages.retrieval`):
- `open_clip`: `OpenClipMeanP`, an image CLIP applied frame by frame with the frame features mean-pooled over time
  (CLIP4Clip's zero-shot "meanP" baseline); any open_clip model, the demo's `tiny-clip` included.
- `videomamba`: `VideoMambaRetrieval`, a stage-2 run (`--checkpoint`: its folder or one of its checkpoints; the
  model comes from the run's config.yaml) or a released video_mm .pth file (model.size, text.*), with its matching
  head for re-ranking. Position embeddings follow the evaluation's frame count and size. A clip's embedding is the
  mean of its L2-normalized per-frame embeddings (the official similarity, averaged over frames), not renormalized.
  A model trained on ImageNet-normalized frames (the released ones) gets the CLIP-normalized clips converted.
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


# the normalizations a video model may have been trained with (mean, std per RGB channel)
CLIP_NORM = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # video_mm/dataset/__init__.py, VideoMamba


def renormalized(clips: torch.Tensor, source=CLIP_NORM, target=IMAGENET_NORM) -> torch.Tensor:
    """Clips (B, 3, T, H, W) normalized with `source` (mean, std) as if normalized with `target`: an exact
    per-channel affine map, x * s_std / t_std + (s_mean - t_mean) / t_std."""
    (s_mean, s_std), (t_mean, t_std) = source, target
    shape = (1, 3, 1, 1, 1)
    scale = (torch.tensor(s_std) / torch.tensor(t_std)).view(shape).to(clips)
    shift = ((torch.tensor(s_mean) - torch.tensor(t_mean)) / torch.tensor(t_std)).view(shape).to(clips)
    return clips * scale + shift


class VideoMambaRetrieval:
    """A stage-2 VideoMamba video-text model. It keeps the video tokens and text states of everything it encoded
    (in fp16 on the CPU) so that `match_score` can run the cross-modal layers on any (text, video) pair.
    `input_norm`: the (mean, std) the model was trained with; CLIP-normalized clips are converted to it."""

    def __init__(self, model, tokenizer, max_len: int, device: torch.device, input_norm=CLIP_NORM):
        self.model = model.to(device).eval()
        self.tokenizer, self.max_len, self.device = tokenizer, max_len, device
        self.input_norm = input_norm
        self._videos: list[torch.Tensor] = []
        self._texts: list[torch.Tensor] = []
        self._masks: list[torch.Tensor] = []

    @torch.no_grad()
    def encode_videos(self, clips: torch.Tensor) -> torch.Tensor:
        clips = clips.to(self.device)
        if self.input_norm != CLIP_NORM:
            clips = renormalized(clips, CLIP_NORM, self.input_norm)
        embed, tokens, _ = self.model.encode_video(clips)
        self._videos.append(tokens.half().cpu())
        return embed.float()

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts, self.max_len)
        attention_mask = tokens.attention_mask.to(self.device)
        embed, hidden = self.model.encode_text(tokens.ids.to(self.device), attention_mask)
        self._texts.append(hidden.half().cpu())
        self._masks.append(attention_mask.cpu())
        return embed.float()

    @torch.no_grad()
    def match_score(self, text_index: torch.Tensor, video_index: torch.Tensor, batch: int = 64) -> torch.Tensor:
        """P(match) from the matching head for each (text, video) pair, indices in encoding order."""
        if len(self._videos) > 1:
            self._videos = [torch.cat(self._videos)]
        if len(self._texts) > 1:
            self._texts, self._masks = [torch.cat(self._texts)], [torch.cat(self._masks)]
        scores = []
        for i in range(0, len(text_index), batch):
            t, v = text_index[i:i + batch].cpu(), video_index[i:i + batch].cpu()
            logits = self.model.match_logits(self._texts[0][t].to(self.device).float(),
                                             self._masks[0][t].to(self.device),
                                             self._videos[0][v].to(self.device).float())
            scores.append(logits.float().softmax(dim=-1)[:, 1].cpu())
        return torch.cat(scores)
