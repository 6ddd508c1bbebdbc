"""The one place that talks to Ray: connecting to a cluster (or starting a local one) and running a training stage
in Ray Train workers, and running tasks (evaluations). The sharding job (`shards.runner`), `videomamba pretrain
--ray-workers` and `videomamba run` use it.

Without an address a local cluster is started for the job and stopped afterwards; with `auto` or HOST:PORT an existing
cluster is joined; when Ray is already initialised in this process (tests, notebooks) that connection is used and
left open.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from typing import Any, Callable, Iterator, Optional

from pipeline.errors import ConfigError


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Raises ConfigError when nothing listens at a HOST:PORT Ray address (ray.init would wait for minutes)."""
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"--ray-address {address!r}: expected auto or HOST:PORT (the head node's GCS, e.g. "
                          "10.0.0.1:6379)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConfigError(f"--ray-address {address}: nothing answers there ({e}); start the head node with "
                          "`ray start --head` or give the right address") from None


@contextlib.contextmanager
def ray_connection(address: Optional[str], workers: Optional[int]) -> Iterator[int]:
    """Yields the cluster's CPU count, connecting first unless this process is connected already: to the cluster at
    `address` ("auto" or HOST:PORT), or to a local one started with `workers` CPUs (all of them when None)."""
    import ray

    if ray.is_initialized():
        yield int(ray.cluster_resources().get("CPU", 1))
        return
    kwargs = dict(include_dashboard=False, logging_level=logging.WARNING, configure_logging=True)
    # Inside `ray job submit` the job's cluster is in RAY_ADDRESS. Otherwise "local" starts a cluster of our own:
    # a bare ray.init() would join any cluster that `ray start` left on this machine and then refuse num_cpus.
    address = address or os.environ.get("RAY_ADDRESS") or None
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(address="local", num_cpus=workers or os.cpu_count(), **kwargs)
    except (ConnectionError, ValueError) as e:
        raise ConfigError(f"--ray-address {address}: cannot connect to a Ray cluster: {e}") from None
    try:
        yield int(ray.cluster_resources().get("CPU", 1))
    finally:
        ray.shutdown()


def nodes_not_seeing(path: str) -> list[str]:
    """The addresses of the connected cluster's live nodes on which `path` does not exist, checked by a tiny task
    pinned to each node: a run folder that only the driver's machine sees would leave the workers' checkpoints
    scattered over local disks, and a resumed step would not find them."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [node for node in ray.nodes() if node.get("Alive")]
    probe = ray.remote(_exists)
    pinned = [NodeAffinitySchedulingStrategy(node["NodeID"], soft=False) for node in nodes]
    refs = [probe.options(num_cpus=0, scheduling_strategy=where).remote(path) for where in pinned]
    return [node.get("NodeManagerAddress", node["NodeID"]) for node, seen in zip(nodes, ray.get(refs)) if not seen]


def _exists(path: str) -> bool:
    return os.path.exists(path)


def train_on_ray(train: Callable[..., dict], cfg, resume: Optional[str], workers: int, address: Optional[str] = None,
                 use_gpu: Optional[bool] = None, max_failures: int = 0) -> dict:
    """Runs a training stage (`train`, a module-level function called as train(cfg, resume=...) that returns a
    summary) in `workers` Ray Train workers that form one process group (NCCL on GPUs, gloo on CPUs), on the cluster
    at `address` or on a local one; returns rank 0's summary. `cfg`'s paths must be absolute (each worker runs in its
    own trial folder); the Ray Train files go to train.out/ray. use_gpu None: GPUs when the cluster has one per
    worker. With max_failures > 0 Ray restarts the workers after a failure (a lost node, a killed process) and they
    resume from the newest complete checkpoint, which needs resume="auto"."""
    if max_failures and resume != "auto":
        raise ConfigError("--ray-max-failures: restarted workers continue from the newest checkpoint; add "
                          "--resume auto")
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if address and address != "auto":
        check_reachable(address)
    storage = os.path.join(cfg.train.out, "ray")
    summary_file = os.path.join(storage, "summary.json")
    if os.path.exists(summary_file):
        os.remove(summary_file)
    with ray_connection(address, workers):
        import ray

        gpu = use_gpu if use_gpu is not None else ray.cluster_resources().get("GPU", 0) >= workers
        trainer = TorchTrainer(
            _ray_train_worker, train_loop_config={"train": train, "cfg": cfg, "resume": resume,
                                                  "summary_file": summary_file},
            torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu),
            run_config=RunConfig(name="ray_train", storage_path=storage,
                                 failure_config=FailureConfig(max_failures=max_failures),
                                 worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cuda" if gpu else "cpu"}}))
        trainer.fit()
    with open(summary_file) as f:
        return json.load(f)


def _ray_train_worker(config: dict) -> None:
    """One Ray Train worker: the stage in the process group Ray made (the engine joins it as it is); rank 0 leaves
    the stage's summary in a file for the driver (train.out sits on a file system every node shares)."""
    import gc

    import ray.train

    summary = config["train"](config["cfg"], resume=config["resume"])
    gc.collect()  # free the DeepSpeed engine's collective handles before Ray closes the group
    if ray.train.get_context().get_world_rank() == 0:
        os.makedirs(os.path.dirname(config["summary_file"]), exist_ok=True)
        with open(config["summary_file"], "w") as f:
            json.dump(summary, f, default=str)


def run_tasks(fn: Callable[..., Any], calls: list[tuple], gpus: Optional[float] = None, retries: int = 0) -> list:
    """Runs fn(*args) for each args of `calls` as its own Ray task on the connected cluster, as many at once as its
    resources allow (one CPU each, and `gpus` GPUs; None: one GPU when the cluster has any); returns per call its
    result or the exception it raised (one task's failure does not stop the others). A task lost with its node is
    retried up to `retries` times."""
    import ray

    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    remote = ray.remote(fn).options(num_cpus=1, num_gpus=gpus, max_retries=retries)
    refs = [remote.remote(*args) for args in calls]
    outcomes: list = []
    for ref in refs:
        try:
            outcomes.append(ray.get(ref))
        except Exception as e:  # noqa: BLE001 - handed back per task; RayTaskError carries the task's own error
            outcomes.append(getattr(e, "cause", None) or e)
    return outcomes
