"""The training loop on DeepSpeed: optimizer steps, NaN/inf policy, metrics, checkpoints and exact resume.

    trainer = Trainer(model, loss_fn, data, train_cfg, ds_cfg, run_dir)
    summary = trainer.fit(resume="auto")

`loss_fn(model, batch) -> (loss, {name: float})` is called once per micro-batch. `model` is the DeepSpeed engine:
calling it runs the wrapped module's forward (with ZeRO-3's parameter gathering), any other attribute falls through
to the module (`model.forward_features(...)`), and `model.module` is the module itself. `batch` is what the data
yields, with every tensor in it (nested in dicts, lists, tuples) moved to the engine's device and, under bf16/fp16,
floating tensors cast to that dtype; other values (strings, lists of strings) pass untouched. Every rank must
return the same names in the dict; the logged values are their means over micro-batches and ranks.

`data` is any iterable with `state_dict()` / `load_state_dict(state)` describing the position of the stream on this
rank (called at checkpoints and on resume), and optionally `stats()` -> {counter: int} (summed over ranks into the
metrics). The engine knows nothing about what the batches hold.

Exact resume: a checkpoint holds DeepSpeed's model and optimizer states, the LR scheduler's state (on resume the LR
is recomputed from the step and the current config), the step, each rank's data position and each rank's RNG
states (restored after the data iterator is created, the last thing before the next step). A run resumed from step
k with the same world size therefore computes the same losses as one that never stopped (bit for bit on the CPU in
fp32), and its metrics.jsonl is cut back to step k first.

Resume with another world size (a node lost, or added): the module gets the checkpoint's consolidated fp32 weights
before DeepSpeed partitions them anew (any ZeRO stage on either side), the step, LR schedule and data position carry
over (the data stream re-deals the epoch's unread samples over the new layout, see pipeline.data.stream), and Adam's
moments start again; a warning says so. Not exact, but nothing is lost or repeated.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from pipeline import safe_load
from pipeline.config import ConfigError, DeepSpeedConfig, TrainConfig
from pipeline.engine import checkpoint as ckpt
from pipeline.engine import dist
from pipeline.engine.ds_config import check_micro_batch, deepspeed_config
from pipeline.engine.flat_grads import flatten_bf16_grads
from pipeline.engine.graphs import GraphedChain, graph_chain
from pipeline.engine.metrics import MetricsLog, ProgressBar, TensorBoardLog
from pipeline.engine.optim import SkippableAdamW, build_optimizer
from pipeline.engine.schedule import build_scheduler, move_to_step

log = logging.getLogger(__name__)

LossFn = Callable[[Any, Any], "tuple[torch.Tensor, dict[str, torch.Tensor | float]]"]
EvaluateFn = Callable[[torch.nn.Module, int], "dict[str, float]"]  # (module, step) -> numbers to log


class NonFiniteLoss(RuntimeError):
    """The loss was NaN or inf and `train.nan_policy` is `stop`."""


class DataExhausted(RuntimeError):
    """The data iterable ended before `train.max_steps`."""


class DiskFull(RuntimeError):
    """A checkpoint could not be written because the file system of `train.out` is full; the message names the
    newest intact checkpoint and how to resume."""


@dataclass
class FitSummary:
    start_step: int  # the step the run started from (0, or the checkpoint's)
    step: int  # the last optimizer step taken
    resumed_from: Optional[str]
    last_loss: Optional[float]
    skipped_steps: int  # non-finite steps skipped, over the whole run (resumed parts included)
    samples: int  # samples consumed by this call, all ranks together
    wall_s: float
    checkpoints: list[str] = field(default_factory=list)  # published by this call


@dataclass
class _StepResult:
    loss: float  # mean over micro-batches and ranks (NaN/inf when any was)
    parts: dict[str, float]
    nonfinite: bool
    grad_norm: Optional[float] = None


class Trainer:
    def __init__(self, model: torch.nn.Module, loss_fn: LossFn, data: Iterable, train_cfg: TrainConfig,
                 ds_cfg: Optional[DeepSpeedConfig] = None, run_dir: Optional[str] = None,
                 graph_chains: Optional[dict[str, Sequence[torch.nn.Module]]] = None,
                 evaluate: Optional[EvaluateFn] = None):
        """graph_chains: name -> submodules of `model` that each step runs as a chain, each on the previous one's
        outputs (a backbone's blocks: "backbone"); with `train.cuda_graphs` on a GPU the chains that
        `train.cuda_graph_chains` names replay as CUDA graphs (pipeline.engine.graphs).
        evaluate: the stage's evaluation, `evaluate(model, step) -> {name: number}`, run every `train.eval_every`
        steps on every rank with the model in eval mode under no_grad; rank 0 logs what it returns with the step."""
        run_dir = run_dir or train_cfg.out
        if "://" in run_dir:
            raise ConfigError(f"train.out: {run_dir} is a URL; checkpoints need a local or shared file system path "
                              "(every rank writes into it and publication is a rename)")
        for method in ("state_dict", "load_state_dict"):
            if not callable(getattr(data, method, None)):
                raise TypeError(f"Trainer: data ({type(data).__name__}) has no {method}(); exact resume needs it")
        self.model = model
        self.loss_fn = loss_fn
        self.data = data
        self.cfg = train_cfg
        self.ds_cfg = ds_cfg or DeepSpeedConfig()
        self.run_dir = run_dir
        self.graph_chains = {name: list(modules) for name, modules in (graph_chains or {}).items()}
        self.evaluate = evaluate
        self.graphs: dict[str, GraphedChain] = {}  # the replayed chains, once fit() has built them with cuda_graphs
        self.engine: Any = None  # the DeepSpeed engine, once fit() or build() has built it
        self.optimizer: Optional[SkippableAdamW] = None  # build()'s optimizer and schedule (fit() keeps its own)
        self.scheduler: Any = None
        self.dist: Optional[dist.DistInfo] = None

    # ------------------------------------------------------------------------------------------------ public
    def fit(self, resume: Optional[str] = None) -> FitSummary:
        """Trains up to `train.max_steps` optimizer steps; `resume` is None, "auto" or a checkpoint/run path."""
        started = time.perf_counter()
        info = self.dist = dist.init_distributed()
        with _repeatable_off_cuda(info.device):
            return self._fit(info, resume, started)

    def _fit(self, info: dist.DistInfo, resume: Optional[str], started: float) -> FitSummary:
        check_micro_batch(self.cfg, self.ds_cfg, info.world_size)  # before DeepSpeed starts
        _quiet_deepspeed()
        ckpt.seed_everything(self.cfg.seed + info.rank)
        ref = self._resume_choice(resume)
        state_file = os.path.join(ref.path, ckpt.TRAINER_STATE) if ref else ""
        trainer_state = safe_load.load(state_file, state_file) if ref else None
        if ref and trainer_state["world_size"] != info.world_size:  # before DeepSpeed partitions them anew
            self._load_consolidated_weights(ref, trainer_state["world_size"])
        engine, optimizer, scheduler = self._build(info)
        state = self._restore(ref, trainer_state, engine, scheduler) if ref else {"step": 0, "skipped_steps": 0}
        step, skipped = state["step"], state["skipped_steps"]
        logs = _RunLogs(self.run_dir, self.cfg, step) if info.is_main else None
        iterator = iter(self.data)
        if ref and state["rng"] is not None:
            ckpt.set_rng_state(state["rng"])
        micro, accum = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
        samples_per_step = micro * accum * info.world_size
        summary = FitSummary(start_step=step, step=step, resumed_from=ref.path if ref else None, last_loss=None,
                             skipped_steps=skipped, samples=0, wall_s=0.0)
        try:
            while step < self.cfg.max_steps:
                t0 = time.perf_counter()
                lr = optimizer.param_groups[0]["lr"]
                result = self._optimizer_step(engine, optimizer, iterator, accum, step + 1)
                scheduler.step()
                step += 1
                skipped += result.nonfinite
                summary.step, summary.last_loss, summary.skipped_steps = step, result.loss, skipped
                summary.samples += samples_per_step
                record = self._record(step, result, lr, samples_per_step / (time.perf_counter() - t0),
                                      skipped)
                if self._evaluation_due(step):
                    record.update(self._evaluated(engine, step))
                if logs:
                    logs.write(step, record)
                if self._checkpoint_due(step):
                    summary.checkpoints.append(self._save(engine, scheduler, step, skipped))
        finally:
            if logs:
                logs.close()
            if info.is_main:
                for name, chain in self.graphs.items():
                    log.info("CUDA graphs, %s: %d module replays, %d eager calls (the first of each cause logged "
                             "above)", name, chain.replays, chain.eager_calls)
        summary.wall_s = time.perf_counter() - started
        return summary

    # ------------------------------------------------------------------------------------------- driven steps
    def build(self) -> None:
        """Joins the process group and builds the engine, its optimizer and schedule (`self.engine`,
        `self.optimizer`, `self.scheduler`) as `fit` does, reading and writing no checkpoint and no log: for a caller
        that drives the steps itself with `step` (bench/train_step.py times them)."""
        self.dist = dist.init_distributed()
        check_micro_batch(self.cfg, self.ds_cfg, self.dist.world_size)
        _quiet_deepspeed()
        ckpt.seed_everything(self.cfg.seed + self.dist.rank)
        self.engine, self.optimizer, self.scheduler = self._build(self.dist)

    def step(self, iterator, step: int) -> "_StepResult":
        """Takes optimizer step number `step` (its micro-batches from `iterator`) exactly as `fit` does, then steps
        the schedule; returns its loss, parts and gradient norm. Needs `build()` first."""
        result = self._optimizer_step(self.engine, self.optimizer, iterator,
                                      self.engine.gradient_accumulation_steps(), step)
        self.scheduler.step()
        return result

    # ------------------------------------------------------------------------------------------------ building
    def _build(self, info: dist.DistInfo) -> tuple[Any, SkippableAdamW, torch.optim.lr_scheduler.LambdaLR]:
        import deepspeed

        cfg = self.cfg
        optimizer = build_optimizer(self.model, cfg.lr, cfg.weight_decay, cfg.betas)
        scheduler = build_scheduler(optimizer, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps)
        # The scheduler stays ours (stepped once per optimizer step, skipped steps included), so the LR is a
        # function of the step alone whatever DeepSpeed does with overflowing fp16 steps.
        engine, _, _, _ = deepspeed.initialize(model=self.model, optimizer=optimizer,
                                               config=deepspeed_config(cfg, self.ds_cfg))
        self.engine = engine
        flatten_bf16_grads(engine.optimizer)  # train.grad_accum_dtype=fp32: one gradient fold per group, not per tensor
        if engine.train_micro_batch_size_per_gpu() != cfg.batch_size:
            raise ConfigError(f"deepspeed.config ({self.ds_cfg.config}) makes the micro batch "
                              f"{engine.train_micro_batch_size_per_gpu()} per process, but the data yields "
                              f"train.batch_size={cfg.batch_size} samples per micro-step: set train.batch_size="
                              f"{engine.train_micro_batch_size_per_gpu()} (or change the file's batch keys)")
        if cfg.cuda_graphs:
            self.graphs = self._graphed_chains(engine)
        if info.is_main:
            log.info("DeepSpeed: world %d, ZeRO stage %d, micro batch %d, accumulation %d, %s", info.world_size,
                     engine.zero_optimization_stage(), engine.train_micro_batch_size_per_gpu(),
                     engine.gradient_accumulation_steps(), _precision_of(engine))
        return engine, optimizer, scheduler

    def _graphed_chains(self, engine: Any) -> dict[str, GraphedChain]:
        """The chains `train.cuda_graph_chains` names, made to replay as CUDA graphs (none off CUDA)."""
        if engine.zero_optimization_stage() == 3:
            raise ConfigError("train.cuda_graphs=true needs ZeRO stage 0, 1 or 2: ZeRO-3 gathers the parameters "
                              "anew for every forward, which a replayed graph cannot do (set deepspeed.zero_stage "
                              "to 2 or train.cuda_graphs=false)")
        absent = [name for name in self.cfg.cuda_graph_chains if not self.graph_chains.get(name)]
        if absent:
            log.warning("train.cuda_graph_chains: this stage's model has no chain %s (its chains: %s); nothing is "
                        "replayed for %s", ", ".join(absent), ", ".join(self.graph_chains) or "none",
                        "it" if len(absent) == 1 else "them")
        if engine.device.type != "cuda":
            log.warning("train.cuda_graphs=true is ignored on %s: CUDA graphs need a GPU", engine.device)
            return {}
        return {name: graph_chain(self.graph_chains[name], self.cfg.cuda_graph_shapes)
                for name in self.cfg.cuda_graph_chains if name not in absent}

    # ------------------------------------------------------------------------------------------------ stepping
    def _optimizer_step(self, engine: Any, optimizer: SkippableAdamW, iterator, accum: int,
                        step: int) -> _StepResult:
        """Runs `accum` micro-batches and one optimizer update (or none, for a skipped non-finite step).

        The losses are read once, after the last backward: reading one makes the host wait for the GPU, and until
        then the host queues the backward (and the next micro-batch) while the GPU still runs the forward."""
        seen: list[tuple[torch.Tensor, dict]] = []
        for i in range(accum):
            batch = self._next_batch(iterator, step)
            loss, parts = self.loss_fn(engine, _to_device(batch, engine.device, _float_dtype_of(engine)))
            seen.append((loss.detach(), parts))
            engine.backward(loss)
            last = i == accum - 1
            if last:
                result = self._reduced(seen, accum)
                if result.nonfinite:
                    self._on_nonfinite(step, result)
                result.grad_norm = _plain_grad_norm(engine)
            with optimizer.skipped(last and result.nonfinite):  # the update happens (or not) in this step()
                engine.step()
        if result.grad_norm is None:
            result.grad_norm = _finite_or_none(engine.get_global_grad_norm())
        return result

    def _next_batch(self, iterator, step: int):
        try:
            batch, ended = next(iterator), 0
        except StopIteration:
            batch, ended = None, 1
        if dist.world_size() > 1:  # every rank must stop together, or the others wait in a collective forever
            ended = int(dist.all_reduce_sum(torch.tensor([ended], dtype=torch.int64, device=self.dist.device)))
        if ended:
            raise DataExhausted(f"the data ran out during step {step} (train.max_steps={self.cfg.max_steps}); "
                                "lower train.max_steps or let the stream repeat (data.epochs: null)")
        return batch

    def _reduced(self, seen: list[tuple[torch.Tensor, dict]], accum: int) -> _StepResult:
        """The step's mean loss and parts over micro-batches and ranks, and whether any loss was non-finite: summed
        on the device and read once."""
        names = sorted({name for _, parts in seen for name in parts})
        rows = torch.stack([torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.dist.device)
                                         for v in [loss, *(parts.get(n, 0.0) for n in names)]])
                            for loss, parts in seen])
        losses = rows[:, 0]
        local = torch.cat([losses.sum()[None], (~torch.isfinite(losses)).sum()[None].double(), rows[:, 1:].sum(0)])
        total = dist.all_reduce_sum(local).cpu().tolist()
        n = accum * dist.world_size()
        return _StepResult(loss=total[0] / n, parts={k: v / n for k, v in zip(names, total[2:])},
                           nonfinite=total[1] > 0)

    def _on_nonfinite(self, step: int, result: _StepResult) -> None:
        where = f"step {step} (loss over all ranks and micro-batches: {result.loss}, parts {result.parts})"
        if self.cfg.nan_policy == "stop":
            raise NonFiniteLoss(f"non-finite loss at {where}; stopping (train.nan_policy=stop). The last complete "
                                f"checkpoint is under {ckpt.checkpoints_root(self.run_dir)}; "
                                "train.nan_policy=skip skips such steps instead")
        if self.dist.is_main:
            log.warning("non-finite loss at %s: skipping this optimizer update (train.nan_policy=skip)", where)

    def _record(self, step: int, result: _StepResult, lr: float, clips_per_s: float,
                skipped: int) -> dict:
        record: dict = {"step": step, "loss": result.loss, "lr": lr}
        record.update(result.parts)
        record["grad_norm"] = result.grad_norm
        record["clips_per_s"] = clips_per_s
        record["skipped"] = result.nonfinite
        record["skipped_steps"] = skipped
        if step % max(self.cfg.log_every, 1) == 0 or step == self.cfg.max_steps:
            record.update(self._data_counters())  # a collective over ranks: only on logging steps
        record["time"] = time.time()
        return record

    def _data_counters(self) -> dict:
        stats = getattr(self.data, "stats", None)
        if not callable(stats):
            return {}
        totals: dict[str, int] = {}
        for counters in dist.all_gather_objects(dict(stats())):
            for name, n in counters.items():
                totals[name] = totals.get(name, 0) + int(n)
        return {f"data/{name}": n for name, n in sorted(totals.items())}

    # ------------------------------------------------------------------------------------------------ evaluation
    def _evaluation_due(self, step: int) -> bool:
        return self.evaluate is not None and self.cfg.eval_every > 0 and step % self.cfg.eval_every == 0

    def _evaluated(self, engine: Any, step: int) -> dict:
        """Runs the stage's evaluation on the trained module, leaving the RNG streams (which exact resume replays)
        and the module's mode as they were; the data iterator is not touched."""
        module = getattr(engine, "module", engine)
        rng, was_training = ckpt.rng_state(), module.training
        started = time.perf_counter()
        module.eval()
        try:
            with torch.no_grad():
                out = dict(self.evaluate(module, step))
        finally:
            module.train(was_training)
            ckpt.set_rng_state(rng)
        out["eval_s"] = time.perf_counter() - started
        return out

    # ------------------------------------------------------------------------------------------------ checkpoints
    def _checkpoint_due(self, step: int) -> bool:
        every = self.cfg.ckpt_every
        return step == self.cfg.max_steps or (every > 0 and step % every == 0)

    def _save(self, engine: Any, scheduler, step: int, skipped: int) -> str:
        info = self.dist
        root = ckpt.checkpoints_root(self.run_dir)
        if info.is_main:
            ckpt.fresh_temp_dir(root, step)
        dist.barrier()
        temp = ckpt.temp_dir_for(root, step)
        failed: Optional[BaseException] = None
        try:
            engine.save_checkpoint(temp, tag=ckpt.DEEPSPEED_TAG, save_latest=False)
            torch.save({"data": self.data.state_dict(), "rng": ckpt.rng_state()},
                       os.path.join(temp, ckpt.rank_file_name(info.rank)))
            if info.is_main:
                torch.save({"step": step, "skipped_steps": skipped, "scheduler": scheduler.state_dict(),
                            "world_size": info.world_size}, os.path.join(temp, ckpt.TRAINER_STATE))
        except (OSError, RuntimeError) as e:  # torch reports a full disk as "enforce fail ... unexpected pos"
            failed = e
        self._stop_together_if(failed, step, temp)
        dist.barrier()
        path = ""
        if info.is_main:
            try:
                path = ckpt.publish(temp, step, info.world_size)
            except OSError as e:
                failed = e
        self._stop_together_if(failed, step, temp)
        if info.is_main:
            for old in ckpt.prune(root, self.cfg.keep_last):
                log.info("removed old checkpoint %s (train.keep_last=%d)", old, self.cfg.keep_last)
        dist.barrier()
        return dist.broadcast_object(path)

    def _stop_together_if(self, failed: Optional[BaseException], step: int, temp: str) -> None:
        """Every rank raises when any rank could not write its part of checkpoint `step` (the others would wait
        in the next collective forever): DiskFull, saying so plainly, when train.out's file system is full, else
        the error itself. The partial checkpoint is removed, freeing what it took."""
        if not dist.all_reduce_sum(torch.tensor([int(failed is not None)], device=self.dist.device)).item():
            return
        full = ckpt.disk_is_full(self.run_dir)
        if self.dist.is_main:
            shutil.rmtree(temp, ignore_errors=True)
        if full:
            raise DiskFull(ckpt.disk_full_message(self.run_dir, step)) from None
        if failed is not None:
            raise failed
        raise RuntimeError(f"checkpoint step {step}: another process could not write its part (see its error)")

    def _resume_choice(self, resume: Optional[str]) -> Optional[ckpt.CheckpointRef]:
        """Rank 0 picks the checkpoint (and clears leftovers of a killed run); every rank gets its choice."""
        choice: Any = None
        if self.dist.is_main:
            for gone in ckpt.clear_leftovers(ckpt.checkpoints_root(self.run_dir)):
                log.info("removed %s left by an interrupted run", gone)
            try:
                choice = ckpt.resolve_resume(resume, self.run_dir)
                if choice is not None:  # before DeepSpeed, whose loaders unpickle with arbitrary globals, reads it
                    ckpt.check_torch_files(choice.path)
            except (ckpt.CorruptCheckpoint, FileNotFoundError) as e:  # a path asked for by name that cannot be used
                choice = ConfigError(f"resume={resume!r}: {e}")
            except ConfigError as e:  # an unsafe file (safe_load.UnsafeFile)
                choice = e
            if resume is None and ckpt.list_checkpoints(ckpt.checkpoints_root(self.run_dir)):
                choice = ConfigError(f"{ckpt.checkpoints_root(self.run_dir)} holds checkpoints of an earlier run: "
                                     "resume it (--resume auto), start over in this folder (--resume restart: "
                                     "they are moved aside) or give this run its own train.out")
            if resume == ckpt.RESTART:
                aside = ckpt.set_aside(ckpt.checkpoints_root(self.run_dir))
                if aside:
                    log.warning("resume=restart: starting at step 0; the earlier checkpoints were moved to %s", aside)
            if resume == "auto" and choice is None:
                log.info("resume=auto: no complete checkpoint under %s; starting at step 0", self.run_dir)
        choice = dist.broadcast_object(choice)
        if isinstance(choice, Exception):
            raise choice
        return choice

    def _load_consolidated_weights(self, ref: ckpt.CheckpointRef, saved_world: int) -> None:
        """Resuming with another world size: the module gets the checkpoint's fp32 weights (any ZeRO stage), the
        optimizer starts with fresh Adam moments; step, LR schedule and data position carry over (`_restore`)."""
        if self.dist.is_main:
            log.warning("checkpoint %s was written by %d processes, this run has %d: resuming with the same weights, "
                        "step, LR schedule and data position (the data stream re-deals the unread samples of the "
                        "epoch), but with fresh Adam moments; exact resume needs the same world size", ref.path,
                        saved_world, self.dist.world_size)
        self.model.load_state_dict(ckpt.model_state_dict(ref.path))

    def _restore(self, ref: ckpt.CheckpointRef, trainer_state: dict, engine: Any, scheduler) -> dict:
        """Loads every part of checkpoint `ref`; returns step, skipped_steps and this rank's RNG states (None with
        another world size). Another world size loads no DeepSpeed states (the weights came in before the engine
        was built) and may take the data position from another rank's file: each holds every rank's."""
        saved_world = trainer_state["world_size"]
        same_world = saved_world == self.dist.world_size
        if same_world:
            loaded, _ = engine.load_checkpoint(ref.path, tag=ckpt.DEEPSPEED_TAG, load_optimizer_states=True,
                                               load_lr_scheduler_states=False)
            if loaded is None:
                raise ckpt.CorruptCheckpoint(f"checkpoint {ref.path}: DeepSpeed could not load its "
                                             f"'{ckpt.DEEPSPEED_TAG}' states")
        move_to_step(scheduler, trainer_state["step"])
        rank = self.dist.rank if self.dist.rank < saved_world else 0
        rank_file = os.path.join(ref.path, ckpt.rank_file_name(rank))
        rank_state = safe_load.load(rank_file, rank_file)
        try:
            self.data.load_state_dict(rank_state["data"])
        except ValueError as e:
            raise ConfigError(f"checkpoint {ref.path}: the data position cannot be restored: {e}") from None
        if self.dist.is_main:
            log.info("resumed from %s at step %d", ref.path, trainer_state["step"])
        return {"step": trainer_state["step"], "skipped_steps": trainer_state["skipped_steps"],
                "rng": rank_state["rng"] if same_world else None}


class _RunLogs:
    """Rank 0's outputs: metrics.jsonl, TensorBoard (train.tensorboard) and the progress bar (train.progress)."""

    def __init__(self, run_dir: str, cfg: TrainConfig, start_step: int):
        self.cfg = cfg
        self.start_step, self.started = start_step, time.perf_counter()
        self.jsonl = MetricsLog(os.path.join(run_dir, "metrics.jsonl"), keep_through_step=start_step)
        self.tb = TensorBoardLog(os.path.join(run_dir, "tb"), start_step) if cfg.tensorboard else None
        self.bar = ProgressBar(cfg.max_steps, start_step) if cfg.progress else None

    def write(self, step: int, record: dict) -> None:
        self.jsonl.write(record)
        if step % max(self.cfg.log_every, 1) == 0 or step == self.cfg.max_steps:
            if self.tb:
                self.tb.write(step, {k if "/" in k else f"train/{k}": v for k, v in record.items()
                                     if k not in ("step", "time")})
            if self.bar:
                self.bar.update(step, record["loss"], record["clips_per_s"])
            else:  # no bar (batch jobs): one log line per logging step instead
                per_step = (time.perf_counter() - self.started) / max(step - self.start_step, 1)
                log.info("step %d/%d loss %s clips/s %.1f eta %s", step, self.cfg.max_steps, record["loss"],
                         record["clips_per_s"], _hms(per_step * (self.cfg.max_steps - step)))

    def close(self) -> None:
        self.jsonl.close()
        if self.tb:
            self.tb.close()
        if self.bar:
            self.bar.close()


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _to_device(batch: Any, device: torch.device, float_dtype: Optional[torch.dtype]) -> Any:
    if isinstance(batch, torch.Tensor):
        batch = batch.to(device, non_blocking=True)
        return batch.to(float_dtype) if float_dtype is not None and batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {k: _to_device(v, device, float_dtype) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and any(isinstance(v, (torch.Tensor, dict, list, tuple)) for v in batch):
        return type(batch)(_to_device(v, device, float_dtype) for v in batch)
    return batch


def _float_dtype_of(engine: Any) -> Optional[torch.dtype]:
    """The dtype DeepSpeed keeps the module in under bf16/fp16 (inputs must match it); None for fp32."""
    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return None


def _precision_of(engine: Any) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[_float_dtype_of(engine)]


def _plain_grad_norm(engine: Any) -> Optional[float]:
    """The global gradient norm where DeepSpeed does not report one (no ZeRO, fp32: the gradients are whole and
    already averaged over ranks on the module after the boundary's backward); None elsewhere."""
    if engine.zero_optimization_stage() > 0 or _float_dtype_of(engine) is not None:
        return None
    grads = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
    return _finite_or_none(torch.stack(grads).norm()) if grads else None


def _finite_or_none(value: Any) -> Optional[float]:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


@contextmanager
def _repeatable_off_cuda(device: torch.device):
    """Off CUDA, torch's deterministic algorithms for the run (warning where an op has none), so that the same run
    repeats exactly: on a CPU with several threads, the backward of indexing with repeated indices (stage 2's hard
    negatives) otherwise sums with parallel atomic adds, and the demo's stage 2 drifted from its last run within a
    dozen steps. Uninitialized memory is not filled (torch's default under the setting, which tripled the demo's
    CPU step time). On CUDA the setting is left to the user (the scan's backward sums with atomics regardless)."""
    if device.type == "cuda":
        yield
        return
    import torch.utils.deterministic as memory

    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              memory.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    memory.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        memory.fill_uninitialized_memory = before[2]


def _quiet_deepspeed() -> None:
    """DeepSpeed logs its whole config and every checkpoint file at INFO; keep its warnings and errors."""
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
