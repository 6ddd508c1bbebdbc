"""A training run as weights: the model state dict of its newest complete checkpoint (for a stage that starts
from another run, a distillation guide, an evaluation)."""
from __future__ import annotations

import os
from typing import Optional

from torch import Tensor

from pipeline.engine.checkpoint import CorruptCheckpoint, model_state_dict, resolve_resume
from pipeline.errors import ConfigError


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
