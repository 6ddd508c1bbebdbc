"""The sharding job on Ray: plan the shards, skip the complete ones, run one task per remaining shard, write the index.

The cluster comes from `pipeline.cluster.ray_connection` (a local one started for the job, or `auto` / HOST:PORT
joined); this module runs the tasks on it. Tasks are spread over the cluster's nodes and at most `workers` run at
once.
"""
from __future__ import annotations

import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional, Sequence

from pipeline.cluster import check_reachable, ray_connection
from pipeline.errors import ConfigError
from shards.index import all_failures, build_index, completed_shards, plan_shards, remove_stale_temporaries, \
    summarize, write_outputs
from shards.manifest import read_manifest
from shards.media import ProcessOptions, RetryPolicy
from shards.writer import ShardOptions, ShardPlan, ShardResult, prefetch, publish_from_driver, write_shard


@dataclass(frozen=True)
class ShardJobConfig:
    input: str  # manifest file or media folder URL
    out: str  # output folder URL
    samples_per_shard: int = 1000
    prefix: str = "shard"
    media_column: Optional[str] = None
    caption_columns: tuple[str, ...] = ()
    ray_address: Optional[str] = None  # None: start a local cluster; "auto" or HOST:PORT: join one
    workers: Optional[int] = None  # tasks at once; default: the CPUs of the (local or joined) cluster
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    process: ProcessOptions = field(default_factory=ProcessOptions)
    progress: Optional[bool] = None  # None: show the bar when stderr is a terminal


@dataclass
class JobOutcome:
    summary: dict
    index: dict
    failures: list[dict]

    @property
    def ok(self) -> bool:
        """True when every shard was written (rows that failed were recorded, which is fine)."""
        return self.summary["shards_failed"] == 0


def shard_corpus(cfg: ShardJobConfig) -> JobOutcome:
    """Runs the job described by `cfg` and writes shards, index.json, failures.jsonl and summary.json under cfg.out."""
    _check(cfg)
    out = cfg.out if "://" in cfg.out else os.path.abspath(cfg.out)
    manifest = read_manifest(cfg.input, cfg.media_column, cfg.caption_columns)
    plans = plan_shards(manifest.rows, cfg.samples_per_shard, cfg.prefix, cfg.process)
    _make_out_dir(out)
    remove_stale_temporaries(out)
    results = completed_shards(out, plans)
    todo = [p for p in plans if p.index not in results]
    opts = ShardOptions(out, cfg.retry, cfg.process)
    started = time.perf_counter()
    failed: dict[str, str] = {}
    nodes: dict[str, int] = {}
    workers = cfg.workers or os.cpu_count() or 1
    tasks_s = 0.0
    if todo:
        with ray_connection(cfg.ray_address, cfg.workers) as cluster_cpus:
            workers = cfg.workers or cluster_cpus
            tasks_started = time.perf_counter()
            _run_tasks(todo, opts, workers, results, failed, nodes,
                       _Progress(len(manifest.rows), plans, results, cfg.progress))
            tasks_s = time.perf_counter() - tasks_started
    elapsed = time.perf_counter() - started
    index = build_index(manifest.url, cfg.samples_per_shard, plans, results)
    failures = all_failures(results)
    summary = summarize(input_url=manifest.url, out=out, rows=len(manifest.rows), plans=plans, results=results,
                        written=[p.index for p in todo if p.index in results], failed_tasks=failed,
                        elapsed_s=elapsed, tasks_s=tasks_s, workers=workers, nodes=nodes)
    write_outputs(out, index, failures, summary, cfg.retry)
    return JobOutcome(summary, index, failures)


def _check(cfg: ShardJobConfig) -> None:
    if cfg.samples_per_shard < 1:
        raise ConfigError(f"--samples-per-shard must be at least 1, got {cfg.samples_per_shard}")
    if cfg.workers is not None and cfg.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {cfg.workers}")
    if not cfg.prefix or "/" in cfg.prefix or cfg.prefix.startswith("."):
        raise ConfigError(f"--prefix {cfg.prefix!r}: expected a plain file-name prefix")
    if cfg.retry.attempts < 1:
        raise ConfigError(f"--retries must be at least 0, got {cfg.retry.attempts - 1}")
    for name, value in (("--max-duration", cfg.process.max_duration), ("--short-side", cfg.process.short_side),
                        ("--fps", cfg.process.fps)):
        if value is not None and value <= 0:
            raise ConfigError(f"{name} must be positive, got {value}")
    _check_codec(cfg.process.codec)
    if cfg.ray_address and cfg.ray_address != "auto":
        check_reachable(cfg.ray_address)


