"""What every training stage shares: the `Stage` (a name, its config class, its check and its training function,
which `videomamba pretrain` looks up by name), the checks both stages make before any work, and what a stage does
around the engine (join the process group, write the resolved config into the run directory, seed the initial
weights, report the engine's summary)."""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import fsspec
import torch
from torch import nn

from pipeline.config import write_resolved, yaml_load
from pipeline.data.stream import split_sources
from pipeline.data.transforms import NORMALIZATIONS
from pipeline.engine import dist
from pipeline.engine.ds_config import user_config
from pipeline.engine.trainer import FitSummary
from pipeline.errors import ConfigError
from pipeline.masking import masked_count
from pipeline.models.factory import token_grid


@dataclass(frozen=True)
class Stage:
    """A training stage: `check(cfg)` raises ConfigError before any work; `train(cfg, resume=None|"auto"|PATH)` runs
    it (checking first) and returns its summary. `train` is a module-level function, so that Ray can send it to its
    workers."""

    name: str
    config: type
    check: Callable[[Any], None]
    train: Callable[..., dict]


@dataclass
class StageParts:
    """What a stage hands the engine, built from its config: the trained module, the objective
    (`loss_fn(model, batch) -> (loss, parts)`), the chains of modules that may replay as CUDA graphs by name (the
    backbone's blocks; stage 2 also BERT's text-only and fusion layers: `train.cuda_graph_chains`), the frozen
    teacher the objective runs (None without one) and the text tokenizer (stage 2). The stages' training functions
    build these and train them; bench/train_step.py builds the same parts to time one step."""

    model: nn.Module
    objective: Callable
    graph_chains: dict = field(default_factory=dict)
    teacher: Optional[nn.Module] = None
    tokenizer: Any = None


# ----------------------------------------------------------------------------------------------- shared checks
def check_inputs(cfg: Any) -> None:
    """Raises ConfigError for missing training data or an unusable DeepSpeed file."""
    if not split_sources(cfg.data.train):
        raise ConfigError("data.train is empty: give a shard index (.../index.json, as `videomamba shard` writes it) "
                          "or brace URL patterns of tars, several joined by ','")
    if cfg.deepspeed.config is not None:
        user_config(cfg.deepspeed.config)


def check_teacher_size(cfg: Any, alternative: str = "") -> None:
    """Raises ConfigError when the teacher would see frames of another size than the student's (its targets are per
    patch); `alternative` names another way out, e.g. " (or loss.align=0)"."""
    if cfg.teacher.img_size != cfg.data.img_size:
        raise ConfigError(f"teacher.img_size={cfg.teacher.img_size} differs from data.img_size={cfg.data.img_size}: "
                          f"the teacher's targets are per patch, so it must see the student's frames; set "
                          f"teacher.img_size={cfg.data.img_size}{alternative}")


def check_image_frames(cfg: Any, ratio: float, field: str) -> None:
    """Raises ConfigError when data.mix=batch's 1-frame images cannot fill the student's tubelets, or their mask
    ratio (`ratio`, named `field`) cannot make a mask on one frame's token grid."""
    if cfg.data.mix != "batch":
        return
    if cfg.model.tubelet_size != 1:
        raise ConfigError(f"data.mix=batch makes each image a 1-frame clip, which tubelets of "
                          f"model.tubelet_size={cfg.model.tubelet_size} frames cannot hold; use data.mix=sample")
    if ratio > 0:
        check_mask_on_grid(cfg, ratio, field, frames=1)


def check_mask_on_grid(cfg: Any, ratio: Optional[float] = None, field: str = "mask.ratio",
                       frames: Optional[int] = None) -> None:
    """Raises ConfigError when mask.kind / mask.ratio (or `ratio`, named `field`) cannot make a mask on the
    student's token grid (of `frames` frames; default data.num_frames)."""
    ratio = cfg.mask.ratio if ratio is None else ratio
    frames = cfg.data.num_frames if frames is None else frames
    grid = token_grid(frames, cfg.data.img_size, cfg.model.patch_size, cfg.model.tubelet_size)
    try:
        masked_count(cfg.mask.kind, ratio, grid)
    except ValueError as e:
        raise ConfigError(f"{field}={ratio} / mask.kind={cfg.mask.kind!r} on a {grid} token grid: {e}") from None


# ------------------------------------------------------------------------------------------ around the engine
def begin_run(cfg: Any) -> dist.DistInfo:
    """Joins (or makes) the process group, writes train.out/config.yaml on rank 0 and seeds torch, so every rank and
    every run builds the same initial model."""
    info = dist.init_distributed()
    if info.is_main:
        os.makedirs(cfg.train.out, exist_ok=True)
        write_resolved(cfg, os.path.join(cfg.train.out, "config.yaml"))
    torch.manual_seed(cfg.train.seed)
    return info


def run_summary(cfg: Any, summary: FitSummary) -> dict:
    """The summary a stage returns (and `videomamba pretrain` prints)."""
    return {"run_dir": cfg.train.out, "start_step": summary.start_step, "step": summary.step,
            "last_loss": summary.last_loss, "resumed_from": summary.resumed_from,
            "checkpoints": summary.checkpoints, "samples": summary.samples, "wall_s": round(summary.wall_s, 1)}


def with_absolute_paths(cfg: Any) -> Any:
    """A copy of a stage config whose local paths are absolute. Ray Train runs each worker in its own trial folder,
    so a relative path (train.out=runs/s1, init=runs/s1, data.train=shards/index.json) would be read, or the run
    written, there. URLs are left alone, and so are pretrained tags (teacher.pretrained=openai): an optional input is
    made absolute only when it exists here."""
    def local(path: str) -> bool:
        return bool(path) and "://" not in path and not os.path.isabs(path)

    cfg = copy.deepcopy(cfg)
    cfg.train.out = os.path.abspath(cfg.train.out)
    cfg.data.train = ",".join(os.path.abspath(s) if local(s) else s for s in split_sources(cfg.data.train))
    for section, key in (("teacher", "pretrained"), ("model", "pretrained"), ("deepspeed", "config"),
                         ("distill", "checkpoint"), (None, "init")):
        owner = getattr(cfg, section, None) if section else cfg
        value = getattr(owner, key, None) if owner is not None else None
        if isinstance(value, str) and local(value) and os.path.exists(value):
            setattr(owner, key, os.path.abspath(value))
    return cfg


def run_normalization(config_yaml: str) -> str:
    """The data.normalize a run was trained with, from its config.yaml: "clip" for a run written before the key
    existed (the project then normalized every training frame with CLIP's mean/std)."""
    with fsspec.open(config_yaml, "r") as f:
        raw = yaml_load(f) or {}
    data = raw.get("data") if isinstance(raw, dict) else None
    normalize = data.get("normalize", "clip") if isinstance(data, dict) else "clip"
    if normalize not in NORMALIZATIONS:
        raise ConfigError(f"{config_yaml}: data.normalize {normalize!r} is not one of {', '.join(NORMALIZATIONS)}")
    return normalize
