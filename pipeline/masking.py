"""Token masks for stage 1: which of the student's patch tokens are dropped (True) and which it sees (False).

Every function returns a bool tensor (B, T*H*W), token index ``t*H*W + h*W + w`` (spatial-first flattening, the
backbone's order), True = masked. Every row has the same number of masked tokens, because the backbone's masked
forward gathers the visible tokens into one dense (B, N_visible, D) tensor.

The kinds (VideoMamba, mask ablation; UMT for the attention-guided mask):

- ``random``: each token independently of its place; exactly ``round(ratio * T*H*W)`` masked.
- ``tube``: one random spatial mask per sample, the same in every frame; ``round(ratio * H*W)`` per frame.
- ``frame_row``: whole rows (a line of W patches) masked, chosen anew in every frame; ``round(ratio * H)`` rows per
  frame.
- ``clip_row``: the same rows masked in every frame; ``round(ratio * H)`` rows.
- ``attention``: UMT / VideoMamba's attention-guided mask: in every frame, ``H*W - round(ratio * H*W)`` patches stay
  visible, drawn without replacement with probability proportional to the teacher's [cls]->patch attention
  (``torch.multinomial``'s draw, made by `drawn_without_replacement`, as video_sm/engines/
  engine_for_pretraining_videomamba.py and video_mm umt_videomamba.py encode_teacher; from torch's global RNG, on
  the attention's device). Needs the teacher's attention.
- ``attention_topk``: the deterministic variant: the most-attended patches of every frame stay visible.

Rounding: the structured kinds mask whole units (a patch per frame, a row per frame), so their actual ratio is the
nearest that whole units allow: with 14 rows and ratio 0.8, 11 rows (78.6%) are masked; with 4 rows, 3 (75%).
`masked_count` gives the exact number per sample for a kind, ratio and grid. The count is the same for every sample
of a batch. At least one token per sample stays visible; for the per-frame kinds, at least one patch of every frame
(one row for the row kinds). A random mask at a high ratio may hide a whole frame.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch

MaskKind = Literal["random", "tube", "frame_row", "clip_row", "attention", "attention_topk"]
MASK_KINDS: tuple[str, ...] = ("random", "tube", "frame_row", "clip_row", "attention", "attention_topk")
ATTENTION_KINDS = ("attention", "attention_topk")  # the kinds that need the teacher's attention


def masked_count(kind: str, ratio: float, grid: tuple[int, int, int]) -> int:
    """Returns how many of the T*H*W tokens of one sample a mask of `kind` and `ratio` drops."""
    t, h, w = grid
    if kind == "random":
        return _units(ratio, t * h * w, "tokens")
    if kind in ("tube",) + ATTENTION_KINDS:
        return t * _units(ratio, h * w, "patches per frame")
    if kind in ("frame_row", "clip_row"):
        return t * w * _units(ratio, h, "rows per frame")
    raise ValueError(f"mask kind {kind!r} is not one of {', '.join(MASK_KINDS)}")


def build_mask(kind: str, ratio: float, grid: tuple[int, int, int], batch: int,
               generator: Optional[torch.Generator] = None, attention: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Returns the bool mask (batch, T*H*W) of `kind`, True = masked; see the module docstring for the kinds.

    `attention` ((batch, T*H*W) or (batch, T, H*W), the teacher's [cls]->patch attention) is needed by the attention
    kinds only; their masks are made on the attention's device (``attention`` draws from torch's global RNG there),
    the others on the CPU (from `generator`).
    """
    masked_count(kind, ratio, grid)  # validates kind and ratio
    t, h, w = grid
    if kind == "random":
        return _random_subset((batch,), t * h * w, _units(ratio, t * h * w, "tokens"), generator)
    if kind == "tube":
        spatial = _random_subset((batch, 1), h * w, _units(ratio, h * w, "patches per frame"), generator)
        return spatial.expand(batch, t, h * w).reshape(batch, t * h * w)
    if kind == "frame_row":
        rows = _random_subset((batch, t), h, _units(ratio, h, "rows per frame"), generator)
        return rows[..., None].expand(batch, t, h, w).reshape(batch, t * h * w)
    if kind == "clip_row":
        rows = _random_subset((batch, 1), h, _units(ratio, h, "rows per frame"), generator)
        return rows[..., None].expand(batch, t, h, w).reshape(batch, t * h * w)
    return attention_mask(attention, ratio, grid, batch, sample=kind == "attention")


def attention_mask(attention: Optional[torch.Tensor], ratio: float, grid: tuple[int, int, int],
                   batch: int, sample: bool = True) -> torch.Tensor:
    """Returns the mask that keeps, per frame, patches drawn in proportion to the [cls] attention (`sample`, the
    official rule) or the most-attended ones, and drops the rest."""
    t, h, w = grid
    if attention is None:
        raise ValueError("the attention mask kinds need the teacher's [cls]->patch attention (attention=None given)")
    if attention.numel() != batch * t * h * w:
        raise ValueError(f"attention of shape {tuple(attention.shape)} does not match batch {batch} and token grid "
                         f"{grid} (expected {batch} x {t * h * w} values)")
    scores = attention.detach().float().reshape(batch, t, h * w)
    keep = h * w - _units(ratio, h * w, "patches per frame")
    if sample:
        kept = drawn_without_replacement(scores.reshape(batch * t, h * w).clamp_min(1e-12), keep
                                         ).reshape(batch, t, keep)
    else:
        kept = scores.topk(keep, dim=-1).indices
    mask = torch.ones(batch, t, h * w, dtype=torch.bool, device=scores.device)
    mask.scatter_(-1, kept, False)
    return mask.reshape(batch, t * h * w)


def drawn_without_replacement(weights: torch.Tensor, count: int,
                              generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """`torch.multinomial(weights, count, generator=generator)`: per row of the (R, N) non-negative `weights`, `count`
    distinct indices drawn in proportion to them. The same indices from the same RNG state, drawn as torch draws them
    (the `count` largest of weights / Exp(1) noise, the Gumbel top-k rule) but without its checks that no weight is
    negative or infinite and no row sums to 0, which read the weights on the host: on a GPU, a wait for everything
    queued before them. Callers pass weights that pass those checks by construction."""
    keys = weights / torch.empty_like(weights).exponential_(generator=generator)
    return keys.argmax(-1, keepdim=True) if count == 1 else keys.topk(count, dim=-1).indices


def kept_index(mask: torch.Tensor, count: int) -> torch.Tensor:
    """(B, count) positions of the kept (False) entries of a (B, N) mask, ascending, for rows that keep `count`
    each. Boolean indexing gives the same rows, but it asks the GPU how many there are and the host waits for the
    answer; a stable sort does not, so the host can go on queueing the step's work while the GPU runs."""
    return mask.to(torch.uint8).argsort(dim=1, stable=True)[:, :count]


def _units(ratio: float, total: int, what: str) -> int:
    """Returns round(ratio * total), checking that at least one of the `total` units stays visible."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    count = round(ratio * total)
    if count >= total:
        raise ValueError(f"mask ratio {ratio} masks all {total} {what}; lower the ratio or use more patches")
    return count


def _random_subset(prefix: tuple[int, ...], n: int, k: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Returns a bool tensor (*prefix, n) with exactly k True entries per row, chosen uniformly at random."""
    scores = torch.rand(*prefix, n, generator=generator)
    chosen = scores.topk(k, dim=-1).indices
    return torch.zeros(*prefix, n, dtype=torch.bool).scatter_(-1, chosen, True)
