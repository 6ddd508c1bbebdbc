"""Stage 2's video-text model (UMT's second stage on a VideoMamba): the stage-1 backbone, a BERT-style text encoder
whose last layers cross-attend to the video tokens (the cross-modal decoder), and the heads of its objectives.

- Text: open_clip's BPE tokenizer (its vocabulary ships with the package) plus one [MASK] id for masked language
  modelling; the start token plays BERT's [CLS]. The first `depth - fusion_layers` layers are text-only (their [CLS]
  is the text embedding of VTC); the last `fusion_layers` add cross-attention to the video tokens (VTM, MLM).
- Video: the backbone's final [cls] (VTC) and its tokens ([cls] first) as the memory of the cross-attention; with a
  mask only the visible tokens run, as in stage 1, and `align_head` projects them onto the teacher's width for the
  unmasked-token alignment.

The module knows nothing about data, losses or distribution: `pipeline.losses.VideoTextObjective` drives it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.distill import final_features
from pipeline.models.heads import AlignmentHead
from pipeline.models.videomamba import VideoMamba


@dataclass(frozen=True)
class TextSpec:
    vocab_size: int  # the tokenizer's ids; the model adds one more, [MASK]
    width: int = 256
    depth: int = 4
    heads: int = 4
    fusion_layers: int = 2
    max_len: int = 32
    embed_dim: int = 256  # the joint space of VTC


class TextLayer(nn.Module):
    """Post-norm BERT layer: self-attention, optional cross-attention to the video, MLP."""

    def __init__(self, width: int, heads: int, video_dim: Optional[int]):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(width)
        self.cross_attn = (nn.MultiheadAttention(width, heads, batch_first=True, kdim=video_dim, vdim=video_dim)
                           if video_dim else None)
        self.norm_cross = nn.LayerNorm(width) if video_dim else None
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.norm2 = nn.LayerNorm(width)

    def forward(self, x: Tensor, pad: Tensor, video: Optional[Tensor] = None) -> Tensor:
        x = self.norm1(x + self.self_attn(x, x, x, key_padding_mask=pad, need_weights=False)[0])
        if self.cross_attn is not None:
            x = self.norm_cross(x + self.cross_attn(x, video, video, need_weights=False)[0])
        return self.norm2(x + self.mlp(x))


class TextEncoder(nn.Module):
    """Token ids (B, L) -> hidden states (B, L, width); `encode` runs the text-only layers, `fuse` the rest."""

    def __init__(self, spec: TextSpec, video_dim: int):
        super().__init__()
        self.spec = spec
        self.mask_id = spec.vocab_size
        self.token_embedding = nn.Embedding(spec.vocab_size + 1, spec.width)
        self.pos_embedding = nn.Parameter(torch.randn(spec.max_len, spec.width) * 0.02)
        self.embed_norm = nn.LayerNorm(spec.width)
        text_only = spec.depth - spec.fusion_layers
        self.layers = nn.ModuleList([TextLayer(spec.width, spec.heads, video_dim if i >= text_only else None)
                                     for i in range(spec.depth)])

    def encode(self, ids: Tensor, pad: Tensor) -> Tensor:
        x = self.embed_norm(self.token_embedding(ids) + self.pos_embedding[:ids.shape[1]])
        for layer in self.layers[:self.spec.depth - self.spec.fusion_layers]:
            x = layer(x, pad)
        return x

    def fuse(self, text: Tensor, pad: Tensor, video: Tensor) -> Tensor:
        for layer in self.layers[self.spec.depth - self.spec.fusion_layers:]:
            text = layer(text, pad, video)
        return text


@dataclass
class VideoTextOutput:
    video_embed: Tensor  # (B, embed_dim) L2-normalized
    text_embed: Tensor  # (B, embed_dim) L2-normalized
    video_tokens: Tensor  # (B, 1 + N_visible, D): the cross-attention memory
    text_hidden: Tensor  # (B, L, width) of the text-only layers
    aligned: Optional[Tensor]  # (B, N_visible, teacher width) or None without an alignment head
    logit_scale: Tensor  # exp of the learned temperature's log, capped at 100 (CLIP's)


class VideoTextModel(nn.Module):
    """The trained module of stage 2. `forward(video, mask, ids, pad)` encodes both sides; `match_logits` and
    `mlm_logits` run the cross-modal layers for the matching and masked-language heads."""

    def __init__(self, backbone: VideoMamba, spec: TextSpec, teacher_dim: Optional[int] = None):
        super().__init__()
        self.backbone = backbone
        self.text = TextEncoder(spec, backbone.embed_dim)
        self.vision_proj = nn.Linear(backbone.embed_dim, spec.embed_dim)
        self.text_proj = nn.Linear(spec.width, spec.embed_dim)
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))  # 1-d: DeepSpeed broadcasts bytes
        self.itm_head = nn.Linear(spec.width, 2)
        self.mlm_head = nn.Sequential(nn.Linear(spec.width, spec.width), nn.GELU(), nn.LayerNorm(spec.width),
                                      nn.Linear(spec.width, spec.vocab_size + 1))
        self.align_head = AlignmentHead(backbone.embed_dim, teacher_dim) if teacher_dim else None

    def encode_video(self, video: Tensor, mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """Returns the normalized video embedding (B, E), the tokens [cls] first (B, 1 + N, D) and, with an
        alignment head, the visible tokens projected onto the teacher's width."""
        out = self.backbone.forward_features(video, mask=mask)
        aligned = self.align_head(out.tokens) if self.align_head is not None else None
        return F.normalize(self.vision_proj(out.cls), dim=-1), final_features(out), aligned

    def encode_text(self, ids: Tensor, pad: Tensor) -> tuple[Tensor, Tensor]:
        """Returns the normalized text embedding (B, E) (from [CLS]) and the text-only hidden states."""
        hidden = self.text.encode(ids, pad)
        return F.normalize(self.text_proj(hidden[:, 0]), dim=-1), hidden

    def forward(self, video: Tensor, mask: Optional[Tensor], ids: Tensor, pad: Tensor) -> VideoTextOutput:
        video_embed, video_tokens, aligned = self.encode_video(video, mask)
        text_embed, text_hidden = self.encode_text(ids, pad)
        return VideoTextOutput(video_embed, text_embed, video_tokens, text_hidden, aligned,
                               self.logit_scale.exp().clamp(max=100.0))

    def match_logits(self, text_hidden: Tensor, pad: Tensor, video_tokens: Tensor) -> Tensor:
        """(B, 2) logits of "the text does not / does describe the video" for paired rows."""
        return self.itm_head(self.text.fuse(text_hidden, pad, video_tokens)[:, 0])

    def mlm_logits(self, masked_ids: Tensor, pad: Tensor, video_tokens: Tensor, positions: Tensor) -> Tensor:
        """Vocabulary logits (M, V) at the masked positions (M, 2) = (row, column) of the masked text, fused with
        the video."""
        fused = self.text.fuse(self.text.encode(masked_ids, pad), pad, video_tokens)
        return self.mlm_head(fused[positions[:, 0], positions[:, 1]])
