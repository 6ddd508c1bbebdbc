"""AdamW with decoupled weight decay off for norms, biases and embeddings, and a step that can be skipped.

DeepSpeed wraps the optimizer we hand it (ZeRO partitions its parameter groups, bf16 keeps fp32 master weights) and
ends in this optimizer's `step()`: once, or once per parameter group (ZeRO 1/2), or not at all when its own overflow
check already skipped the update. So the trainer's NaN/inf `skip` policy holds `skipping` on around exactly one
`engine.step()`: every `step()` call inside it is a no-op, under every ZeRO stage and precision alike, weights and
Adam moments stay untouched, and nothing is left over for the next update.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, Sequence

import torch

# Parameter names (or name parts) that never get weight decay, besides every parameter of ndim <= 1.
NO_DECAY_NAMES = ("pos_embed", "cls_token", "temporal_pos_embedding", "embedding")


class SkippableAdamW(torch.optim.AdamW):
    """torch AdamW whose `step()` does nothing inside `skipped(True)`."""

    skipping: bool = False

    @contextmanager
    def skipped(self, skip: bool) -> Iterator[None]:
        """With skip, every `step()` inside the block is a no-op; the flag is off again after it, whatever happens."""
        self.skipping = skip
        try:
            yield
        finally:
            self.skipping = False

    @torch.no_grad()
    def step(self, closure=None):
        if self.skipping:
            return None
        return super().step(closure)


def decays(name: str, param: torch.Tensor, no_decay_names: Sequence[str] = NO_DECAY_NAMES) -> bool:
    """True if weight decay applies: matrices and kernels, not biases, norm scales, embeddings or tokens."""
    return param.ndim > 1 and not any(key in name for key in no_decay_names)


def param_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    """Returns two AdamW groups (decay / no decay) over the trainable parameters; empty groups are left out."""
    decay, no_decay = [], []
    for name, p in named_params:
        if p.requires_grad:
            (decay if decays(name, p) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas: Sequence[float],
                    eps: float = 1e-8) -> SkippableAdamW:
    """Returns the AdamW that DeepSpeed wraps (a plain torch optimizer: no fused/CPU-Adam build is needed)."""
    if len(betas) != 2:
        raise ValueError(f"train.betas needs two values, got {list(betas)}")
    return SkippableAdamW(param_groups(model.named_parameters(), weight_decay), lr=lr, betas=tuple(betas), eps=eps)
