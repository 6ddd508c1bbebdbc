"""The stage-1 objective: the whole masked alignment learning on synthetic clips with a real tiny open_clip teacher
and a real tiny VideoMamba student, its tubelets and its self-distillation term."""

import numpy as np
import pytest
import torch

from pipeline.models import build_videomamba
from pipeline.models.distill import FrozenGuide
from pipeline.models.heads import AlignmentHead, ClipDecoder
from pipeline.models.teacher import ClipTeacher
from pipeline.objectives import MaskedAlignment
from pipeline.stages.align import AlignStudent
from tests.conftest import tiny_clip

TEACHER = "test-losses-vit"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return ClipTeacher(tiny_clip(tmp_path_factory.mktemp("cfg"), TEACHER, embed_dim=40).visual, TEACHER)


@pytest.fixture(scope="module")
def clips():
    """Eight synthetic clips (moving shapes), CLIP-normalized (8, 3, 4, 32, 32)."""
    from pipeline.data.transforms import CLIP_MEAN, CLIP_STD
    from shards.synth import render, video_combinations

    rng = np.random.default_rng(0)
    combos = video_combinations(False)
    pixels = np.stack([render(combos[i * 37], 32, 4, rng) for i in range(8)])  # (8, T, H, W, 3)
    x = torch.from_numpy(pixels).float().permute(0, 4, 1, 2, 3) / 255.0
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1, 1)


def _student(teacher_dim, guide_dim=None, tubelet=1):
    torch.manual_seed(1)
    backbone = build_videomamba("tiny", num_frames=4, img_size=32, depth=2, embed_dim=32, tubelet_size=tubelet,
                                scan_backend="torch")
    return AlignStudent(backbone, teacher_dim, guide_dim)


@pytest.mark.parametrize("kind,head_type", [("clip_decoder", ClipDecoder), ("norm_linear", AlignmentHead)])
def test_the_student_head_maps_student_width_to_teacher_width(kind, head_type):
    """The official clip_decoder by default; the earlier LayerNorm + Linear head as model.align_head=norm_linear."""
    backbone = build_videomamba("tiny", num_frames=4, img_size=32, depth=2, embed_dim=32, scan_backend="torch")
    student = AlignStudent(backbone, 40, align_head=kind)
    assert type(student.align_head) is head_type
    assert type(AlignStudent(backbone, 40).align_head) is ClipDecoder
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, ::2] = True
    aligned, _ = student(torch.randn(2, 3, 4, 32, 32), mask)
    assert aligned.shape == (2, 1 + 8, 40)


@pytest.mark.parametrize("kind,ratio", [("clip_row", 0.5), ("attention", 0.75), ("random", 0.8)])
def test_objective_aligns_the_visible_tokens_to_the_teachers(teacher, clips, kind, ratio):
    student = _student(teacher.width)
    objective = MaskedAlignment(teacher, student.backbone.patch_grid, kind, ratio)
    loss, parts = objective(student, {"video": clips[:2]})
    targets, _ = objective.teacher_targets(clips[:2])
    assert targets.shape == (2, 1 + 4 * 2 * 2, teacher.width)  # the frame-averaged [CLS] first
    assert float(parts["align"]) == pytest.approx(loss.item())
    loss.backward()
    assert all(p.grad is not None for p in student.align_head.parameters())
    assert all(p.grad is None for p in teacher.parameters())



def test_objective_loss_falls_on_synthetic_clips(teacher, clips, one_thread):
    """Item 8: a tiny student learns the teacher's patch features of clips it sees a quarter of (random masks)."""
    student = _student(teacher.width)
    objective = MaskedAlignment(teacher, student.backbone.patch_grid, "random", 0.75)
    optimizer = torch.optim.AdamW(student.parameters(), lr=2e-3)
    torch.manual_seed(0)
    losses = []
    for step in range(40):
        batch = clips[torch.randperm(8)[:4]]
        loss, _ = objective(student, {"video": batch})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.7 * first, (first, last)


def test_tubelets_average_the_teachers_frames(teacher, clips):
    student = _student(teacher.width, tubelet=2)
    objective = MaskedAlignment(teacher, student.backbone.patch_grid, "tube", 0.5, tubelet=2)
    targets, _ = objective.teacher_targets(clips[:1])
    frames = clips[:1].transpose(1, 2).reshape(4, 3, 32, 32)
    per_frame = teacher(frames).tokens  # (4, 4, C)
    torch.testing.assert_close(targets[0, 1:5], per_frame[:2].mean(0))
    loss, _ = objective(student, {"video": clips[:2]})
    assert torch.isfinite(loss)


def test_distillation_adds_its_weighted_term(teacher, clips):
    torch.manual_seed(2)
    guide = FrozenGuide(build_videomamba("tiny", num_frames=4, img_size=32, depth=1, embed_dim=24,
                                         scan_backend="torch"))
    student = _student(teacher.width, guide_dim=guide.embed_dim)
    objective = MaskedAlignment(teacher, student.backbone.patch_grid, "tube", 0.5, guide=guide, distill_weight=0.5)
    loss, parts = objective(student, {"video": clips[:2]})
    assert loss.item() == pytest.approx(float(parts["align"] + 0.5 * parts["distill"]), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in student.distill_head.parameters())
    assert all(p.grad is None for p in guide.parameters())


def test_the_cls_target_is_the_teachers_cls_averaged_over_the_frames(teacher, clips):
    """The official --clip_return_cls: the teacher's [CLS] of each frame, projected, averaged over the frames, is the
    first target and the student's [cls] (first of its aligned outputs) is pulled onto it; cls_target=False aligns
    the patch tokens only."""
    student = _student(teacher.width)
    objective = MaskedAlignment(teacher, student.backbone.patch_grid, "tube", 0.5)
    targets, _ = objective.teacher_targets(clips[:1])
    frames = clips[:1].transpose(1, 2).reshape(4, 3, 32, 32)
    torch.testing.assert_close(targets[0, 0], teacher(frames).cls.mean(0))
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[:, :8] = True
    assert objective.visible(targets, mask, 1 + 8).shape == (1, 1 + 8, teacher.width)
    aligned, _ = student(clips[:1], mask)
    assert aligned.shape == (1, 1 + 8, teacher.width)
    patches_only = MaskedAlignment(teacher, student.backbone.patch_grid, "tube", 0.5, cls_target=False)
    assert patches_only.teacher_targets(clips[:1])[0].shape == (1, 16, teacher.width)
    student_patches = AlignStudent(student.backbone, teacher.width, align_cls=False)
    assert student_patches(clips[:1], mask)[0].shape == (1, 8, teacher.width)
