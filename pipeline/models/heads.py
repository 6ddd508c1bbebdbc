"""The student's alignment heads: its projection onto the teacher's feature space, trained in stage 1 and carried
into stage 2 for the unmasked-token alignment. Both take the backbone's output and the mask it ran with and return the
aligned tokens ([cls] first with `with_cls`), which the loss L2-normalizes (pipeline.losses.alignment_loss).

- `ClipDecoder` (`model.align_head: clip_decoder`, the default): the official one. Linear(width -> teacher width) ->
  LayerNorm over the un-normed stream entering the last block plus a fixed sinusoid position table
  (OpenGVLab/VideoMamba videomamba/video_sm/models/videomamba_pretrain.py `Linear_Decoder`, `clip_pos_embed` and
  VisionMamba.forward; the same in video_mm/models/backbones/videomamba/videomamba.py PretrainVideoMamba). Its
  parameters are the official `clip_decoder.0.{head,norm}.*`, so a released checkpoint's decoder loads into it.
- `AlignmentHead` (`model.align_head: norm_linear`): LayerNorm -> Linear over the final-normed tokens (what the project
  used before; UMT's ViT students read their final tokens, this does the same on VideoMamba).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from pipeline.masking import kept_index
from pipeline.models.videomamba import VideoMambaOutput

HEAD_KINDS = ("clip_decoder", "norm_linear")


def sinusoid_table(positions: int, width: int) -> Tensor:
    """(positions, width) fp32: position p, channel j -> sin(p / 10000^(2*(j//2)/width)) for even j, cos for odd
    (videomamba_pretrain.py get_sinusoid_encoding_table, computed in float64 as its numpy code, then float32)."""
    position = torch.arange(positions, dtype=torch.float64)[:, None]
    pair = torch.div(torch.arange(width, dtype=torch.float64), 2, rounding_mode="floor")[None]  # j // 2
    angle = position / torch.pow(torch.tensor(10000.0, dtype=torch.float64), 2 * pair / width)
    table = torch.empty_like(angle)
    table[:, 0::2] = torch.sin(angle[:, 0::2])
    table[:, 1::2] = torch.cos(angle[:, 1::2])
    return table.float()


class ClipDecoder(nn.Module):
    """The official alignment decoder (see the module docstring): `head` Linear(student_dim, teacher_dim) and `norm`
    LayerNorm(teacher_dim), initialised as the official Linear_Decoder (xavier-uniform weight, zero bias; LayerNorm
    1 / 0). `forward(out, mask, with_cls)` reads `out.stream` (the stream entering the last block, with [cls] at
    position 0 and the patch tokens at 1 + their spatial-first index) and adds the sinusoid table's rows of the
    tokens it holds, as the official forward does (`clip_pos_embed[~mask]`, the always-visible [cls] included)."""

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        self.head = nn.Linear(student_dim, teacher_dim)
        self.norm = nn.LayerNorm(teacher_dim)
        nn.init.xavier_uniform_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self._table: Optional[Tensor] = None  # not a buffer: the official table is no parameter and not saved

    def positions(self, count: int, width: int, device) -> Tensor:
        """The sinusoid table of `count` positions ([cls] + every patch token of the clip's grid)."""
        if self._table is None or self._table.shape != (count, width) or self._table.device != torch.device(device):
            self._table = sinusoid_table(count, width).to(device)
        return self._table

    def forward(self, out: VideoMambaOutput, mask: Optional[Tensor], with_cls: bool = True) -> Tensor:
        stream = out.stream
        batch, tokens, width = stream.shape
        table = self.positions((mask.shape[1] if mask is not None else tokens - 1) + 1, width, stream.device)
        if mask is None:
            pos = table[None].expand(batch, -1, -1)
        else:  # the rows of the tokens the backbone kept: [cls] (always) and the visible patches, ascending
            dropped = torch.cat([mask.new_zeros(batch, 1), mask], dim=1).to(stream.device)
            pos = table[kept_index(dropped, tokens)]
        x = stream + pos.to(stream.dtype)
        if not with_cls:
            x = x[:, 1:]
        return self.norm(self.head(x.to(self.head.weight.dtype)))


class AlignmentHead(nn.Module):
    """LayerNorm + Linear over the final-normed tokens (`model.align_head: norm_linear`)."""

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(student_dim)
        self.proj = nn.Linear(student_dim, teacher_dim)

    def forward(self, out: VideoMambaOutput, mask: Optional[Tensor] = None, with_cls: bool = True) -> Tensor:
        tokens = torch.cat([out.cls[:, None], out.tokens], dim=1) if with_cls else out.tokens
        return self.proj(self.norm(tokens))


def build_alignment_head(kind: str, student_dim: int, teacher_dim: int) -> nn.Module:
    """The alignment head `kind` names ("clip_decoder" | "norm_linear")."""
    if kind == "clip_decoder":
        return ClipDecoder(student_dim, teacher_dim)
    if kind == "norm_linear":
        return AlignmentHead(student_dim, teacher_dim)
    raise ValueError(f"alignment head {kind!r} is not one of {', '.join(HEAD_KINDS)}")
