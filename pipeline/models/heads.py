"""Heads shared by the stages' trained modules."""
from __future__ import annotations

from torch import Tensor, nn


class AlignmentHead(nn.Module):
    """The student's projection onto the teacher's feature space (UMT's decoder head: LayerNorm + Linear), trained in
    stage 1 and carried into stage 2 for the unmasked-token alignment."""

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(student_dim)
        self.proj = nn.Linear(student_dim, teacher_dim)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.proj(self.norm(tokens))
