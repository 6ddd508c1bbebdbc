"""Where a run's numbers go: `metrics.jsonl` (one object per optimizer step), TensorBoard, a progress bar.

Only rank 0 creates these. On resume the JSONL file is cut back to the checkpoint's step (rewritten aside, then
renamed over the old one) and TensorBoard purges the events past it, so a resumed run's records read exactly like
those of a run that was never interrupted.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Optional


def json_safe(value: Any) -> Any:
    """Returns `value` with non-finite floats as None (strict JSON has no NaN/inf), recursing into dicts/lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def read_records(path: str) -> list[dict]:
    """Returns the JSON objects of a metrics file; a last line cut short by a killed process is left out."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


class MetricsLog:
    """Appends one JSON line per optimizer step to `path`, flushed at once (a crash loses no finished step)."""

    def __init__(self, path: str, keep_through_step: int):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self._truncate(keep_through_step)
        self._file = open(path, "a")

    def _truncate(self, keep_through_step: int) -> None:
        """Keeps only the records of steps <= keep_through_step (all of them past it belonged to a lost run)."""
        if not os.path.exists(self.path):
            return
        kept = [r for r in read_records(self.path) if isinstance(r.get("step"), int) and r["step"] <= keep_through_step]
        tmp = self.path + ".part"
        with open(tmp, "w") as f:
            for r in kept:
                f.write(json.dumps(r, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardLog:
    """Scalars to `run_dir/tb`; events after `resume_step` from an interrupted run are purged."""

    def __init__(self, log_dir: str, resume_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir, purge_step=resume_step + 1 if resume_step > 0 else None)

    def write(self, step: int, scalars: dict) -> None:
        for name, value in scalars.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self._writer.add_scalar(name, value, step)

    def close(self) -> None:
        self._writer.close()


class ProgressBar:
    """tqdm bar over optimizer steps showing loss and clips/s (tqdm adds the ETA)."""

    def __init__(self, total: int, initial: int):
        from tqdm import tqdm

        self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, step: int, loss: Optional[float], clips_per_s: float) -> None:
        self._bar.n = step
        shown = "nan/inf" if loss is None or not math.isfinite(loss) else f"{loss:.4f}"
        self._bar.set_postfix_str(f"loss={shown} clips/s={clips_per_s:.1f}", refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()
