"""Self-distillation (VideoMamba paper, sec. 3.3): a smaller, already trained VideoMamba, frozen, guides a larger
student by aligning their final features. As in the official distillation model, the student's final features go
through a head (RMSNorm + Linear to the teacher's width), both sides are L2-normalised per token, and the loss is
their mean squared distance per token (= 2 - 2 cos). The stages switch it on with `distill.enabled` and add
`distill.weight * pipeline.losses.distillation_loss(...)`.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn
from torch import Tensor

from pipeline.config import ConfigError, DistillConfig
from pipeline.models.videomamba import (RMSNorm, VideoMamba, VideoMambaOutput, build_videomamba,
                                        load_official_checkpoint)


def final_features(out: VideoMambaOutput) -> Tensor:
    """Returns [cls] and the visible tokens of a forward pass as one (B, 1 + N_visible, D) tensor."""
    return torch.cat([out.cls[:, None], out.tokens], dim=1)


class FrozenGuide(nn.Module):
    """A trained VideoMamba in eval mode with no trainable parameters; `forward` gives its final features."""

    def __init__(self, model: VideoMamba):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.embed_dim = model.embed_dim

    def train(self, mode: bool = True) -> "FrozenGuide":
        return self  # stays in eval mode (no drop path / dropout) whatever the student does

    @torch.no_grad()
    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        return final_features(self.model.forward_features(x, mask=mask))


class DistillHead(nn.Module):
    """The student's projection onto the teacher's feature space (the official `distill_head`)."""

    def __init__(self, student_dim: int, teacher_dim: int, eps: float = 1e-5):
        super().__init__()
        self.norm = RMSNorm(student_dim, eps=eps)
        self.proj = nn.Linear(student_dim, teacher_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.norm(x))


def build_guide(cfg: DistillConfig, num_frames: int, img_size: int, patch_size: int = 16, tubelet_size: int = 1,
                scan_backend: str = "auto",
                weights: Union[str, dict[str, Tensor], None] = None) -> Optional[FrozenGuide]:
    """Returns the frozen guide that `cfg` describes, on the student's token grid (frames, size, patch, tubelet) so
    that the student's mask fits it, or None when distillation is off. Its weights come from `weights` (a state
    dict already read, e.g. a stage-1 run's) or else from the file `cfg.checkpoint` (an official checkpoint)."""
    if not cfg.enabled:
        return None
    if not cfg.checkpoint:
        raise ConfigError("distill.enabled is true but distill.checkpoint (the trained smaller VideoMamba) is not set")
    model = build_videomamba(cfg.size, num_frames=num_frames, img_size=img_size, depth=cfg.depth,
                             embed_dim=cfg.embed_dim, patch_size=patch_size, tubelet_size=tubelet_size,
                             scan_backend=scan_backend)
    load_official_checkpoint(model, cfg.checkpoint if weights is None else weights)
    return FrozenGuide(model)
