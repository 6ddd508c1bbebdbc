"""The DeepSpeed JSON config of a run: built from `train.*` and `deepspeed.zero_stage`, or a user's own file.

A user's file (`deepspeed.config`) is used as written: every key it sets is passed to DeepSpeed unchanged, and the
`train.*` settings it covers (ZeRO stage, precision, clipping, batch sizes) are not consulted. The engine only adds
keys the file leaves out that it needs: the batch sizes when the file gives none, `zero_allow_untested_optimizer`
(our AdamW is a torch optimizer, which ZeRO accepts with that flag) and a quiet `steps_per_print`. The file may not
define "optimizer" or "scheduler": the engine's AdamW groups, schedule and NaN/inf step skipping depend on its own.
"""
from __future__ import annotations

from typing import Optional

from pipeline.config import ConfigError, DeepSpeedConfig, TrainConfig, read_json

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
OWNED_SECTIONS = ("optimizer", "scheduler")


def precision_section(precision: str) -> dict:
    """Returns the DeepSpeed keys that select `precision` (fp32 needs none)."""
    if precision == "bf16":
        return {"bf16": {"enabled": True}}
    if precision == "fp16":
        return {"fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                         "hysteresis": 2, "min_loss_scale": 1}}
    return {}


def built_config(train: TrainConfig, zero_stage: int) -> dict:
    """Returns the DeepSpeed config that `train.*` and `deepspeed.zero_stage` describe."""
    if train.batch_size < 1 or train.grad_accum < 1:
        raise ConfigError(f"train.batch_size ({train.batch_size}) and train.grad_accum ({train.grad_accum}) "
                          "must be at least 1")
    cfg = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": float(train.clip_grad),
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    cfg.update(precision_section(train.precision))
    if train.grad_accum_dtype is not None:
        if train.precision != "bf16" or zero_stage != 1:
            raise ConfigError(f"train.grad_accum_dtype={train.grad_accum_dtype} needs train.precision=bf16 and "
                              f"deepspeed.zero_stage=1 (DeepSpeed's BF16_Optimizer), got {train.precision} and "
                              f"ZeRO-{zero_stage}: set train.grad_accum_dtype=null")
        cfg["data_types"] = {"grad_accum_dtype": train.grad_accum_dtype}
    return cfg


def user_config(path: str) -> dict:
    """Returns the JSON object in the user's DeepSpeed config file, or raises ConfigError naming the file."""
    cfg = read_json(path, "file", label="deepspeed.config: ")
    if not isinstance(cfg, dict):
        raise ConfigError(f"deepspeed.config: {path} must hold a JSON object, got {type(cfg).__name__}")
    owned = [k for k in OWNED_SECTIONS if k in cfg]
    if owned:
        raise ConfigError(f"deepspeed.config: {path} defines {owned}; the engine builds AdamW and the LR schedule "
                          "from train.* (lr, min_lr, warmup_steps, weight_decay, betas): remove those sections")
    return cfg


def deepspeed_config(train: TrainConfig, ds: Optional[DeepSpeedConfig]) -> dict:
    """Returns the config dict handed to `deepspeed.initialize`."""
    ds = ds or DeepSpeedConfig()
    if ds.config is None:
        return built_config(train, ds.zero_stage)
    cfg = user_config(ds.config)
    if not any(k in cfg for k in BATCH_KEYS):
        cfg["train_micro_batch_size_per_gpu"] = train.batch_size
        cfg["gradient_accumulation_steps"] = train.grad_accum
    cfg.setdefault("zero_allow_untested_optimizer", True)
    cfg.setdefault("steps_per_print", 1 << 30)
    return cfg


def check_micro_batch(train: TrainConfig, ds: Optional[DeepSpeedConfig], world_size: int) -> None:
    """Raises ConfigError, before DeepSpeed starts, when the DeepSpeed config makes a micro batch per process other
    than `train.batch_size` (what the data yields per micro-step), with the value to set. DeepSpeed's own rule:
    train_batch_size = micro batch * gradient_accumulation_steps * world size, the missing one derived."""
    cfg = deepspeed_config(train, ds)
    micro, accum, total = (cfg.get(k) for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                                "train_batch_size"))
    if micro is None and total is not None:
        micro = total // ((accum or 1) * world_size)
    if micro is not None and micro != train.batch_size:
        where = f"deepspeed.config ({ds.config})" if ds is not None and ds.config else "the DeepSpeed config"
        raise ConfigError(f"{where} makes the micro batch {micro} per process, but the data yields "
                          f"train.batch_size={train.batch_size} samples per micro-step (world size {world_size}): "
                          f"set train.batch_size={micro} (or change the file's batch keys)")
