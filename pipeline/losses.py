"""Training losses as pure functions of tensors (no model, no teacher, no process group); the objectives in
`pipeline.objectives` put them together.

Alignment (UMT / VideoMamba stage 1): student and teacher tokens are L2-normalized per token; ``mse`` is the squared
distance |s - t|^2 summed over channels (UMT's "l2" loss, = 2 - 2 cos, in [0, 4]) and ``cosine`` is 1 - cos (in
[0, 2]); each is averaged over tokens. The VideoMamba paper's self-distillation loss is the ``mse`` alignment of the
student's projected final features to the frozen guide's.

Video-text (UMT stage 2, as video_mm/models/criterions.py): the symmetric InfoNCE contrastive loss at a learned
temperature with positives by sample identity, ALBEF's hard-negative sampling (softmax of similarity / temperature)
for video-text matching, and BERT's masking for masked language modelling (the official probability 0.5 with
80/10/10 replacement). docs/FIDELITY.md compares them row by row.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.masking import drawn_without_replacement, kept_index

ALIGN_LOSSES = ("mse", "cosine")


def alignment_loss(student_tokens: Tensor, teacher_tokens: Tensor, kind: str = "mse") -> Tensor:
    """Returns the mean over tokens of the distance between L2-normalized student and teacher tokens (B, N, C).

    `kind` "mse": |s - t|^2 (= 2 - 2 cos); "cosine": 1 - cos. The teacher side carries no gradient. Computed in
    fp32 whatever the inputs' precision.
    """
    if student_tokens.shape != teacher_tokens.shape:
        raise ValueError(f"alignment_loss: student tokens {tuple(student_tokens.shape)} and teacher tokens "
                         f"{tuple(teacher_tokens.shape)} differ (the projection head maps to the teacher's width)")
    s = F.normalize(student_tokens.float(), dim=-1)
    t = F.normalize(teacher_tokens.detach().float(), dim=-1)
    if kind == "mse":
        return (s - t).square().sum(-1).mean()
    if kind == "cosine":
        return (1.0 - (s * t).sum(-1)).mean()
    raise ValueError(f"alignment loss kind {kind!r} is not one of {', '.join(ALIGN_LOSSES)}")


def visible_targets(teacher_tokens: Tensor, mask: Tensor, count: int) -> Tensor:
    """Returns the teacher tokens (B, count, C) of the `count` tokens per row the student sees (mask False), in the
    student's order: the backbone keeps visible tokens in ascending token index."""
    index = kept_index(mask.to(teacher_tokens.device), count)
    return teacher_tokens.gather(1, index[..., None].expand(-1, -1, teacher_tokens.shape[-1]))


def distillation_loss(student_feats: Tensor, teacher_feats: Tensor, head: Optional[nn.Module] = None) -> Tensor:
    """Mean over tokens of |normalize(head(student)) - normalize(teacher)|^2; (B, N, Ds) and (B, N, Dt): the ``mse``
    alignment loss of the projected student features."""
    projected = head(student_feats) if head is not None else student_feats
    if projected.shape != teacher_feats.shape:
        raise ValueError(f"distillation_loss: student features {tuple(projected.shape)} (after the head) and "
                         f"teacher features {tuple(teacher_feats.shape)} differ; pass a DistillHead when widths do")
    return alignment_loss(projected, teacher_feats, "mse")


def positives(ids: Optional[Tensor], ids_all: Optional[Tensor], rows: int, columns: int, offset: int,
              device: torch.device) -> Tensor:
    """(rows, columns) contrastive targets: 1 where a row's sample and a column's sample are the same (by `ids`, the
    samples' identities, e.g. hashed keys), normalized per row, as the official `get_mask(idx, normalize=True)`
    (video_mm/models/criterions.py); without ids, row i matches column offset + i only."""
    if ids is None:
        eye = torch.zeros(rows, columns, device=device)
        eye[torch.arange(rows), torch.arange(rows) + offset] = 1.0
        return eye
    same = (ids.view(-1, 1) == ids_all.view(1, -1)).float().to(device)
    return same / same.sum(1, keepdim=True)


