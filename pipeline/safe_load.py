"""Reading torch files that a user names without running code from them.

`torch.load(weights_only=False)` unpickles with arbitrary globals: a file whose object's `__reduce__` names
`os.system` runs a shell command when loaded. Every file the project reads (`model.pretrained=`,
`distill.checkpoint=`, `init=`, eval's `--checkpoint`, `--resume`, and every file DeepSpeed reads on resume) goes
through `load` here, which unpickles with torch's restricted unpickler (`weights_only=True`): tensors, plain Python
values and the few library types listed below, nothing else. A file that holds anything else is refused with
`UnsafeFile` (a ConfigError: exit 2) naming the file and the globals it would have called; nothing of it runs.

The allowed library types:
- DeepSpeed's optimizer states (LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address): plain records whose
  unpickling sets attributes and calls none of their methods (`check_torch_files` runs before DeepSpeed's own
  `torch.load(weights_only=False)` sees a file);
- numpy's array and dtype, for checkpoints of this project written before its RNG states were saved as lists;
- with `foreign_configs=True` (official checkpoints, which pickle their run's config beside the weights):
  `argparse.Namespace` and the official code's `EasyDict`/`Config`, read as plain `OrderedDict`s (the class named
  in the file is never imported, so none of its code runs; the config's values are not needed to load weights).

A hash manifest beside the files does not make an unsafe load safe (whoever writes the file writes the hashes), so
files are checked on every load, checkpoints that passed `verify` included.
"""
from __future__ import annotations

import io
import os
import pickle
from collections import OrderedDict
from typing import Any, BinaryIO, Union

import torch

from pipeline.errors import ConfigError

Source = Union[str, bytes, BinaryIO]

# globals of the official code's config objects, read as OrderedDicts (never imported)
FOREIGN_CONFIG_GLOBALS = ("argparse.Namespace", "utils.easydict.EasyDict", "easydict.EasyDict",
                          "utils.config.Config")


class UnsafeFile(ConfigError):
    """A file that a restricted unpickler cannot read: it holds objects whose loading could run code."""


def _library_types() -> list:
    """The DeepSpeed and numpy types a project checkpoint may hold (those importable here)."""
    import numpy as np

    types: list = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), type(np.dtype(np.float64))]
    try:
        types.append(np._core.multiarray._reconstruct)
    except AttributeError:  # numpy 1.x
        types.append(np.core.multiarray._reconstruct)
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        types += [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    except ImportError:  # DeepSpeed absent: its checkpoints cannot be resumed anyway
        pass
    return types


def load(source: Source, name: str, *, foreign_configs: bool = False, mmap: bool = False) -> Any:
    """Returns the object in the torch file `source` (a local path, the file's bytes or an open binary file), on
    the CPU, read with the restricted unpickler. `name` is how messages name the file. Raises UnsafeFile (exit 2)
    when the file holds anything but tensors, plain values and the allowed types, and ValueError when it is not a
    torch file at all (a file the restricted unpickler cannot parse is refused as UnsafeFile too)."""
    allowed = _library_types()
    if foreign_configs:
        allowed += [(OrderedDict, g) for g in FOREIGN_CONFIG_GLOBALS]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(_reopenable(source), map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise UnsafeFile(f"{name}: refused: a weights-only load cannot read it ({_reason(e)})"
                         f"{_globals_named(source, allowed)}; it holds objects whose loading could run code, or is "
                         f"not a torch file. Nothing of it was run; only tensors and plain values are read from "
                         f"files") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{name}: not a readable torch file ({type(e).__name__}: {str(e).splitlines()[0]})") \
            from None


def _reason(e: Exception) -> str:
    """The restricted unpickler's own reason, without torch's advice to load the file unrestricted."""
    text = str(e)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1].strip().split("\n\n")[0]
    return text.strip().splitlines()[0] if text.strip() else type(e).__name__


def check_torch_files(directory: str) -> int:
    """Checks that every `*.pt` file under `directory` (a checkpoint: ours and DeepSpeed's states) loads with the
    restricted unpickler, before DeepSpeed, whose loaders unpickle with arbitrary globals, reads any of them. The
    tensors are memory-mapped, not read. Returns the number of files checked; raises UnsafeFile naming the first
    file refused."""
    checked = 0
    for here, _, names in sorted(os.walk(directory)):
        for file_name in sorted(names):
            if file_name.endswith(".pt"):
                path = os.path.join(here, file_name)
                try:
                    load(path, path, mmap=True)
                except ValueError as e:
                    if isinstance(e, UnsafeFile):
                        raise
                    raise UnsafeFile(str(e)) from None
                checked += 1
    return checked


def _reopenable(source: Source) -> Any:
    if isinstance(source, bytes):
        return io.BytesIO(source)
    if not isinstance(source, (str, os.PathLike)) and hasattr(source, "seek"):
        source.seek(0)
    return source


def _globals_named(source: Source, allowed: list) -> str:
    """Returns ' (module.name, ...)': the globals the file's pickle names that the restricted unpickler refuses."""
    ok = {a[1] if isinstance(a, tuple) else f"{a.__module__}.{a.__qualname__}" for a in allowed}
    try:
        names = [n for n in torch.serialization.get_unsafe_globals_in_checkpoint(_reopenable(source)) if n not in ok]
    except Exception:  # a legacy (non-zip) file: torch lists nothing for it; the unpickler's message still says
        return ""
    return f" ({', '.join(names)})" if names else ""
