"""What every training stage does around the engine: join the process group, write the resolved config into the
run directory, seed the initial weights, and report the engine's summary."""
from __future__ import annotations

import os
from typing import Any

import torch

from pipeline.config import write_resolved
from pipeline.engine import dist
from pipeline.engine.trainer import FitSummary


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
