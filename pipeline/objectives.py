"""The objectives of the training stages: `loss_fn(model, batch) -> (loss, parts)` for the engine. They own what
a loss needs beyond the model's output: the frozen teacher's forward, the masks, the text tokens, the gathering of
embeddings over ranks; the losses themselves are the pure functions of `pipeline.losses`.

Stage 1 (masked alignment, UMT / VideoMamba): the student's visible tokens, through a projection head (LayerNorm +
Linear to the teacher's width), are pulled onto the frozen CLIP teacher's features of the same patches; optionally,
the VideoMamba paper's self-distillation adds `distill.weight` times `pipeline.losses.distillation_loss`.

Stage 2 (joint video-text pretraining, UMT / VideoMamba's video_mm): `VideoTextObjective` adds, with weights, the
video-text contrastive loss (VTC, symmetric InfoNCE over the global batch at the model's learned temperature:
embeddings and sample identities are gathered from every rank, samples with the same key are positives), video-text
matching on hard negatives (VTM: for every pair one negative text and one negative video of another sample drawn by
softmax(similarity / temperature)), masked language modelling through the fusion layers (MLM: BERT's masking with
the official probability 0.5; [PAD] and [CLS] never chosen) and stage 1's alignment of the visible tokens.
"""
from __future__ import annotations

import zlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.engine import dist
from pipeline.losses import (alignment_loss, contrastive_loss, distillation_loss, hard_negatives, mlm_masked,
                             visible_targets)
from pipeline.masking import ATTENTION_KINDS, build_mask
from pipeline.models.distill import FrozenGuide


def grid_of(video: Tensor, grid: tuple[int, int, int]) -> tuple[int, int, int]:
    """The token grid of a batch `video` (B, 3, T, H, W): the configured `grid`, or (1, h, w) for 1-frame images
    (data.mix=batch; tubelets of one frame, which the stages' config checks require then)."""
    return (1, *grid[1:]) if video.shape[2] == 1 else grid


