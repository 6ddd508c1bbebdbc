"""Stage 1: masked alignment of a VideoMamba student to a frozen CLIP-ViT teacher (UMT's first stage).

Wires the parts: the student (backbone + projection head, one module so DeepSpeed trains all of it), the frozen
teacher (kept outside the DeepSpeed module, run under no_grad), the optional self-distillation guide, the stream of
shards and the objective (`pipeline.losses.MaskedAlignment`), and hands them to the engine.
"""
from __future__ import annotations

import os
from typing import Optional

from torch import Tensor, nn

from pipeline.config import AlignStageConfig, ConfigError
from pipeline.data import build_loader
from pipeline.data.stream import split_sources
from pipeline.engine import Trainer
from pipeline.engine.checkpoint import CorruptCheckpoint, model_state_dict, resolve_resume
from pipeline.engine.ds_config import user_config
from pipeline.losses import MaskedAlignment
from pipeline.masking import masked_count
from pipeline.models import build_from_config
from pipeline.models.distill import DistillHead, build_guide, final_features
from pipeline.models.heads import AlignmentHead
from pipeline.models.teacher import build_teacher, check_teacher_grid
from pipeline.stages.run import begin_run, run_summary


class AlignStudent(nn.Module):
    """The trained module: the backbone and its heads. `forward(video, mask)` returns the visible tokens projected
    to the teacher's width (B, N_visible, C), and the distillation features (B, 1 + N_visible, C_guide) or None."""

    def __init__(self, backbone: nn.Module, teacher_dim: int, guide_dim: Optional[int] = None):
        super().__init__()
        self.backbone = backbone
        self.align_head = AlignmentHead(backbone.embed_dim, teacher_dim)
        self.distill_head = DistillHead(backbone.embed_dim, guide_dim) if guide_dim else None

    def forward(self, video: Tensor, mask: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        out = self.backbone.forward_features(video, mask=mask)
        distilled = self.distill_head(final_features(out)) if self.distill_head is not None else None
        return self.align_head(out.tokens), distilled


def train_align(cfg: AlignStageConfig, resume: Optional[str] = None) -> dict:
    """Runs stage 1 as `cfg` says (resume: None, "auto" or a checkpoint path); returns a summary of the run."""
    _check_config(cfg)
    teacher = build_teacher(cfg.teacher)
    check_teacher_grid(teacher, cfg.data.img_size, cfg.model.patch_size)
    info = begin_run(cfg)
    backbone = build_from_config(cfg.model, cfg.data.num_frames, cfg.data.img_size)
    guide = build_guide(cfg.distill, cfg.data.num_frames, cfg.data.img_size, cfg.model.patch_size,
                        cfg.model.tubelet_size, cfg.model.scan_backend, weights=run_weights(cfg.distill.checkpoint))
    student = AlignStudent(backbone, teacher.width, guide.embed_dim if guide is not None else None)
    objective = MaskedAlignment(teacher, backbone.patch_grid, cfg.mask.kind, cfg.mask.ratio, cfg.loss.kind,
                                cfg.model.tubelet_size, guide, cfg.distill.weight)
    data = build_loader(cfg.data, cfg.train.batch_size, info.rank, info.world_size, cfg.train.seed,
                        run_dir=cfg.train.out)
    summary = Trainer(student, objective, data, cfg.train, cfg.deepspeed, cfg.train.out,
                      graph_modules=backbone.chained_blocks()).fit(resume)
    return run_summary(cfg, summary)


def run_weights(checkpoint: Optional[str], option: str = "distill.checkpoint",
                what: str = "stage-1 run") -> Optional[dict[str, Tensor]]:
    """A training run (its folder, its checkpoints/ folder or one checkpoint) as weights: the newest complete
    checkpoint's, whatever ZeRO stage wrote them. None for a file or URL (read as an official checkpoint by the
    distillation guide). `option` and `what` name the config key and the run expected in errors."""
    if not checkpoint or not os.path.isdir(checkpoint):
        return None
    try:
        ref = resolve_resume(checkpoint, checkpoint)
    except (CorruptCheckpoint, FileNotFoundError) as e:
        raise ConfigError(f"{option}={checkpoint} is a folder but not a usable {what} or checkpoint ({e})") from None
    return model_state_dict(ref.path)


def _check_config(cfg: AlignStageConfig) -> None:
    """Raises ConfigError, before any work, for missing training data, an unusable DeepSpeed file, a teacher
    resolution that is not the student's or a mask that cannot be made on the student's token grid."""
    if not split_sources(cfg.data.train):
        raise ConfigError("data.train is empty: give a shard index (.../index.json, as `videomamba shard` writes it) "
                          "or brace URL patterns of tars, several joined by ','")
    if cfg.deepspeed.config is not None:
        user_config(cfg.deepspeed.config)
    if cfg.teacher.img_size != cfg.data.img_size:
        raise ConfigError(f"teacher.img_size={cfg.teacher.img_size} differs from data.img_size={cfg.data.img_size}: "
                          f"the teacher's targets are per patch, so it must see the student's frames; set "
                          f"teacher.img_size={cfg.data.img_size}")
    grid = (cfg.data.num_frames // cfg.model.tubelet_size, cfg.data.img_size // cfg.model.patch_size,
            cfg.data.img_size // cfg.model.patch_size)
    try:
        masked_count(cfg.mask.kind, cfg.mask.ratio, grid)
    except ValueError as e:
        raise ConfigError(f"mask.ratio={cfg.mask.ratio} / mask.kind={cfg.mask.kind!r} on a {grid} token grid: "
                          f"{e}") from None
