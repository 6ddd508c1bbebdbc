"""Training losses of the stages.

Stage 1 (masked alignment, UMT / VideoMamba): the student's visible tokens, through a projection head (LayerNorm +
Linear to the teacher's width), are pulled onto the frozen CLIP teacher's features of the same patches. Both sides
are L2-normalized per token; ``mse`` is the squared distance |s - t|^2 summed over channels (UMT's "l2" loss,
= 2 - 2 cos, in [0, 4]) and ``cosine`` is 1 - cos (in [0, 2]); each is averaged over tokens. Optionally, the
VideoMamba paper's self-distillation adds `distill.weight` times `pipeline.models.distill.distillation_loss`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.masking import build_mask
from pipeline.models.distill import FrozenGuide, distillation_loss

ALIGN_LOSSES = ("mse", "cosine")


class AlignmentHead(nn.Module):
    """The student's projection onto the teacher's feature space (UMT's decoder head: LayerNorm + Linear)."""

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(student_dim)
        self.proj = nn.Linear(student_dim, teacher_dim)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.proj(self.norm(tokens))


def alignment_loss(student_tokens: Tensor, teacher_tokens: Tensor, kind: str = "mse") -> Tensor:
    """Returns the mean over tokens of the distance between L2-normalized student and teacher tokens (B, N, C).

    `kind` "mse": |s - t|^2 (= 2 - 2 cos); "cosine": 1 - cos. The teacher side carries no gradient. Computed in
    fp32 whatever the inputs' precision.
    """
    if student_tokens.shape != teacher_tokens.shape:
        raise ValueError(f"alignment_loss: student tokens {tuple(student_tokens.shape)} and teacher tokens "
                         f"{tuple(teacher_tokens.shape)} differ (the projection head maps to the teacher's width)")
    s = F.normalize(student_tokens.float(), dim=-1)
    t = F.normalize(teacher_tokens.detach().float(), dim=-1)
    if kind == "mse":
        return (s - t).square().sum(-1).mean()
    if kind == "cosine":
        return (1.0 - (s * t).sum(-1)).mean()
    raise ValueError(f"alignment loss kind {kind!r} is not one of {', '.join(ALIGN_LOSSES)}")


def visible_targets(teacher_tokens: Tensor, mask: Tensor) -> Tensor:
    """Returns the teacher tokens (B, N, C) of the tokens the student sees (mask False), in the student's order.

    The backbone keeps visible tokens in ascending token index, which is the order boolean indexing gives.
    """
    batch, _, width = teacher_tokens.shape
    return teacher_tokens[~mask.to(teacher_tokens.device)].reshape(batch, -1, width)


class MaskedAlignment:
    """The stage-1 objective, `loss_fn(model, batch) -> (loss, parts)` for the engine.

    Per batch: the frozen teacher encodes every frame (under no_grad, outside the trained module); a mask of
    `mask_kind` hides `mask_ratio` of the student's tokens (the attention-guided one from the teacher's [cls]
    attention); the student (`model(video, mask)` -> projected visible tokens, distillation features or None) is
    aligned to the teacher's tokens of the patches it sees. Masks come from torch's global RNG, which the engine
    seeds per rank and checkpoints, so a resumed run draws the same masks.
    """

    def __init__(self, teacher: nn.Module, grid: tuple[int, int, int], mask_kind: str, mask_ratio: float,
                 loss_kind: str = "mse", tubelet: int = 1, guide: Optional[FrozenGuide] = None,
                 distill_weight: float = 1.0):
        self.teacher, self.grid, self.tubelet = teacher, grid, tubelet
        self.mask_kind, self.mask_ratio, self.loss_kind = mask_kind, mask_ratio, loss_kind
        self.guide, self.distill_weight = guide, distill_weight

    def __call__(self, model, batch: dict) -> tuple[Tensor, dict[str, float]]:
        video = batch["video"]
        targets, attention = self.teacher_targets(video)
        mask = build_mask(self.mask_kind, self.mask_ratio, self.grid, video.shape[0], attention=attention)
        mask = mask.to(video.device)
        aligned, distilled = model(video, mask)
        align = alignment_loss(aligned, visible_targets(targets, mask), self.loss_kind)
        parts = {"align": float(align.detach())}
        loss = align
        if self.guide is not None:
            self.guide.to(device=video.device, dtype=video.dtype)  # bf16/fp16 batches: the guide runs in kind
            distill = distillation_loss(distilled, self.guide(video, mask=mask))
            parts["distill"] = float(distill.detach())
            loss = loss + self.distill_weight * distill
        return loss, parts

    @torch.no_grad()
    def teacher_targets(self, video: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """Returns the teacher's tokens (B, T'*h*w, C) of a clip (B, 3, T, H, W) and its [cls] attention (B, T'*h*w)
        when the mask needs it; with tubelets of several frames, both are averaged over a tubelet's frames."""
        batch, _, frames, height, width = video.shape
        self.teacher.to(device=video.device, dtype=video.dtype)
        features = self.teacher(video.transpose(1, 2).reshape(batch * frames, 3, height, width),
                                with_attention=self.mask_kind == "attention")
        t = frames // self.tubelet
        tokens = features.tokens.reshape(batch, t, self.tubelet, -1, features.tokens.shape[-1]).mean(2)
        attention = features.cls_attention
        if attention is not None:
            attention = attention.reshape(batch, t, self.tubelet, -1).mean(2).reshape(batch, -1)
        return tokens.reshape(batch, -1, tokens.shape[-1]), attention
