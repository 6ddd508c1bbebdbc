"""Checkpoints that are complete or absent, and the search for the newest complete one.

Layout of `run_dir/checkpoints/`:

    step_00000100/
        deepspeed/...          DeepSpeed's model and optimizer states (engine.save_checkpoint, every rank's shards)
        trainer_state.pt       step, LR scheduler, counters (rank 0)
        rank_00000.pt ...      per rank: the data stream's position and the torch/CUDA/numpy/python RNG states
        COMPLETE.json          written last: the manifest (every other file with its size and sha256)

A checkpoint is built in `.tmp-step_00000100/`; once every rank's files are written and flushed, rank 0 writes the
manifest and renames the directory to `step_00000100/` (one atomic rename on a POSIX file system). A process killed
at any moment therefore leaves either the previous set of checkpoints or the new one, plus at most a `.tmp-*`
directory that the next start removes. A published directory whose manifest is missing or does not match the files
(a disk error, a hand edit, a copy cut short) is refused with a message naming it, and the one before it is used.
Old checkpoints beyond `keep_last` are first renamed to `.trash-*`, then deleted, so a half-deleted one is never
mistaken for a checkpoint.

Checkpoints live on a local or shared POSIX file system (every rank writes into the same directory), not on an
object store: DeepSpeed writes plain files and the publication relies on rename.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from pipeline import safe_load
from pipeline.safe_load import check_torch_files

log = logging.getLogger(__name__)

MARKER = "COMPLETE.json"
DEEPSPEED_TAG = "deepspeed"
TRAINER_STATE = "trainer_state.pt"
STEP_DIR = re.compile(r"^step_(\d{8})$")
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"


class CorruptCheckpoint(RuntimeError):
    """A checkpoint directory that is incomplete or does not match its manifest; the message names it."""


@dataclass(frozen=True)
class CheckpointRef:
    step: int
    path: str


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def rank_file_name(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def checkpoints_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


# --------------------------------------------------------------------------------------------------- writing
def temp_dir_for(root: str, step: int) -> str:
    return os.path.join(root, TMP_PREFIX + step_dir_name(step))


def fresh_temp_dir(root: str, step: int) -> str:
    """Returns an empty `.tmp-step_*` directory under `root` (an earlier attempt's leftovers are removed)."""
    path = temp_dir_for(root, step)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def manifest_of(directory: str, step: int, world_size: int) -> dict:
    """Returns the manifest of every file under `directory`: relative path -> size and sha256. Every file is hashed,
    the large model and optimizer shards too (about 1 s per GB): a flipped byte anywhere makes the checkpoint
    refused rather than silently loaded."""
    files = {}
    for rel in sorted(_relative_files(directory)):
        full = os.path.join(directory, rel)
        files[rel] = {"size": os.path.getsize(full), "sha256": _sha256(full)}
    return {"step": step, "world_size": world_size, "created": time.time(), "files": files}


def publish(temp_dir: str, step: int, world_size: int) -> str:
    """Flushes every file in `temp_dir`, writes its manifest last, renames it to `step_XXXXXXXX`; returns that path."""
    for rel in _relative_files(temp_dir):
        _fsync_file(os.path.join(temp_dir, rel))
    manifest = manifest_of(temp_dir, step, world_size)
    marker_tmp = os.path.join(temp_dir, MARKER + ".part")
    with open(marker_tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.rename(marker_tmp, os.path.join(temp_dir, MARKER))
    final = os.path.join(os.path.dirname(temp_dir), step_dir_name(step))
    if os.path.exists(final):  # a checkpoint of this step from an earlier attempt: replace it
        _discard(final)
    os.rename(temp_dir, final)
    _fsync_dir(os.path.dirname(final))
    return final


def prune(root: str, keep_last: int) -> list[str]:
    """Deletes all but the newest `keep_last` published checkpoints (0 keeps all); returns the deleted paths."""
    if keep_last <= 0:
        return []
    old = list_checkpoints(root)[:-keep_last]
    for ref in old:
        _discard(ref.path)
    return [ref.path for ref in old]


def clear_leftovers(root: str) -> list[str]:
    """Removes `.tmp-*` and `.trash-*` directories an interrupted run left under `root`; returns their paths."""
    if not os.path.isdir(root):
        return []
    gone = []
    for name in sorted(os.listdir(root)):
        if name.startswith((TMP_PREFIX, TRASH_PREFIX)):
            path = os.path.join(root, name)
            shutil.rmtree(path, ignore_errors=True)
            gone.append(path)
    return gone


def _discard(path: str) -> None:
    trash = os.path.join(os.path.dirname(path), TRASH_PREFIX + os.path.basename(path))
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


# --------------------------------------------------------------------------------------------------- finding
def list_checkpoints(root: str) -> list[CheckpointRef]:
    """Returns the published checkpoint directories under `root` (verified or not), oldest first."""
    if not os.path.isdir(root):
        return []
    refs = []
    for name in os.listdir(root):
        m = STEP_DIR.match(name)
        if m and os.path.isdir(os.path.join(root, name)):
            refs.append(CheckpointRef(int(m.group(1)), os.path.join(root, name)))
    return sorted(refs, key=lambda r: r.step)


def verify(path: str) -> dict:
    """Returns the manifest of the checkpoint at `path`, or raises CorruptCheckpoint saying what is wrong with it."""
    marker = os.path.join(path, MARKER)
    if not os.path.isdir(path):
        raise CorruptCheckpoint(f"checkpoint {path}: not a directory")
    if not os.path.isfile(marker):
        raise CorruptCheckpoint(f"checkpoint {path}: no {MARKER} (it was never completed)")
    try:
        with open(marker) as f:
            manifest = json.load(f)
        files = manifest["files"]
        step = int(manifest["step"])
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpoint(f"checkpoint {path}: {MARKER} is unreadable ({e})") from None
    m = STEP_DIR.match(os.path.basename(os.path.normpath(path)))
    if m and int(m.group(1)) != step:
        raise CorruptCheckpoint(f"checkpoint {path}: {MARKER} says step {step}, the directory name says otherwise")
    for rel, entry in files.items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            raise CorruptCheckpoint(f"checkpoint {path}: file {rel} is missing")
        size = os.path.getsize(full)
        if size != entry["size"]:
            raise CorruptCheckpoint(f"checkpoint {path}: file {rel} has {size} bytes, "
                                    f"the manifest says {entry['size']}")
        if "sha256" in entry and _sha256(full) != entry["sha256"]:
            raise CorruptCheckpoint(f"checkpoint {path}: file {rel} does not match its sha256 in {MARKER}")
    expected = [TRAINER_STATE] + [rank_file_name(r) for r in range(int(manifest.get("world_size", 1)))]
    absent = [name for name in expected if name not in files]
    if absent:
        raise CorruptCheckpoint(f"checkpoint {path}: the manifest lacks {', '.join(absent)}")
    return manifest


def newest_complete(root: str) -> Optional[CheckpointRef]:
    """Returns the newest checkpoint under `root` that verifies; each refused one is logged with the reason."""
    for ref in reversed(list_checkpoints(root)):
        try:
            verify(ref.path)
            return ref
        except CorruptCheckpoint as e:
            log.warning("refusing %s; trying the one before it", e)
    return None


RESTART = "restart"


def resolve_resume(resume: Optional[str], run_dir: str) -> Optional[CheckpointRef]:
    """Returns the checkpoint to resume from: None (fresh start; also for "restart"), "auto" (newest complete one in
    the run, None when the run has none), a checkpoint directory (must verify) or a run/checkpoints directory (its
    newest complete one). Checkpoints that exist but none of which verifies raise CorruptCheckpoint listing each
    with its damage: starting over then has to be asked for (`--resume restart`), it is never a silent fallback."""
    if resume is None or resume == RESTART:
        return None
    if resume == "auto":
        root = checkpoints_root(run_dir)
        ref = newest_complete(root)
        if ref is None and list_checkpoints(root):
            raise CorruptCheckpoint(_none_complete(root))
        return ref
    path = os.path.normpath(resume)
    if os.path.isfile(os.path.join(path, MARKER)) or STEP_DIR.match(os.path.basename(path)):
        manifest = verify(path)
        return CheckpointRef(int(manifest["step"]), path)
    for root in (checkpoints_root(path), path):
        if list_checkpoints(root):
            ref = newest_complete(root)
            if ref is None:
                raise CorruptCheckpoint(_none_complete(root))
            return ref
    raise FileNotFoundError(f"--resume {resume}: neither a checkpoint directory nor a directory holding checkpoints")


def _none_complete(root: str) -> str:
    damage = []
    for ref in list_checkpoints(root):
        try:
            verify(ref.path)
        except CorruptCheckpoint as e:
            damage.append(f"  {e}")
    return (f"no checkpoint under {root} is complete; every one is damaged:\n" + "\n".join(damage) +
            f"\nnothing was overwritten. To start over from step 0 in this run folder, ask for it: --resume restart "
            f"(the damaged checkpoints are moved aside, not deleted)")


def set_aside(root: str) -> Optional[str]:
    """Moves the checkpoints directory `root` (a run starting over) to `root.replaced-<UTC time>` beside it; returns
    the new path, or None when there was nothing to move."""
    if not os.path.isdir(root) or not os.listdir(root):
        return None
    aside = f"{root}.replaced-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    os.rename(root, aside)
    return aside


# --------------------------------------------------------------------------------------------------- full disk
FULL_BELOW_BYTES = 16 << 20  # a write that failed with less than this left is taken as a full disk


def disk_is_full(path: str) -> bool:
    """True when the file system holding `path` has (almost) no space left for this process."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize < FULL_BELOW_BYTES


def disk_full_message(run_dir: str, step: int) -> str:
    """Says that the disk of `run_dir` is full, which checkpoint is the newest intact one and how to resume."""
    st = os.statvfs(run_dir)
    newest = newest_complete(checkpoints_root(run_dir))
    kept = (f"the newest intact checkpoint is {newest.path} (step {newest.step}); a resume continues from it, the "
            f"steps after it are done again" if newest else
            "there is no intact checkpoint yet (the run would start over at step 0)")
    return (f"checkpoint step {step} could not be written: the disk of train.out ({run_dir}) is full "
            f"({st.f_bavail * st.f_frsize >> 20} MiB free of {st.f_blocks * st.f_frsize >> 20} MiB; the partial "
            f"checkpoint was removed). {kept[0].upper() + kept[1:]}. Free space on that disk (or lower "
            f"train.keep_last, or copy {run_dir} to a larger disk and set train.out there), then run the same "
            f"command with --resume auto")


# --------------------------------------------------------------------------------------------------- weights
def model_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Returns the module's weights in checkpoint `path` as one fp32 state dict on the CPU, whatever the ZeRO stage
    and world size that wrote it (for evaluation and export without a DeepSpeed engine)."""
    verify(path)
    check_torch_files(path)  # DeepSpeed's zero_to_fp32 unpickles with arbitrary globals: only files that need none
    ds_dir = os.path.join(path, DEEPSPEED_TAG)
    optim_files = sorted(name for name in os.listdir(ds_dir) if name.endswith("optim_states.pt")
                         and name.startswith(("zero_pp_rank_", "bf16_zero_pp_rank_")))
    if optim_files:
        first = os.path.join(ds_dir, optim_files[0])
        # DeepSpeed's BF16_Optimizer records no ZeRO stage; mapped, so only the pickled structure is read here
        if "zero_stage" not in safe_load.load(first, first, mmap=True)["optimizer_state_dict"]:
            return bf16_optimizer_state_dict(ds_dir)
        os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return dict(get_fp32_state_dict_from_zero_checkpoint(path, tag=DEEPSPEED_TAG))
    model_states = os.path.join(ds_dir, "mp_rank_00_model_states.pt")
    states = safe_load.load(model_states, model_states)
    return {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}


def bf16_optimizer_state_dict(ds_dir: str) -> dict[str, torch.Tensor]:
    """Returns the fp32 master weights of a DeepSpeed BF16_Optimizer checkpoint (bf16 with ZeRO-1 and fp32 gradient
    accumulation, `train.grad_accum_dtype=fp32`), which DeepSpeed's zero_to_fp32 does not read: it looks for a ZeRO
    stage these files do not record (the bf16 ZeRO-1/2 files of DeepSpeed's ZeRO optimizer have the same names).
    Each rank's `bf16_zero_pp_rank_R_mp_rank_00_optim_states.pt` holds its slice of every parameter group, flattened
    in the model states' `param_shapes` order and padded at the group's end only; the slices in rank order make the
    group. Buffers, frozen and tied parameters come from the model states."""
    model_file = os.path.join(ds_dir, "mp_rank_00_model_states.pt")
    model_states = safe_load.load(model_file, model_file)
    ranks = sorted((int(m.group(1)), os.path.join(ds_dir, name)) for name in os.listdir(ds_dir)
                   if (m := re.fullmatch(r"bf16_zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt", name)))
    optim = [safe_load.load(file, file)["optimizer_state_dict"] for _, file in ranks]
    world = max(optim[0]["partition_count"])
    if [r for r, _ in ranks] != list(range(world)):
        raise ValueError(f"{ds_dir}: BF16_Optimizer states of ranks {[r for r, _ in ranks]}, but the run had {world} "
                         f"(an incomplete checkpoint)")
    out = {k: v.float() if v.is_floating_point() else v for k, v in model_states["module"].items()}
    for g, shapes in enumerate(model_states["param_shapes"]):
        flat = torch.cat([states["single_partition_of_fp32_groups"][g] for states in optim]).float()
        offset = 0
        for name, shape in shapes.items():
            numel = math.prod(shape)
            out[name] = flat[offset:offset + numel].view(shape).clone()
            offset += numel
        if offset + optim[-1]["group_paddings"][g] != flat.numel():  # the last rank holds the padding
            raise ValueError(f"{ds_dir}: parameter group {g} holds {flat.numel()} values, its parameters {offset} "
                             f"and padding {optim[-1]['group_paddings'][g]}")
    for name, source in model_states.get("shared_params", {}).items():
        out[name] = out[source]
    return out


# --------------------------------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    """Returns this process's random number generator states (torch CPU and CUDA, numpy, python), as tensors and
    plain values only (numpy's key array as a list), which a weights-only load reads."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]  # a list (since the weights-only format) or numpy's tuple
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seeds torch (CPU and CUDA), numpy and python's `random`."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------------- files
def _relative_files(directory: str) -> list[str]:
    out = []
    for here, _, names in os.walk(directory):
        for name in names:
            out.append(os.path.relpath(os.path.join(here, name), directory))
    return out


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
