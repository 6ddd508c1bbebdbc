"""One flat bf16 gradient tensor per parameter group for DeepSpeed's BF16_Optimizer (`train.grad_accum_dtype=fp32`).

BF16_Optimizer keeps the fp32 gradients in one flat tensor per parameter group, but it reads the bf16 ones a
parameter at a time. After every backward it folds them in with a cast and an add per parameter (`update_hp_grads`).
At every step it takes the gradient norm with one norm per parameter (`get_grads_for_norm`), then asks the host
whether the norm is finite. For VideoMamba-M with BERT that is about 800 parameters. The result is some 3,000 small
kernels a step, each launched from Python, and the GPU waits on the host for most of them (bench/RESULTS.md, issue 23).

`flatten_bf16_grads(optimizer)` gives each parameter's `.grad` the fp32 buffer's layout, as a view of one flat bf16
tensor per group (autograd adds into a `.grad` that exists, in place). The fold is then one add per group, the norm
one norm per group, and zeroing one fill per group. The numbers are the same:
- the fold adds the same values. Parameters without a gradient add zeros, where DeepSpeed skipped them; their fp32
  gradients are zero either way, and the optimizer steps the whole flat partition regardless.
- the norm is the same up to the order of its sum, so clipping (`train.clip_grad`) scales by the same factor to
  within a rounding.

A `.grad` that something else replaced (e.g. `module.zero_grad(set_to_none=True)`) is copied into the flat tensor at
the next fold and the view put back. So nothing is lost, only that parameter's speed-up for that fold. It applies only
where DeepSpeed's layout is the one assumed: one process group without model or expert parallelism, gradients
folded after backward (not DeepSpeed's `immediate_grad_update` hooks), and parameters laid out in order in the flat
bf16 tensor. Otherwise nothing changes and the reason is logged.
"""
from __future__ import annotations

import logging
import types
from typing import Any, Optional

import torch

log = logging.getLogger(__name__)


def flatten_bf16_grads(optimizer: Any) -> bool:
    """Gives `optimizer`, if it is DeepSpeed's BF16_Optimizer, flat bf16 gradients, in place; whether it did."""
    try:
        from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    except ImportError:
        return False
    if not isinstance(optimizer, BF16_Optimizer):
        return False
    why = _unsupported(optimizer)
    if why is not None:
        log.info("BF16_Optimizer's gradients stay one tensor per parameter: %s", why)
        return False
    views = []
    for i, group in enumerate(optimizer.bf16_groups):
        flat = torch.zeros_like(optimizer.bf16_groups_flat[i])
        group_views = []
        for p, hp_grad in zip(group, optimizer.fp32_groups_gradients[i]):
            view = flat.narrow(0, _offset_in(p, optimizer.bf16_groups_flat[i]), p.numel()).view_as(p)
            if p.grad is not None:
                view.copy_(p.grad)
            p.grad = view
            p._hp_grad = hp_grad  # what DeepSpeed's own fold sets (read by its pipeline engine)
            group_views.append(view)
        views.append((flat, group_views))
    optimizer._flat_bf16_grads = views
    optimizer.update_hp_grads = types.MethodType(_update_hp_grads, optimizer)
    optimizer.clear_lp_grads = types.MethodType(_clear_lp_grads, optimizer)
    optimizer.get_grads_for_norm = types.MethodType(_get_grads_for_norm, optimizer)
    return True


def _unsupported(optimizer: Any) -> Optional[str]:
    """Why DeepSpeed's layout is not the one assumed, or None."""
    if getattr(optimizer, "immediate_grad_update", True):
        return "DeepSpeed folds each gradient in a hook as it is made (immediate_grad_update)"
    if optimizer.mpu is not None or optimizer.has_moe_layers or getattr(optimizer, "_uses_muon", False) \
            or getattr(optimizer, "autoep_folding_tp_group", None) is not None:
        return "model, expert or tensor parallelism (or Muon) reads gradients per parameter"
    for i, group in enumerate(optimizer.bf16_groups):
        offset = 0
        for p in group:
            if p.dtype != optimizer.bf16_groups_flat[i].dtype or not p.is_contiguous() \
                    or _offset_in(p, optimizer.bf16_groups_flat[i]) != offset:
                return f"group {i}'s parameters are not laid out in order in its flat bf16 tensor"
            offset += p.numel()
        if optimizer.fp32_groups_gradients_flat[i].numel() != optimizer.bf16_groups_flat[i].numel():
            return f"group {i}'s fp32 gradients are not laid out as its bf16 parameters"
    return None


def _offset_in(p: torch.Tensor, flat: torch.Tensor) -> int:
    """The element offset of `p`'s storage in `flat`'s, or -1 when `p` does not live in `flat`."""
    if p.untyped_storage().data_ptr() != flat.untyped_storage().data_ptr():
        return -1
    return p.storage_offset() - flat.storage_offset()


def _restored_views(optimizer: Any) -> None:
    """Puts back a view that something replaced, keeping the gradient it held."""
    for (flat, group_views), group in zip(optimizer._flat_bf16_grads, optimizer.bf16_groups):
        for p, view in zip(group, group_views):
            if p.grad is not view:
                if p.grad is None:
                    view.zero_()
                else:
                    view.copy_(p.grad)
                p.grad = view


@torch.no_grad()
def _update_hp_grads(self: Any, clear_lp_grads: bool = False) -> None:
    """DeepSpeed's fold (BF16_Optimizer.update_hp_grads): the bf16 gradients added into the fp32 ones."""
    _restored_views(self)
    for i, (flat, group_views) in enumerate(self._flat_bf16_grads):
        self.fp32_groups_gradients_flat[i].add_(flat)
        self.fp32_groups_has_gradients[i] = [True] * len(group_views)
        if clear_lp_grads:
            flat.zero_()


@torch.no_grad()
def _clear_lp_grads(self: Any, set_to_none: bool = False) -> None:
    """Zeroes the bf16 gradients. `set_to_none` would drop the views; they are zeroed instead, which sums the same."""
    _restored_views(self)
    for flat, _ in self._flat_bf16_grads:
        flat.zero_()


def _get_grads_for_norm(self: Any, for_clipping: bool = False):
    """DeepSpeed's `get_grads_for_norm`, one tensor per group: the fp32 gradients (their padding is zero)."""
    grads = list(self.fp32_groups_gradients_flat)
    return grads if for_clipping else (grads, {})
