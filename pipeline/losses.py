"""Training losses as pure functions of tensors (no model, no teacher, no process group); the objectives in
`pipeline.objectives` put them together.

Alignment (UMT / VideoMamba stage 1): student and teacher tokens are L2-normalized per token; ``mse`` is the squared
distance |s - t|^2 summed over channels (UMT's "l2" loss, = 2 - 2 cos, in [0, 4]) and ``cosine`` is 1 - cos (in
[0, 2]); each is averaged over tokens. The VideoMamba paper's self-distillation loss is the ``mse`` alignment of the
student's projected final features to the frozen guide's.

Video-text (UMT stage 2): the symmetric InfoNCE contrastive loss, ALBEF's hard-negative sampling for video-text
matching, and BERT's masking for masked language modelling (15% with 80/10/10 replacement).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


def visible_targets(teacher_tokens: Tensor, mask: Tensor) -> Tensor:
    """Returns the teacher tokens (B, N, C) of the tokens the student sees (mask False), in the student's order.

    The backbone keeps visible tokens in ascending token index, which is the order boolean indexing gives.
    """
    batch, _, width = teacher_tokens.shape
    return teacher_tokens[~mask.to(teacher_tokens.device)].reshape(batch, -1, width)


def distillation_loss(student_feats: Tensor, teacher_feats: Tensor, head: Optional[nn.Module] = None) -> Tensor:
    """Mean over tokens of |normalize(head(student)) - normalize(teacher)|^2; (B, N, Ds) and (B, N, Dt): the ``mse``
    alignment loss of the projected student features."""
    projected = head(student_feats) if head is not None else student_feats
    if projected.shape != teacher_feats.shape:
        raise ValueError(f"distillation_loss: student features {tuple(projected.shape)} (after the head) and "
                         f"teacher features {tuple(teacher_feats.shape)} differ; pass a DistillHead when widths do")
    return alignment_loss(projected, teacher_feats, "mse")


def contrastive_loss(video: Tensor, text: Tensor, scale: Tensor, video_all: Optional[Tensor] = None,
                     text_all: Optional[Tensor] = None, offset: int = 0) -> Tensor:
    """Symmetric InfoNCE of paired, normalized embeddings (B, E): row i of each side matches row i of the other.
    With `video_all` / `text_all` (every rank's rows, this rank's starting at `offset`) each row is contrasted with
    the whole global batch."""
    video_all = video if video_all is None else video_all
    text_all = text if text_all is None else text_all
    labels = torch.arange(video.shape[0], device=video.device) + offset
    scale = scale.float()  # logits in fp32 also under bf16 training
    return (F.cross_entropy(scale * video.float() @ text_all.float().T, labels)
            + F.cross_entropy(scale * text.float() @ video_all.float().T, labels)) / 2


def hard_negatives(video: Tensor, text: Tensor, generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """For every row, the index of a negative text for its video and of a negative video for its text, drawn with
    probability softmax(similarity) over the other rows (harder negatives more often). Needs B >= 2."""
    with torch.no_grad():
        sim = (video @ text.T).float()
        eye = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
        weights_v2t = sim.masked_fill(eye, float("-inf")).softmax(dim=1)
        weights_t2v = sim.T.masked_fill(eye, float("-inf")).softmax(dim=1)
        neg_text = torch.multinomial(weights_v2t.cpu(), 1, generator=generator).squeeze(1)
        neg_video = torch.multinomial(weights_t2v.cpu(), 1, generator=generator).squeeze(1)
    return neg_text.to(video.device), neg_video.to(video.device)


def mlm_masked(ids: Tensor, pad: Tensor, special: Tensor, mask_id: int, vocab_size: int, prob: float,
               generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor, Tensor]:
    """BERT masking of token ids (B, L): each ordinary token (not padding, not in `special`) is chosen with `prob`
    (at least one in the batch); of the chosen, 80% become [MASK], 10% a random token, 10% stay. Returns the masked
    ids, the chosen (row, column) positions (M, 2) and their original ids (M,)."""
    ordinary = ~pad & ~torch.isin(ids, special)
    draw = torch.rand(ids.shape, generator=generator).to(ids.device)
    chosen = ordinary & (draw < prob)
    if not chosen.any():  # a batch of very short texts: mask one ordinary token so the loss is defined
        first = ordinary.nonzero()[0]
        chosen[first[0], first[1]] = True
    kind = torch.rand(ids.shape, generator=generator).to(ids.device)
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator).to(ids.device)
    masked = torch.where(chosen & (kind < 0.8), torch.full_like(ids, mask_id), ids)
    masked = torch.where(chosen & (kind >= 0.8) & (kind < 0.9), random_ids, masked)
    positions = chosen.nonzero()
    return masked, positions, ids[positions[:, 0], positions[:, 1]]
