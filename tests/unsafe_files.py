"""Hostile files for the loading tests: torch files whose unpickling would run a shell command that creates a marker
file, and run folders whose checkpoint holds one behind a manifest with matching hashes (an attacker writes those
too)."""
import json
import os
import pickle
from pathlib import Path

import torch


class Bomb:
    """Unpickled with arbitrary globals, this runs `touch MARKER`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_bomb(path: Path, marker: Path, legacy: bool = False) -> Path:
    """Writes a torch file (zip format, or a plain pickle with `legacy`) holding a plausible state dict and a Bomb."""
    obj = {"model": {"pos_embed": torch.zeros(1, 5, 8)}, "extra": Bomb(marker)}
    path.parent.mkdir(parents=True, exist_ok=True)
    if legacy:
        path.write_bytes(pickle.dumps(obj))
    else:
        torch.save(obj, path)
    return path


def write_bomb_run(run: Path, marker: Path, hostile: str = "trainer_state.pt", config: str = "") -> Path:
    """Writes a run folder whose one checkpoint (step 1, ZeRO 0 layout, world size 1) verifies against its manifest
    but whose file `hostile` (relative to the checkpoint) is a Bomb; `config` is written as the run's config.yaml.
    Returns the checkpoint directory."""
    from pipeline.engine import checkpoint as ckpt

    step = Path(ckpt.checkpoints_root(str(run))) / ckpt.step_dir_name(1)
    files = {ckpt.TRAINER_STATE: {"step": 1, "skipped_steps": 0, "scheduler": {}, "world_size": 1},
             ckpt.rank_file_name(0): {"data": {}, "rng": ckpt.rng_state()},
             f"{ckpt.DEEPSPEED_TAG}/mp_rank_00_model_states.pt": {"module": {"w": torch.zeros(2)}}}
    for rel, obj in files.items():
        (step / rel).parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, step / rel)
    write_bomb(step / hostile, marker)
    (step / ckpt.MARKER).write_text(json.dumps(ckpt.manifest_of(str(step), 1, 1)))
    ckpt.verify(str(step))  # the hashes match: a manifest does not make a file safe
    if config:
        (run / "config.yaml").write_text(config)
    return step
