"""Pretrain a VideoMamba on DeepSpeed: stage 1 (`align`), masked alignment of the visible tokens to a frozen CLIP-ViT
teacher; stage 2 (`video_text`), joint video-text pretraining with a text encoder and a cross-modal decoder (VTC,
VTM on hard negatives, MLM and the stage-1 alignment), starting from a stage-1 run (`init`).

The config's top-level `stage` picks the stage (`align`, the default). Any key can be overridden as key.sub=value
(values are YAML). Runs single-process, under torchrun / the deepspeed launcher (one process per GPU; the engine
reads RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), or in Ray Train workers on a Ray cluster (--ray-workers). With
--resume auto a run continues from its newest complete checkpoint, also with another number of processes; when
every checkpoint is damaged it stops (exit 2) listing them, and starting over must be asked for (--resume restart).
Overrides (key.sub=value) may come anywhere on the line, after --resume too.

Main keys:
  model.size            tiny | small | middle | base  (model.depth / model.embed_dim override the size's)
  data.train            shard index.json(s) or brace URL patterns, several joined by ','
  data.num_frames       frames per clip              data.img_size   frame side in pixels (a multiple of 16)
  train.max_steps       optimizer steps              train.batch_size   clips per process and micro-step
  train.ckpt_every      steps between checkpoints    train.seed         train.out   the run directory
  deepspeed.zero_stage  0 | 1 | 2 | 3                deepspeed.config   your own DeepSpeed JSON (used as is)
  teacher.model         an open_clip model name      teacher.pretrained  a pretrained tag or a checkpoint file
  mask.kind             attention (official) | attention_topk | clip_row | frame_row | tube | random   mask.ratio (0.8)
  loss.kind             mse | cosine                 distill.enabled, distill.checkpoint (self-distillation)
  stage 2: init (the stage-1 run, or a released video_mm / stage-2 .pth), text.pretrained (a BERT directory or a
           cached hub name) / text.fusion_layer / text.max_len / text.embed_dim, loss.vtc / loss.vtm / loss.mlm /
           loss.align (weights; align 0 loads no teacher), loss.mlm_prob (0.5, official)

Writes train.out/config.yaml (the resolved config), train.out/metrics.jsonl (one line per optimizer step: step,
loss, align, lr, ...), TensorBoard events under train.out/tb and complete checkpoints under train.out/checkpoints/.

Examples:
  videomamba pretrain --config configs/stage1_align.yaml data.train=shards/index.json train.out=runs/s1
  videomamba pretrain --config configs/stage1_align.yaml --resume auto train.out=runs/s1
  videomamba pretrain --config configs/stage2_video_text.yaml init=runs/s1 data.train=shards/index.json
  torchrun --nproc-per-node 8 -m pipeline.cli pretrain --config configs/stage1_align.yaml deepspeed.zero_stage=2
  videomamba pretrain --config configs/stage1_align.yaml --ray-workers 16 --ray-address auto --resume auto \
      --ray-max-failures 3           (16 workers on a running Ray cluster, restarted after faults)
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Optional, Sequence

import fsspec
import yaml

from pipeline.cluster import train_on_ray
from pipeline.config import BASE_KEY, load_config
from pipeline.data.loader import NoUsableSamples
from pipeline.engine import dist
from pipeline.engine.trainer import DataExhausted, DiskFull, NonFiniteLoss
from pipeline.errors import ConfigError
from pipeline.stages.align import ALIGN
from pipeline.stages.base import Stage, with_absolute_paths
from pipeline.stages.video_text import VIDEO_TEXT

STAGES: dict[str, Stage] = {stage.name: stage for stage in (ALIGN, VIDEO_TEXT)}  # the registry, by name
DEFAULT_STAGE = ALIGN.name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE", help="the stage's YAML config (path or URL)")
    parser.add_argument("--resume", default=None, metavar="auto|restart|PATH",
                        help="continue from the newest complete checkpoint under train.out (auto) or from PATH; "
                             "auto refuses (exit 2) when every checkpoint there is damaged; restart starts over at "
                             "step 0 in train.out, moving its checkpoints aside to checkpoints.replaced-TIME/")
    ray = parser.add_argument_group("training workers on Ray Train (instead of torchrun / the deepspeed launcher)")
    ray.add_argument("--ray-workers", type=int, default=0, metavar="N",
                     help="run the stage in N Ray Train workers (one process per GPU, or per CPU slot)")
    ray.add_argument("--ray-address", default=None, metavar="auto|HOST:PORT",
                     help="the Ray cluster to run on (default: a local one started for the job)")
    ray.add_argument("--ray-gpu", choices=["auto", "yes", "no"], default="auto",
                     help="one GPU per worker (auto: when the cluster has enough)")
    ray.add_argument("--ray-max-failures", type=int, default=0, metavar="K",
                     help="restart the workers up to K times after a failure; they resume from the newest complete "
                          "checkpoint (needs --resume auto)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. "
                        "train.max_steps=100 model.size=small")


def run(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:  # our own progress at INFO; libraries (open_clip, DeepSpeed) warnings only
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
        logging.getLogger("pipeline").setLevel(logging.INFO)
    stage = STAGES[stage_name(args.config, args.overrides)]
    cfg = load_config(stage.config, args.config, args.overrides)
    try:
        if args.ray_workers:
            stage.check(cfg)  # here, before a cluster is started
            summary = train_on_ray(stage.train, with_absolute_paths(cfg), args.resume, args.ray_workers,
                                   args.ray_address, {"auto": None, "yes": True, "no": False}[args.ray_gpu],
                                   args.ray_max_failures)
        else:
            summary = stage.train(cfg, resume=args.resume)
    except (NonFiniteLoss, DataExhausted, NoUsableSamples, DiskFull) as e:  # a stop with a message, not a traceback
        print(f"videomamba pretrain: stage {stage.name} stopped: {e}", file=sys.stderr)
        return 1
    if dist.rank() == 0:
        print(f"videomamba pretrain: stage {stage.name} done: " + json.dumps(summary, default=str))
    dist.shutdown()
    return 0


def stage_name(path: str, overrides: Sequence[str]) -> str:
    """Returns the stage a config runs: a `stage=` override, else the `stage` key of the file or its bases."""
    name: Optional[str] = None
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() == "stage":
            name = str(yaml.safe_load(value))
    name = name or _stage_in_file(path, depth=0) or DEFAULT_STAGE
    if name not in STAGES:
        raise ConfigError(f"stage {name!r} (from {path} or the command line) is not one of {', '.join(STAGES)}")
    return name


def _stage_in_file(path: str, depth: int) -> Optional[str]:
    """Returns the `stage` key of a YAML file, else of its `_base_` files (the last one that sets it)."""
    if depth > 16:
        return None  # a cycle: load_config reports it
    try:
        with fsspec.open(path, "r") as f:
            raw = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError):
        return None  # load_config reports the problem with the file
    if not isinstance(raw, dict):
        return None
    if "stage" in raw:
        return str(raw["stage"])
    bases = raw.get(BASE_KEY, [])
    found = None
    for base in [bases] if isinstance(bases, str) else bases:
        base_path = base if "://" in base or os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
        found = _stage_in_file(base_path, depth + 1) or found
    return found
