"""Shard plans, resume detection and the files beside the shards: index.json, failures.jsonl, summary.json.

Rows are cut into shards of N by row order (shard i = rows [i*N, (i+1)*N)), whatever fails, so a shard's name and
contents depend only on the manifest and the options. A shard from an earlier run is reused when its tar and its
sidecar both exist, the sidecar parses, its fingerprint matches the plan and the tar has the recorded size.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import asdict
from functools import partial
from typing import Iterable, Optional, Sequence

from fsspec.core import url_to_fs

from shards.manifest import ManifestRow
from shards.media import ProcessOptions, RetryPolicy, retried
from shards.writer import ShardPlan, ShardResult

LAYOUT_VERSION = 1  # bump when the sample layout changes, so that old shards are not reused
INDEX, FAILURES, SUMMARY = "index.json", "failures.jsonl", "summary.json"


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def plan_shards(rows: Sequence[ManifestRow], samples_per_shard: int, prefix: str,
                process: ProcessOptions) -> list[ShardPlan]:
    """Returns the shard plans: consecutive runs of `samples_per_shard` manifest rows. Two rows with one key would
    merge into one sample in a WebDataset reader (a row silently lost): refused before any shard is written."""
    seen: dict[str, int] = {}
    for r in rows:
        if r.key in seen:
            raise ValueError(f"manifest rows {seen[r.key]} and {r.row} share the key {r.key!r}; keys must be unique "
                             "in a corpus (shards.manifest gives repeated keys free ones)")
        seen[r.key] = r.row
    plans = []
    for i, first in enumerate(range(0, len(rows), samples_per_shard)):
        chunk = tuple(rows[first:first + samples_per_shard])
        end = chunk[-1].row + 1
        plans.append(ShardPlan(i, shard_name(prefix, i), chunk, chunk[0].row, end, fingerprint(chunk, process)))
    return plans


# processing options added after the layout's first release: they enter a fingerprint only when set, so that the
# shards of a job begun before them still match and a resumed job does not write them again
LATER_OPTIONS = ("keyint",)


def fingerprint(rows: Iterable[ManifestRow], process: ProcessOptions) -> str:
    """Returns a digest of everything a shard's bytes depend on."""
    options = {k: v for k, v in asdict(process).items() if not (k in LATER_OPTIONS and v is None)}
    payload = json.dumps({"layout": LAYOUT_VERSION, "process": options, "rows": [asdict(r) for r in rows]},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def completed_shards(out: str, plans: Sequence[ShardPlan]) -> dict[int, ShardResult]:
    """Returns {shard index: result} for the plans whose shard an earlier run finished."""
    fs, out_dir = url_to_fs(out)
    fs.invalidate_cache(out_dir)  # other processes (the tasks, an earlier run) wrote there since any cached listing
    if not fs.exists(out_dir):
        return {}
    sizes = {_base(p["name"]): p.get("size") for p in fs.ls(out_dir, detail=True)}
    candidates = [p for p in plans if p.name in sizes and p.sidecar in sizes]
    paths = {f"{out_dir.rstrip('/')}/{p.sidecar}": p for p in candidates}
    raw = fs.cat(list(paths), on_error="return") if paths else {}
    done = {}
    for path, plan in paths.items():
        record = _parsed(raw.get(path))
        if record is None or record.get("fingerprint") != plan.fingerprint:
            continue
        if record["entry"].get("bytes") != sizes[plan.name]:
            continue
        done[plan.index] = ShardResult(record["entry"], record["failures"], record["kinds"], record["fingerprint"])
    return done


def remove_stale_temporaries(out: str) -> int:
    """Removes temporary tars that a killed run left in a local output folder; returns how many."""
    fs, out_dir = url_to_fs(out)
    fs.invalidate_cache(out_dir)
    if not fs.exists(out_dir):
        return 0
    stale = [p for p in fs.ls(out_dir, detail=False) if re.match(r"^\..+\.tmp-", _base(p))]
    for p in stale:
        fs.rm_file(p)
    return len(stale)


def _parsed(raw) -> Optional[dict]:
    if raw is None or isinstance(raw, Exception):
        return None
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # a sidecar cut short by a kill: the shard is redone
    ok = isinstance(record, dict) and {"entry", "failures", "kinds", "fingerprint"} <= set(record)
    return record if ok else None


def _base(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


# --------------------------------------------------------------------------------------------------- output files
def build_index(input_url: str, samples_per_shard: int, plans: Sequence[ShardPlan],
                results: dict[int, ShardResult]) -> dict:
    """Returns index.json's content; shards without a result (their task failed) are listed under "incomplete"."""
    entries = [results[p.index].entry for p in plans if p.index in results]
    kinds = Counter()
    for r in results.values():
        kinds.update(r.kinds)
    index = {"input": input_url, "media": _media(kinds), "samples": sum(e["samples"] for e in entries),
             "samples_per_shard": samples_per_shard, "shards": entries}
    missing = [p.name for p in plans if p.index not in results]
    if missing:
        index["incomplete"] = missing
    return index


def _media(kinds: Counter) -> Optional[str]:
    """Returns "video" or "image" when every sample is of that kind, else None (mixed or empty corpus)."""
    present = [k for k in ("video", "image") if kinds.get(k)]
    return present[0] if len(present) == 1 else None


def all_failures(results: dict[int, ShardResult]) -> list[dict]:
    return sorted((f for r in results.values() for f in r.failures), key=lambda f: f["row"])


def write_outputs(out: str, index: dict, failures: list[dict], summary: dict, retry: RetryPolicy) -> None:
    """Writes failures.jsonl, summary.json and, last, index.json beside the shards (each whole, in one put)."""
    fs, out_dir = url_to_fs(out)
    base = out_dir.rstrip("/")
    files = {FAILURES: "".join(json.dumps(f, sort_keys=True) + "\n" for f in failures),
             SUMMARY: json.dumps(summary, indent=2, sort_keys=True) + "\n",
             INDEX: json.dumps(index, indent=1, sort_keys=True) + "\n"}
    for name, text in files.items():
        retried(partial(fs.pipe_file, f"{base}/{name}", text.encode()), retry)


def summarize(*, input_url: str, out: str, rows: int, plans: Sequence[ShardPlan], results: dict[int, ShardResult],
              written: Sequence[int], failed_tasks: dict[str, str], elapsed_s: float, tasks_s: float, workers: int,
              nodes: dict[str, int]) -> dict:
    """Returns summary.json's content: totals over all shards; throughput of the shards written by this run over
    `tasks_s`, the time from the first task's submission to the last result (Ray's start-up excluded)."""
    failures = all_failures(results)
    new = [results[i] for i in written]
    new_samples = sum(r.entry["samples"] for r in new)
    new_bytes = sum(r.entry["bytes"] for r in new)
    return {
        "input": input_url, "out": out, "rows": rows,
        "samples": sum(r.entry["samples"] for r in results.values()),
        "failed_rows": len(failures),
        "failures_by_reason": dict(sorted(Counter(f["reason"] for f in failures).items())),
        "shards": len(plans), "shards_written": len(written), "shards_skipped": len(results) - len(written),
        "shards_failed": len(failed_tasks), "failed_shards": failed_tasks,
        "bytes": sum(r.entry["bytes"] for r in results.values()), "bytes_written": new_bytes,
        "elapsed_s": round(elapsed_s, 3), "tasks_s": round(tasks_s, 3),
        "samples_per_s": _per_s(new_samples, tasks_s, 2),
        "mb_per_s": _per_s(new_bytes / 1e6, tasks_s, 3), "workers": workers, "nodes": nodes,
    }


def _per_s(amount: float, seconds: float, digits: int) -> float:
    return round(amount / seconds, digits) if seconds > 0 else 0.0


def format_summary(s: dict) -> str:
    """Returns the one-screen summary printed at the end of a run."""
    lines = [
        f"videomamba shard: {s['input']} -> {s['out']}",
        f"  rows          {s['rows']}",
        f"  samples       {s['samples']} written to {s['shards']} shards "
        f"({s['shards_written']} this run, {s['shards_skipped']} reused from an earlier run)",
        f"  failed rows   {s['failed_rows']}" + "".join(f"\n    {reason:<20} {n}"
                                                    for reason, n in s["failures_by_reason"].items()),
        f"  bytes         {s['bytes'] / 1e6:.2f} MB ({s['bytes_written'] / 1e6:.2f} MB this run)",
        f"  throughput    {s['samples_per_s']} samples/s, {s['mb_per_s']} MB/s over {s['tasks_s']} s of tasks "
        f"({s['workers']} workers on {len(s['nodes'])} node(s)); {s['elapsed_s']} s in all",
    ]
    if s["shards_failed"]:
        lines.append(f"  FAILED shards {s['shards_failed']} (rerun the same command to retry them):")
        lines += [f"    {name}: {err}" for name, err in s["failed_shards"].items()]
    lines.append(f"  see {s['out'].rstrip('/')}/{INDEX}, {FAILURES}, {SUMMARY}")
    return "\n".join(lines)