class MaskedAlignment:
    """The stage-1 objective, `loss_fn(model, batch) -> (loss, parts)` for the engine.

    Per batch: the frozen teacher encodes every frame (under no_grad, outside the trained module); a mask of
    `mask_kind` hides `mask_ratio` of the student's tokens (the attention-guided one from the teacher's [cls]
    attention); the student (`model(video, mask)` -> projected visible tokens, distillation features or None) is
    aligned to the teacher's tokens of the patches it sees, and with `cls_target` its [cls] to the teacher's [CLS]
    averaged over the frames (the official recipe: video_sm/models/clip.py with clip_return_cls; the student then
    returns its [cls] first). Masks come from torch's global RNG, which the engine seeds per rank and checkpoints, so
    a resumed run draws the same masks.
    """

    def __init__(self, teacher: nn.Module, grid: tuple[int, int, int], mask_kind: str, mask_ratio: float,
                 loss_kind: str = "mse", tubelet: int = 1, guide: Optional[FrozenGuide] = None,
                 distill_weight: float = 1.0, cls_target: bool = True):
        self.teacher, self.grid, self.tubelet, self.cls_target = teacher, grid, tubelet, cls_target
        self.mask_kind, self.mask_ratio, self.loss_kind = mask_kind, mask_ratio, loss_kind
        self.guide, self.distill_weight = guide, distill_weight

    def __call__(self, model, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        video = batch["video"]
        targets, attention = self.teacher_targets(video)
        mask = build_mask(self.mask_kind, self.mask_ratio, grid_of(video, self.grid), video.shape[0],
                          attention=attention)
        mask = moved(mask, video.device)
        aligned, distilled = model(video, mask)
        align = alignment_loss(aligned, self.visible(targets, mask, aligned.shape[1]), self.loss_kind)
        parts = {"align": align.detach()}
        loss = align
        if self.guide is not None:
            self.guide.to(device=video.device, dtype=video.dtype)  # bf16/fp16 batches: the guide runs in kind
            distill = distillation_loss(distilled, self.guide(video, mask=mask))
            parts["distill"] = distill.detach()
            loss = loss + self.distill_weight * distill
        return loss, parts

    def visible(self, targets: Tensor, mask: Optional[Tensor], count: int) -> Tensor:
        """The targets of what the student sees, `count` per row (the student's aligned tokens): its visible
        tokens' (and [cls]'s, first, with cls_target)."""
        if mask is None:
            return targets
        if self.cls_target:
            mask = torch.cat([mask.new_zeros(mask.shape[0], 1), mask], dim=1)
        return visible_targets(targets, mask, count)

    @torch.no_grad()
    def teacher_targets(self, video: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """Returns the teacher's targets (B, [1 +] T'*h*w, C) of a clip (B, 3, T, H, W): with cls_target its [CLS]
        averaged over the frames first, then the patch tokens; and its [cls] attention (B, T'*h*w) when the mask
        needs it. With tubelets of several frames, tokens and attention are averaged over a tubelet's frames."""
        batch, _, frames, height, width = video.shape
        self.teacher.to(device=video.device, dtype=video.dtype)
        features = self.teacher(video.transpose(1, 2).reshape(batch * frames, 3, height, width),
                                with_attention=self.mask_kind in ATTENTION_KINDS)
        t = frames // self.tubelet
        tokens = features.tokens.reshape(batch, t, self.tubelet, -1, features.tokens.shape[-1]).mean(2)
        attention = features.cls_attention
        if attention is not None:
            attention = attention.reshape(batch, t, self.tubelet, -1).mean(2).reshape(batch, -1)
        tokens = tokens.reshape(batch, -1, tokens.shape[-1])
        if self.cls_target:
            tokens = torch.cat([features.cls.reshape(batch, frames, -1).mean(1, keepdim=True), tokens], dim=1)
        return tokens, attention


# ------------------------------------------------------------------------------------------------ stage 2
def sample_ids(keys: list[str], device: torch.device) -> Tensor:
    """Stable int64 identities of samples (CRC-32 of their keys): the official VTC's `idx`."""
    return moved(torch.tensor([zlib.crc32(k.encode()) for k in keys], dtype=torch.long), device)


def moved(t: Tensor, device: torch.device) -> Tensor:
    """`t` (made on the host) on `device`. To a GPU it goes from pinned memory without blocking: a copy from ordinary
    host memory first waits for everything queued on the GPU (CUDA's rule for pageable copies), and made after the
    teacher's forward was queued, it would hold the host until that forward ends."""
    if t.device.type != "cpu" or torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def gathered_embeddings(video: Tensor, text: Tensor, ids: Optional[Tensor] = None
                        ) -> tuple[Tensor, Tensor, Optional[Tensor], int]:
    """Every rank's video and text embeddings (rank order, gradients flowing back to each rank's own), their sample
    identities, and this rank's offset in them, so the contrastive loss sees the global batch as UMT's does. With one
    process, or when the ranks' batch sizes differ this step (a short last batch), this rank's own rows and offset
    0."""
    if dist.world_size() == 1:
        return video, text, ids, 0
    sizes = dist.gather_no_grad(torch.tensor([video.shape[0]], device=video.device))
    if bool((sizes != sizes[0]).any()):
        return video, text, ids, 0
    return (dist.all_gather_with_grad(video), dist.all_gather_with_grad(text), dist.gather_no_grad(ids),
            dist.rank() * video.shape[0])


class VideoTextObjective:
    """The stage-2 objective, `loss_fn(model, batch) -> (loss, parts)` for the engine; `model` is the
    `pipeline.models.video_text.VideoTextModel` (or the DeepSpeed engine around it).

    Texts are tokenized here (`tokenizer`: the BERT tokenizer, `max_len` ids, padded). Masks and MLM draws come from
    torch's global RNG, which the engine seeds per rank and checkpoints. `alignment` (stage 1's MaskedAlignment with
    its teacher) is None when the alignment weight is 0; then masks are drawn without a teacher (the attention
    masks need one)."""

    def __init__(self, tokenizer, max_len: int, grid: tuple[int, int, int], mask_kind: str, mask_ratio: float,
                 weights: dict[str, float], mlm_prob: float = 0.5, alignment: Optional[MaskedAlignment] = None,
                 image_ratio: Optional[float] = None):
        self.tokenizer, self.max_len = tokenizer, max_len
        self.grid, self.mask_kind, self.mask_ratio, self.image_ratio = grid, mask_kind, mask_ratio, image_ratio
        self.weights, self.mlm_prob, self.alignment = weights, mlm_prob, alignment

    def ratio_of(self, batch: dict) -> float:
        """The mask ratio of `batch`: `image_ratio` for a batch of images only (the loader's "images_only"; whole
        image batches come from data.mix=batch; the official image_mask_ratio), else `mask_ratio`."""
        if self.image_ratio is not None and batch.get("images_only", False):
            return self.image_ratio
        return self.mask_ratio

    def __call__(self, model, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        video = batch["video"]
        tokens = self.tokenizer(batch["text"], self.max_len)
        ids, attention_mask = moved(tokens.ids, video.device), moved(tokens.attention_mask, video.device)
        keys = sample_ids(batch["key"], video.device) if "key" in batch else None
        net = getattr(model, "module", model)  # the heads below run outside the engine's forward
        targets, attention = None, None
        if self.alignment is not None:
            targets, attention = self.alignment.teacher_targets(video)
        mask, ratio = None, self.ratio_of(batch)
        if ratio > 0:
            mask = build_mask(self.mask_kind, ratio, grid_of(video, self.grid), video.shape[0], attention=attention)
            mask = moved(mask, video.device)
        masked = positions = labels = None
        if self.weights.get("mlm", 0) > 0:  # drawn on the host, where the ids are made: no wait for the GPU
            maskable = tokens.attention_mask.bool() & (tokens.ids != self.tokenizer.cls_token_id)
            masked, positions, labels = (moved(t, video.device) for t in mlm_masked(
                tokens.ids, maskable, self.tokenizer.mask_token_id, net.text_encoder.vocab_size, self.mlm_prob))
        out = model(video, mask, ids, attention_mask, masked)
        video_all, text_all, keys_all, offset = gathered_embeddings(out.video_embed, out.text_embed, keys)
        parts: dict[str, Tensor] = {"vtc": contrastive_loss(out.video_embed, out.text_embed, out.temp, video_all,
                                                            text_all, offset, keys, keys_all)}
        rows = []  # (text states, text mask, video tokens) for one pass of the fusion layers: VTM's, then MLM's
        if self.weights.get("vtm", 0) > 0 and video.shape[0] >= 2:
            rows.append(self._matching_rows(out, attention_mask, keys))
        matching = rows[0][0].shape[0] if rows else 0
        if masked is not None:
            rows.append((out.masked_hidden, attention_mask, out.video_tokens))
        if rows:
            text, text_mask, video_rows = (torch.cat(part) for part in zip(*rows))
            match, words = net.fused_heads(text, text_mask, video_rows, matching, positions)
            if matching:
                parts["vtm"] = F.cross_entropy(match.float(), matching_labels(video.shape[0], match.device))
            if words is not None:
                parts["mlm"] = F.cross_entropy(words.float(), labels)
        if self.alignment is not None:
            seen = self.alignment.visible(targets, mask, out.aligned.shape[1])
            parts["align"] = alignment_loss(out.aligned, seen, self.alignment.loss_kind)
        loss = sum(self.weights.get(name, 0.0) * value for name, value in parts.items())
        return loss, {name: value.detach() for name, value in parts.items()}

    @staticmethod
    def _matching_rows(out, attention_mask: Tensor, keys: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """The matching head's 3B rows (text states, text mask, video tokens) on hard negatives, the B positive pairs
        first (criterions.py vtm_loss: [video, negative video, video] x [text, text, negative text], labels 1 then
        0, 0)."""
        neg_text, neg_video = hard_negatives(out.video_embed, out.text_embed, out.temp.detach(), keys)
        text = torch.cat([out.text_hidden, out.text_hidden, out.text_hidden[neg_text]])
        text_mask = torch.cat([attention_mask, attention_mask, attention_mask[neg_text]])
        video = torch.cat([out.video_tokens, out.video_tokens[neg_video], out.video_tokens])
        return text, text_mask, video


def matching_labels(batch: int, device: torch.device) -> Tensor:
    """The matching head's targets for `_matching_rows`: 1 ("matches") for the B positive pairs, 0 for the 2B hard
    negatives."""
    labels = torch.zeros(3 * batch, dtype=torch.long, device=device)  # made there: no copy from the host
    labels[:batch] = 1
    return labels
