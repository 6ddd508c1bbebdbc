"""Self-distillation: a frozen smaller VideoMamba guides a wider student through a loss on final features."""
import pytest
import torch

from pipeline.config import ConfigError, DistillConfig
from pipeline.models import build_videomamba
from pipeline.losses import distillation_loss
from pipeline.models.distill import DistillHead, build_guide, final_features


def test_guide_is_frozen_and_the_loss_trains_the_student_towards_it(tmp_path):
    teacher = build_videomamba("tiny", num_frames=2, img_size=32, depth=1, embed_dim=32)
    path = str(tmp_path / "teacher.pth")
    torch.save({"model": teacher.state_dict()}, path)
    guide = build_guide(DistillConfig(enabled=True, checkpoint=path, depth=1, embed_dim=32), num_frames=2,
                        img_size=32)
    guide.train()
    assert not guide.model.training and not any(p.requires_grad for p in guide.parameters())
    student = build_videomamba("tiny", num_frames=2, img_size=32, depth=2, embed_dim=48)
    head = DistillHead(48, 32)
    opt = torch.optim.Adam(list(student.parameters()) + list(head.parameters()), lr=3e-3)
    x = torch.randn(2, 3, 2, 32, 32)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[:, ::2] = True
    target = guide(x, mask=mask)
    assert target.shape == (2, 5, 32) and not target.requires_grad
    losses = []
    for _ in range(15):
        loss = distillation_loss(final_features(student.forward_features(x, mask=mask)), target, head)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.grad is None for p in guide.parameters())


def test_loss_values_and_width_check():
    t = torch.randn(2, 5, 8)
    assert distillation_loss(t * 3.0, t).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(-t, t).item() == pytest.approx(4.0, rel=1e-5)  # opposite directions: |2 t_hat|^2
    with pytest.raises(ValueError, match="DistillHead"):
        distillation_loss(torch.randn(2, 5, 16), t)


def test_disabled_or_incomplete_config():
    assert build_guide(DistillConfig(enabled=False), num_frames=2, img_size=32) is None
    with pytest.raises(ConfigError, match="distill.checkpoint"):
        build_guide(DistillConfig(enabled=True), num_frames=2, img_size=32)