def contrastive_loss(video: Tensor, text: Tensor, temp: Tensor, video_all: Optional[Tensor] = None,
                     text_all: Optional[Tensor] = None, offset: int = 0, ids: Optional[Tensor] = None,
                     ids_all: Optional[Tensor] = None) -> Tensor:
    """Symmetric InfoNCE of paired embeddings (B, E) at temperature `temp` (logits = similarity / temp): each row is
    contrasted with `video_all` / `text_all` (every rank's rows, this rank's starting at `offset`; default: this
    rank's), and its positives are the columns of the same sample (`ids` / `ids_all`, see `positives`), the official
    VTC (criterions.py vtc_loss). Logits in fp32 also under bf16 training."""
    video_all = video if video_all is None else video_all
    text_all = text if text_all is None else text_all
    ids_all = ids if ids_all is None else ids_all
    targets = positives(ids, ids_all, video.shape[0], text_all.shape[0], offset, video.device)
    temp = temp.float()
    v2t = (video.float() @ text_all.float().T / temp).log_softmax(dim=1)
    t2v = (text.float() @ video_all.float().T / temp).log_softmax(dim=1)
    return (-(v2t * targets).sum(1).mean() - (t2v * targets).sum(1).mean()) / 2


def hard_negatives(video: Tensor, text: Tensor, temp: Tensor, ids: Optional[Tensor] = None,
                   generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """For every row, the index of a negative text for its video and of a negative video for its text, drawn with
    probability softmax(similarity / temp) over the rows of other samples (harder negatives more often; the official
    vtm_loss with vtm_hard_neg). A row with no other sample in the batch draws uniformly. Needs B >= 2."""
    with torch.no_grad():
        sim = (video.float() @ text.float().T) / temp.float()
        rows = torch.arange(sim.shape[0], device=sim.device)
        same = rows[:, None] == rows[None, :] if ids is None else ids.view(-1, 1).to(sim.device) == ids.view(1, -1)
        weights_v2t = sim.softmax(dim=1).masked_fill(same, 0.0)
        weights_t2v = sim.T.softmax(dim=1).masked_fill(same, 0.0)
        uniform = (~torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)).float()
        # drawn where the similarities are (the official draws on the GPU too, torch.multinomial), with no round
        # trip to the host
        neg_text, neg_video = (drawn_without_replacement(torch.where(w.sum(1, keepdim=True) > 0, w, uniform), 1,
                                                         generator=generator).squeeze(1)
                               for w in (weights_v2t, weights_t2v))
    return neg_text, neg_video


def mlm_masked(ids: Tensor, maskable: Tensor, mask_id: int, vocab_size: int, prob: float,
               generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor, Tensor]:
    """BERT masking of token ids (B, L) as the official MLMLoss.mask (video_mm/models/criterions.py): each `maskable`
    token (the official: all but [PAD] and [CLS]) is chosen with `prob` (at least one in the batch); of the chosen,
    80% become [MASK], half the rest (10%) a random id of the whole vocabulary, the others stay. Returns the masked
    ids, the chosen (row, column) positions (M, 2) and their original ids (M,)."""
    draw = torch.rand(ids.shape, generator=generator).to(ids.device)
    chosen = maskable & (draw < prob)
    if not chosen.any():  # a batch of very short texts: mask one token so the loss is defined
        first = maskable.nonzero()[0]
        chosen[first[0], first[1]] = True
    replaced = chosen & (torch.rand(ids.shape, generator=generator).to(ids.device) < 0.8)
    randomized = chosen & ~replaced & (torch.rand(ids.shape, generator=generator).to(ids.device) < 0.5)
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator).to(ids.device)
    masked = torch.where(replaced, torch.full_like(ids, mask_id), ids)
    masked = torch.where(randomized, random_ids, masked)
    positions = chosen.nonzero()
    return masked, positions, ids[positions[:, 0], positions[:, 1]]
