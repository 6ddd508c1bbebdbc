"""A tiny model, loss and resumable data stream for the engine tests; also a script the tests start as a process.

    python tests/engine/engine_toy.py RUN_DIR [--max-steps N] [--ckpt-every K] [--resume auto] [--die-publishing STEP] ...

`--die-publishing STEP` makes the process SIGKILL itself while checkpoint STEP is being published (every file of it
written, its manifest not yet), the worst moment for a crash. Under torchrun each rank reads its slice of the data.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Optional

import torch

if __package__ in (None, ""):  # run as a script: make `pipeline` importable
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from pipeline.config import DeepSpeedConfig, TrainConfig  # noqa: E402

DIM = 8


class ToyData:
    """Endless stream of regression batches. Sample i is drawn from a generator seeded with (seed, i); global batch g
    holds samples [g*B*w, (g+1)*B*w) and rank r of w gets rows [r*B, (r+1)*B) of it, so every split of an optimizer
    step's samples over micro-batches and ranks (batch B, accumulation A, world w with B*A*w fixed) sees the same set.
    Batches listed in `nan_batches` (global indices) carry NaN inputs. Position = the next global batch index."""

    slow_s = 0.0  # a pause per batch, so that a test can kill a run between two steps

    def __init__(self, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 7,
                 nan_batches: tuple[int, ...] = (), limit: Optional[int] = None):
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.nan_batches = set(nan_batches)
        self.limit = limit  # the stream ends after this many batches (None: never)
        self.index = 0
        self.loaded_state: Optional[dict] = None

    def __iter__(self):
        while self.limit is None or self.index < self.limit:
            # the position moves before the yield: state_dict() between batches names the next one
            self.index += 1
            time.sleep(self.slow_s)
            yield self._batch(self.index - 1)

    def _batch(self, index: int) -> dict:
        first = index * self.batch_size * self.world_size + self.rank * self.batch_size
        x, y = zip(*(self._sample(first + i) for i in range(self.batch_size)))
        x, y = torch.stack(x), torch.stack(y)
        if index in self.nan_batches:
            x = torch.full_like(x, float("nan"))
        return {"x": x, "y": y, "key": [f"s{first + i}" for i in range(self.batch_size)]}

    def _sample(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + i)
        x = torch.randn(DIM, generator=g)
        return x, x[:1] - x[1:2] + 0.1 * torch.randn(1, generator=g)

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.loaded_state = dict(state)
        self.index = state["index"]

    def stats(self) -> dict:
        return {"odd_batches": (self.index + 1) // 2}


class ToyMLP(torch.nn.Module):
    def __init__(self, hidden: int = 16, dropout: float = 0.2):
        super().__init__()
        self.pos_embed = torch.nn.Parameter(torch.zeros(1, DIM))
        self.fc1 = torch.nn.Linear(DIM, hidden)
        self.drop = torch.nn.Dropout(dropout)
        self.norm = torch.nn.LayerNorm(hidden)
        self.fc2 = torch.nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.drop(torch.nn.functional.gelu(self.fc1(x + self.pos_embed)))))


class ToyBlock(torch.nn.Module):
    """(hidden, residual or None) -> (hidden, residual), the call convention of a VideoMamba block."""

    def __init__(self, hidden: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(hidden)
        self.fc = torch.nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor, residual: Optional[torch.Tensor]):
        residual = h if residual is None else residual + h
        return self.fc(torch.nn.functional.gelu(self.norm(residual))), residual


class ToyChain(torch.nn.Module):
    """A stem, a chain of ToyBlocks and a head: the shape of model whose blocks `train.cuda_graphs` replays."""

    def __init__(self, hidden: int = 16, depth: int = 3):
        super().__init__()
        self.stem = torch.nn.Linear(DIM, hidden)
        self.blocks = torch.nn.ModuleList(ToyBlock(hidden) for _ in range(depth))
        self.head = torch.nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, residual = self.stem(x), None
        for block in self.blocks:
            h, residual = block(h, residual)
        return self.head(h + residual)


def mse_loss(model, batch: dict):
    """loss_fn of the contract: the engine calls it with the DeepSpeed engine and a batch already on its device."""
    assert isinstance(batch["key"][0], str)  # non-tensor values pass through untouched
    pred = model(batch["x"]).float()
    loss = torch.nn.functional.mse_loss(pred, batch["y"].float())
    return loss, {"mae": float((pred.detach() - batch["y"].float()).abs().mean())}


def train_config(**overrides) -> TrainConfig:
    base = dict(max_steps=8, batch_size=4, grad_accum=2, lr=2e-2, min_lr=1e-3, warmup_steps=2, weight_decay=0.1,
                clip_grad=1.0, ckpt_every=3, keep_last=2, log_every=1, seed=11, progress=False, tensorboard=False)
    base.update(overrides)
    return TrainConfig(**base)


def build(run_dir: str, rank: int = 0, world_size: int = 1, dropout: float = 0.2, nan_batches=(), zero_stage: int = 0,
          limit: Optional[int] = None, chain: bool = False, evaluate=None, **overrides):
    """Returns a Trainer over a freshly initialised ToyMLP, or with `chain` a ToyChain whose blocks are the
    Trainer's "backbone" chain (same weights for the same seed, on every rank)."""
    from pipeline.engine import Trainer

    torch.manual_seed(0)
    cfg = train_config(**overrides)
    data = ToyData(cfg.batch_size, rank=rank, world_size=world_size, nan_batches=tuple(nan_batches),
                    limit=limit)
    model = ToyChain() if chain else ToyMLP(dropout=dropout)
    return Trainer(model, mse_loss, data, cfg, DeepSpeedConfig(zero_stage=zero_stage), run_dir,
                   graph_chains={"backbone": model.blocks} if chain else None, evaluate=evaluate)