def _check_codec(codec: str) -> None:
    import av

    try:
        av.codec.Codec(codec, "w")
    except Exception:  # noqa: BLE001 - PyAV raises different types for unknown and decode-only codecs
        raise ConfigError(f"--codec {codec!r}: this PyAV build has no such encoder") from None


def _make_out_dir(out: str) -> None:
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(out)
    try:
        fs.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot create the output folder: {e}") from None


def shard_task(plan: ShardPlan, opts: ShardOptions, prefetched) -> tuple[ShardResult, str]:
    """The Ray task: writes one shard and says on which node it ran."""
    import ray

    return write_shard(plan, opts, prefetched), ray.get_runtime_context().get_node_id()


def _run_tasks(todo: Sequence[ShardPlan], opts: ShardOptions, workers: int, results: dict[int, ShardResult],
               failed: dict[str, str], nodes: dict[str, int], bar) -> None:
    """Runs one task per plan, at most `workers` at a time, filling `results`, `failed` and `nodes`."""
    import ray

    remote = ray.remote(num_cpus=1)(shard_task)
    placements = _round_robin_placements()
    opts_ref = ray.put(opts)
    queue = deque(todo)
    running: dict = {}
    try:
        while queue or running:
            while queue and len(running) < workers:
                plan = queue.popleft()
                task = remote.options(scheduling_strategy=next(placements))
                running[task.remote(plan, opts_ref, prefetch(plan, opts.retry))] = plan
            ready, _ = ray.wait(list(running), num_returns=1)
            plan = running.pop(ready[0])
            try:
                result, node = ray.get(ready[0])
                if result.tar is not None:
                    publish_from_driver(result, plan, opts.out)
            except Exception as e:  # noqa: BLE001 - a failed shard is reported; the other shards go on
                failed[plan.name] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
                bar.update(plan, None)
                continue
            results[plan.index] = result
            nodes[node] = nodes.get(node, 0) + 1
            bar.update(plan, result)
    finally:
        bar.close()


def _round_robin_placements():
    """Yields scheduling strategies that place successive tasks on the cluster's CPU nodes in turn.

    Ray's "SPREAD" is a preference that short tasks often defeat (they finish before the next is placed, and all land
    on the driver's node); a soft node affinity spreads them for certain and still falls back to any node when the
    chosen one is gone."""
    import itertools

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0)
    if not nodes:
        return itertools.repeat("SPREAD")
    return (NodeAffinitySchedulingStrategy(node_id, soft=True) for node_id in itertools.cycle(nodes))


class _Progress:
    """A tqdm bar over manifest rows with shards done and MB/s written (on stderr)."""

    def __init__(self, rows: int, plans: Sequence[ShardPlan], done: dict[int, ShardResult], enabled: Optional[bool]):
        from tqdm import tqdm

        disable = (not sys.stderr.isatty()) if enabled is None else not enabled
        self.bar = tqdm(total=rows, unit="row", desc="shard", disable=disable, dynamic_ncols=True, file=sys.stderr)
        self.shards_total = len(plans)
        self.shards_done = len(done)
        self.bytes = 0
        self.started = time.perf_counter()
        self.bar.update(sum(len(plans[i].rows) for i in done))
        self._postfix()

    def update(self, plan: ShardPlan, result: Optional[ShardResult]) -> None:
        if result is not None:
            self.shards_done += 1
            self.bytes += result.entry["bytes"]
        self.bar.update(len(plan.rows))
        self._postfix()

    def _postfix(self) -> None:
        mb_s = self.bytes / 1e6 / max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix_str(f"shards {self.shards_done}/{self.shards_total}, {mb_s:.1f} MB/s", refresh=False)

    def close(self) -> None:
        self.bar.close()
