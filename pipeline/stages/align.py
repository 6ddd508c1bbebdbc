"""Stage 1: masked alignment of a VideoMamba student to a frozen CLIP-ViT teacher (UMT's first stage).

Wires the parts: the student (backbone + projection head, one module so DeepSpeed trains all of it), the frozen
teacher (kept outside the DeepSpeed module, run under no_grad), the optional self-distillation guide, the stream of
shards and the objective (`pipeline.objectives.MaskedAlignment`), and hands them to the engine.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from pipeline.config import AlignStageConfig
from pipeline.data import build_loader
from pipeline.engine import Trainer
from pipeline.engine.weights import run_weights
from pipeline.models.distill import DistillHead, build_guide, final_features
from pipeline.models.factory import build_from_config
from pipeline.models.heads import build_alignment_head
from pipeline.models.teacher import build_teacher, check_teacher_grid
from pipeline.objectives import MaskedAlignment
from pipeline.stages.base import (Stage, StageParts, begin_run, check_image_frames, check_inputs, check_mask_on_grid,
                                  check_teacher_size, run_summary)


class AlignStudent(nn.Module):
    """The trained module: the backbone and its heads. `forward(video, mask)` returns the visible tokens projected
    to the teacher's width by the alignment head `align_head` (pipeline.models.heads: the official clip_decoder by
    default) (B, [1 +] N_visible, C), and the distillation features (B, 1 + N_visible, C_guide) or None."""

    def __init__(self, backbone: nn.Module, teacher_dim: int, guide_dim: Optional[int] = None, align_cls: bool = True,
                 align_head: str = "clip_decoder"):
        super().__init__()
        self.align_cls = align_cls
        self.backbone = backbone
        self.align_head = build_alignment_head(align_head, backbone.embed_dim, teacher_dim)
        self.distill_head = DistillHead(backbone.embed_dim, guide_dim) if guide_dim else None

    def forward(self, video: Tensor, mask: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        out = self.backbone.forward_features(video, mask=mask)
        distilled = self.distill_head(final_features(out)) if self.distill_head is not None else None
        return self.align_head(out, mask, self.align_cls), distilled


def train_align(cfg: AlignStageConfig, resume: Optional[str] = None) -> dict:
    """Runs stage 1 as `cfg` says (resume: None, "auto" or a checkpoint path); returns a summary of the run."""
    check_config(cfg)
    teacher = build_teacher(cfg.teacher)
    check_teacher_grid(teacher, cfg.data.img_size, cfg.model.patch_size)
    info = begin_run(cfg)
    parts = align_parts(cfg, teacher)
    data = build_loader(cfg.data, cfg.train.batch_size, info.rank, info.world_size, cfg.train.seed,
                        run_dir=cfg.train.out, device=info.device)
    summary = Trainer(parts.model, parts.objective, data, cfg.train, cfg.deepspeed, cfg.train.out,
                      graph_chains=parts.graph_chains).fit(resume)
    return run_summary(cfg, summary)


def align_parts(cfg: AlignStageConfig, teacher: nn.Module) -> StageParts:
    """Builds stage 1's student (backbone and heads), its objective around the frozen `teacher` (one whose patch
    grid is the student's: `check_teacher_grid`) and the optional self-distillation guide, as `cfg` says. Call it
    after `begin_run`, which seeds the initial weights."""
    backbone = build_from_config(cfg.model, cfg.data.num_frames, cfg.data.img_size)
    guide = build_guide(cfg.distill, cfg.data.num_frames, cfg.data.img_size, cfg.model.patch_size,
                        cfg.model.tubelet_size, cfg.model.scan_backend, weights=run_weights(cfg.distill.checkpoint))
    student = AlignStudent(backbone, teacher.width, guide.embed_dim if guide is not None else None,
                           cfg.teacher.cls_target, cfg.model.align_head)
    objective = MaskedAlignment(teacher, backbone.patch_grid, cfg.mask.kind, cfg.mask.ratio, cfg.loss.kind,
                                cfg.model.tubelet_size, guide, cfg.distill.weight, cfg.teacher.cls_target)
    return StageParts(student, objective, {"backbone": backbone.chained_blocks()}, teacher)


def check_config(cfg: AlignStageConfig) -> None:
    """Raises ConfigError, before any work, for missing training data, an unusable DeepSpeed file, a teacher
    resolution that is not the student's or a mask that cannot be made on the student's token grid."""
    check_inputs(cfg)
    check_teacher_size(cfg)
    check_mask_on_grid(cfg)
    check_image_frames(cfg, cfg.mask.ratio, "mask.ratio")


ALIGN = Stage("align", AlignStageConfig, check_config, train_align)