def gather_check() -> dict:
    """all_gather_with_grad on this rank: the gathered rows and whether the gradient reaching `x` is the sum over
    ranks of each rank's loss gradient (every rank computes the same loss here, so world_size * weights)."""
    from pipeline.engine import dist

    r, w = dist.rank(), dist.world_size()
    x = torch.full((2, 3), float(r + 1), requires_grad=True)
    y = dist.all_gather_with_grad(x)
    weights = torch.arange(y.numel(), dtype=torch.float32).reshape(y.shape)
    (y * weights).sum().backward()
    return {"rank": r, "rows": y[:, 0].tolist(), "grad_ok": torch.equal(x.grad, w * weights[2 * r:2 * r + 2]),
            "no_grad_rows": dist.gather_no_grad(x)[:, 0].tolist()}


def losses(run_dir: str) -> list[float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("--max-steps", type=int, default=8)
    p.add_argument("--ckpt-every", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--zero-stage", type=int, default=0)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--grad-accum-dtype", default=None)
    p.add_argument("--resume", default=None)
    p.add_argument("--die-publishing", type=int, default=None)
    p.add_argument("--slow-s", type=float, default=0.0)
    p.add_argument("--check-gather", action="store_true")
    args = p.parse_args(argv)
    from pipeline.engine import checkpoint, dist

    if args.die_publishing is not None:
        real_publish = checkpoint.publish

        def publish_then_die(temp_dir, step, world_size):
            if step == args.die_publishing:
                os.kill(os.getpid(), signal.SIGKILL)
            return real_publish(temp_dir, step, world_size)

        checkpoint.publish = publish_then_die
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    trainer = build(args.run_dir, rank=rank, world_size=world, dropout=args.dropout, zero_stage=args.zero_stage,
                    max_steps=args.max_steps, ckpt_every=args.ckpt_every, batch_size=args.batch_size,
                    grad_accum=args.grad_accum, precision=args.precision, grad_accum_dtype=args.grad_accum_dtype)
    trainer.data.slow_s = args.slow_s
    summary = trainer.fit(resume=args.resume)
    if args.check_gather:  # one file per rank: lines printed by two processes may interleave
        with open(os.path.join(args.run_dir, f"gather_rank{dist.rank()}.json"), "w") as f:
            json.dump(gather_check(), f)
    if dist.rank() == 0:
        print("SUMMARY", json.dumps({"step": summary.step, "start_step": summary.start_step}), flush=True)
    del trainer
    dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
