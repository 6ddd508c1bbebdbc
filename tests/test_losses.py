"""Stage-1 losses: alignment values and gradients, target selection, and the whole objective learning on synthetic
clips with a real tiny open_clip teacher and a real tiny VideoMamba student."""

import numpy as np
import pytest
import torch

from pipeline.losses import MaskedAlignment, alignment_loss, visible_targets
from pipeline.models import build_videomamba
from pipeline.models.distill import FrozenGuide
from pipeline.models.heads import AlignmentHead
from pipeline.models.teacher import ClipTeacher
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


def test_alignment_loss_values_are_those_of_normalized_vectors():
    s = torch.randn(2, 5, 8)
    assert alignment_loss(s, s).item() == pytest.approx(0.0, abs=1e-6)
    assert alignment_loss(s, 3.0 * s).item() == pytest.approx(0.0, abs=1e-6), "not scale invariant"
    assert alignment_loss(s, -s).item() == pytest.approx(4.0)
    assert alignment_loss(s, -s, "cosine").item() == pytest.approx(2.0)
    t = torch.randn(2, 5, 8)
    cos = torch.nn.functional.cosine_similarity(s, t, dim=-1)
    assert alignment_loss(s, t, "mse").item() == pytest.approx((2 - 2 * cos).mean().item(), rel=1e-5)
    assert alignment_loss(s, t, "cosine").item() == pytest.approx((1 - cos).mean().item(), rel=1e-5)


def test_alignment_loss_sends_gradient_to_the_student_only():
    s = torch.randn(2, 3, 4, requires_grad=True)
    t = torch.randn(2, 3, 4, requires_grad=True)
    alignment_loss(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_alignment_loss_rejects_mismatched_shapes_and_kinds():
    with pytest.raises(ValueError, match="differ"):
        alignment_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="not one of"):
        alignment_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4), "l1")


def test_visible_targets_are_the_unmasked_tokens_in_ascending_order():
    tokens = torch.arange(2 * 6).float().view(2, 6, 1).expand(2, 6, 3)
    mask = torch.tensor([[True, False, True, False, False, True], [False, True, True, True, False, False]])
    picked = visible_targets(tokens, mask)
    assert picked.shape == (2, 3, 3)
    assert picked[..., 0].tolist() == [[1, 3, 4], [6, 10, 11]]


def test_head_maps_student_width_to_teacher_width():
    head = AlignmentHead(32, 40)
    assert head(torch.randn(2, 7, 32)).shape == (2, 7, 40)


@pytest.mark.parametrize("kind,ratio", [("clip_row", 0.5), ("attention", 0.75), ("random", 0.8)])
def test_objective_aligns_the_visible_tokens_to_the_teachers(teacher, clips, kind, ratio):
    student = _student(teacher.width)
    objective = MaskedAlignment(teacher, student.backbone.patch_grid, kind, ratio)
    loss, parts = objective(student, {"video": clips[:2]})
    targets, _ = objective.teacher_targets(clips[:2])
    assert targets.shape == (2, 4 * 2 * 2, teacher.width)
    assert parts["align"] == pytest.approx(loss.item())
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
    torch.testing.assert_close(targets[0, :4], per_frame[:2].mean(0))
    loss, _ = objective(student, {"video": clips[:2]})
    assert torch.isfinite(loss)


def test_distillation_adds_its_weighted_term(teacher, clips):
    torch.manual_seed(2)
    guide = FrozenGuide(build_videomamba("tiny", num_frames=4, img_size=32, depth=1, embed_dim=24,
                                         scan_backend="torch"))
    student = _student(teacher.width, guide_dim=guide.embed_dim)
    objective = MaskedAlignment(teacher, student.backbone.patch_grid, "tube", 0.5, guide=guide, distill_weight=0.5)
    loss, parts = objective(student, {"video": clips[:2]})
    assert loss.item() == pytest.approx(parts["align"] + 0.5 * parts["distill"], rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in student.distill_head.parameters())
    assert all(p.grad is None for p in guide.parameters())


# ------------------------------------------------------------------------------------------------ stage 2
def test_contrastive_loss_is_low_for_matching_pairs_and_high_for_shuffled_ones():
    from pipeline.losses import contrastive_loss
    emb = torch.nn.functional.normalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    scale = torch.tensor(50.0)
    assert contrastive_loss(emb, emb, scale) < 0.05
    assert contrastive_loss(emb, emb.roll(1, dims=0), scale) > 5.0


def test_hard_negatives_never_pick_the_pair_itself_and_prefer_the_most_similar():
    from pipeline.losses import hard_negatives
    g = torch.Generator().manual_seed(0)
    video = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    text = video.clone()
    text[1] = video[0] * 0.999 + 0.001 * video[1]  # text 1 is nearly video 0's text: the hard negative of video 0
    picks = torch.stack([hard_negatives(video * 10, text, generator=g)[0] for _ in range(200)])
    assert not (picks == torch.arange(6)).any()
    assert (picks[:, 0] == 1).float().mean() > 0.5


def test_mlm_masking_keeps_special_tokens_and_padding_and_returns_the_originals():
    from pipeline.losses import mlm_masked
    ids = torch.tensor([[5, 10, 11, 12, 13, 6, 0, 0], [5, 20, 6, 0, 0, 0, 0, 0]])
    pad = ids == 0
    special = torch.tensor([5, 6])
    masked, positions, labels = mlm_masked(ids, pad, special, mask_id=99, vocab_size=50, prob=0.5,
                                           generator=torch.Generator().manual_seed(1))
    assert len(positions) >= 1
    chosen = torch.zeros_like(pad)
    chosen[positions[:, 0], positions[:, 1]] = True
    assert not (chosen & (pad | torch.isin(ids, special))).any()
    assert torch.equal(labels, ids[positions[:, 0], positions[:, 1]])
    assert torch.equal(masked[~chosen], ids[~chosen])
    # a batch of texts too short to draw from still gets one masked token
    _, positions, _ = mlm_masked(ids[1:], pad[1:], special, 99, 50, prob=0.0)
    assert positions.tolist() == [[0, 1]]


def test_contrastive_loss_over_gathered_rows_averages_to_the_whole_batch_loss():
    """Two ranks' losses over the gathered batch (each with its offset) average to the one-process loss on it."""
    from pipeline.losses import contrastive_loss
    g = torch.Generator().manual_seed(3)
    video = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1)
    scale = torch.tensor(10.0)
    ranks = [contrastive_loss(video[r * 4:(r + 1) * 4], text[r * 4:(r + 1) * 4], scale, video, text, offset=r * 4)
             for r in range(2)]
    assert torch.allclose((ranks[0] + ranks[1]) / 2, contrastive_loss(video, text, scale), atol=1e-6)
    assert not torch.allclose(ranks[0], contrastive_loss(video[:4], text[:4], scale))  # more negatives than local
