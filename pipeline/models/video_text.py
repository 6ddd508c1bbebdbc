"""Stage 2's video-text model as UMT / VideoMamba's video_mm builds it (OpenGVLab/VideoMamba
videomamba/video_mm/models/umt_videomamba.py, UMT_VIDEOMAMBA), on the project's VideoMamba backbone:

- video: the backbone's final-normed tokens; the pooled video is `pool_norm([cls] + mean of the patch tokens)`, per
  frame for a whole clip (the official `keep_temporal=True`) and over the visible tokens for a masked one (the
  official forces keep_temporal off under the attention mask); `vision_proj` maps it to the joint space. The
  cross-attention memory is the patch tokens without [cls] (the official `vision_embeds`).
- text: `pipeline.models.text.BertTextEncoder` (BERT, text-only layers then fusion layers, MLM head); the text-only
  layers' [CLS] through `text_proj` is the text embedding; `itm_head` reads the fused [CLS].
- `temp`: the learned temperature itself (initial 0.07, clamped to [0.001, 0.5] at every training forward, as the
  official `clip_contrastive_temperature`); similarities are divided by it.

A clip's embedding is the mean over its frames of the L2-normalized per-frame projections (not renormalized), so its
dot product with a normalized text is exactly the official `get_sim` (per-frame similarities averaged); with one
pooled vector (masked clips) it is unit-norm.

Parameter names follow the official container where the parts are the same (`text_encoder.*`, `vision_proj`,
`text_proj`, `itm_head`, `temp`); `pipeline.models.official` maps the rest (`vision_encoder.*` -> `backbone.*`,
`pool_norm`). The module knows nothing about data, losses or distribution: the stage-2 objective drives it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.heads import build_alignment_head
from pipeline.models.text import BertTextEncoder
from pipeline.models.videomamba import VideoMamba

TEMP_RANGE = (0.001, 0.5)  # umt_videomamba.py clip_contrastive_temperature(min_val, max_val)


@dataclass
class VideoTextOutput:
    video_embed: Tensor  # (B, E) mean over frames of the normalized per-frame projections
    text_embed: Tensor  # (B, E) L2-normalized
    video_tokens: Tensor  # (B, N_visible, D): the cross-attention memory (final-normed patch tokens)
    text_hidden: Tensor  # (B, L, H) of the text-only layers
    aligned: Optional[Tensor]  # (B, [1 +] N_visible, teacher width) ([cls] first with align_cls) or None
    temp: Tensor  # (1,) the temperature: logits are similarity / temp
    masked_hidden: Optional[Tensor] = None  # (B, L, H) of the text-only layers on the MLM-masked ids, when given


class VideoTextModel(nn.Module):
    """The trained module of stage 2. `forward(video, mask, ids, attention_mask[, masked_ids])` encodes both sides;
    `fused_heads` runs the fusion layers for the matching and masked-language heads (`match_logits`: matching
    only)."""

    def __init__(self, backbone: VideoMamba, text_encoder: BertTextEncoder, embed_dim: int = 512,
                 temp: float = 0.07, teacher_dim: Optional[int] = None, align_cls: bool = True,
                 align_head: str = "clip_decoder"):
        super().__init__()
        self.align_cls = align_cls  # the alignment head also projects [cls] (first), for a [CLS] target
        self.backbone = backbone
        self.pool_norm = nn.LayerNorm(backbone.embed_dim)
        self.text_encoder = text_encoder
        self.vision_proj = nn.Linear(backbone.embed_dim, embed_dim)
        self.text_proj = nn.Linear(text_encoder.width, embed_dim)
        self.temp = nn.Parameter(torch.full((1,), float(temp)))  # 1-d: DeepSpeed broadcasts bytes
        self.itm_head = nn.Linear(text_encoder.width, 2)
        # the student's alignment head (pipeline.models.heads; the official `vision_encoder.clip_decoder` by default)
        self.align_head = build_alignment_head(align_head, backbone.embed_dim, teacher_dim) if teacher_dim else None

    def encode_video(self, video: Tensor, mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """Returns the video embedding (B, E), the cross-attention memory (B, N_visible, D) and, with an alignment
        head, the visible tokens projected onto the teacher's width."""
        out = self.backbone.forward_features(video, mask=mask)
        tokens = out.tokens
        if mask is None:  # keep_temporal: [cls] + each frame's mean token, one pooled vector per frame
            frames = video.shape[2] // self.backbone.patch_embed.tubelet_size
            pooled = out.cls[:, None] + tokens.reshape(tokens.shape[0], frames, -1, tokens.shape[-1]).mean(2)
        else:
            pooled = out.cls[:, None] + tokens.mean(1, keepdim=True)
        per_frame = F.normalize(self.vision_proj(self.pool_norm(pooled)).float(), dim=-1)
        aligned = None
        if self.align_head is not None:
            aligned = self.align_head(out, mask, self.align_cls)
        return per_frame.mean(1), tokens, aligned

    def encode_text(self, ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Returns the normalized text embedding (B, E) (from [CLS]) and the text-only hidden states (B, L, H)."""
        hidden = self.text_encoder.encode(ids, attention_mask)
        return self._text_embed(hidden), hidden

    def _text_embed(self, hidden: Tensor) -> Tensor:
        return F.normalize(self.text_proj(hidden[:, 0]).float(), dim=-1)

    def forward(self, video: Tensor, mask: Optional[Tensor], ids: Tensor, attention_mask: Tensor,
                masked_ids: Optional[Tensor] = None) -> VideoTextOutput:
        """Encodes both sides; with `masked_ids` (the MLM's masked copy of `ids`) the text-only layers run once over
        the captions and their masked copies together (the official MLMLoss runs them on the masked ids in a pass
        of its own; rows are independent, so this gives the same states with half the kernel launches)."""
        if self.training:
            with torch.no_grad():
                self.temp.clamp_(*TEMP_RANGE)
        video_embed, video_tokens, aligned = self.encode_video(video, mask)
        if masked_ids is None:
            text_hidden, masked_hidden = self.text_encoder.encode(ids, attention_mask), None
        else:
            hidden = self.text_encoder.encode(torch.cat([ids, masked_ids]), attention_mask.repeat(2, 1))
            text_hidden, masked_hidden = hidden.split(ids.shape[0])
        return VideoTextOutput(video_embed, self._text_embed(text_hidden), video_tokens, text_hidden, aligned,
                               self.temp, masked_hidden)

    def fused_heads(self, text_hidden: Tensor, attention_mask: Tensor, video_tokens: Tensor, matching: int,
                    positions: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        """One pass of the fusion layers over paired rows (text states (R, L, H), their mask, video tokens
        (R, N, D)): the matching head's (matching, 2) logits of "the text does not / does describe the video" for
        the first `matching` rows, and the MLM head's vocabulary logits (M, V) at `positions` (M, 2) = (row,
        column), rows counted after those (None without positions). The official code runs the matching pairs and
        the MLM's masked texts through the fusion layers in separate passes; rows are independent, so one pass
        gives the same logits with half the kernel launches."""
        fused = self.text_encoder.fuse(text_hidden, attention_mask, video_tokens)
        match = self.itm_head(fused[:matching, 0])
        if positions is None:
            return match, None
        return match, self.text_encoder.mlm_logits(fused[matching + positions[:, 0], positions[:, 1]])

    def match_logits(self, text_hidden: Tensor, attention_mask: Tensor, video_tokens: Tensor) -> Tensor:
        """(B, 2) logits of "the text does not / does describe the video" for paired rows."""
        return self.fused_heads(text_hidden, attention_mask, video_tokens, text_hidden.shape[0])[0]
