"""The losses as pure functions: alignment values and gradients, target selection, contrastive loss, hard negatives
and MLM masking."""

import pytest
import torch

from pipeline.losses import alignment_loss, visible_targets


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
    picked = visible_targets(tokens, mask, 3)
    assert picked.shape == (2, 3, 3)
    assert picked[..., 0].tolist() == [[1, 3, 4], [6, 10, 11]]


# ------------------------------------------------------------------------------------------------ stage 2
def test_contrastive_loss_is_low_for_matching_pairs_and_high_for_shuffled_ones():
    from pipeline.losses import contrastive_loss
    emb = torch.nn.functional.normalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    temp = torch.tensor([0.02])
    assert contrastive_loss(emb, emb, temp) < 0.05
    assert contrastive_loss(emb, emb.roll(1, dims=0), temp) > 5.0


def test_contrastive_loss_is_the_official_vtc_with_positives_by_sample():
    """criterions.py vtc_loss: logits sim / temp, targets get_mask(idx, normalize=True), rows of the same sample
    (idx) are all positives."""
    from pipeline.losses import contrastive_loss
    g = torch.Generator().manual_seed(5)
    video = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    idx = torch.tensor([0, 1, 1, 2, 3, 3])
    temp = torch.tensor([0.07])
    targets = (idx[:, None] == idx[None, :]).float()
    targets = targets / targets.sum(1, keepdim=True)
    sim = video @ text.T / temp
    official = (-(sim.log_softmax(1) * targets).sum(1).mean() - (sim.T.log_softmax(1) * targets).sum(1).mean()) / 2
    assert torch.allclose(contrastive_loss(video, text, temp, ids=idx), official, atol=1e-6)
    assert not torch.allclose(contrastive_loss(video, text, temp), official)  # without ids: row i only


def test_hard_negatives_never_pick_the_same_sample_and_prefer_the_most_similar():
    from pipeline.losses import hard_negatives
    g = torch.Generator().manual_seed(0)
    video = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    text = video.clone()
    text[1] = video[0] * 0.999 + 0.001 * video[1]  # text 1 is nearly video 0's text: the hard negative of video 0
    temp = torch.tensor([0.1])
    picks = torch.stack([hard_negatives(video, text, temp, generator=g)[0] for _ in range(200)])
    assert not (picks == torch.arange(6)).any()
    assert (picks[:, 0] == 1).float().mean() > 0.5
    ids = torch.tensor([7, 7, 8, 9, 10, 11])  # rows 0 and 1 are the same sample: never each other's negative
    picks = torch.stack([hard_negatives(video, text, temp, ids, generator=g)[0] for _ in range(200)])
    assert not (picks[:, 0] == 1).any() and not (picks[:, 1] == 0).any() and not (picks == torch.arange(6)).any()
    every = torch.tensor([5, 5, 5, 5, 5, 5])  # one sample: no other row to draw from, so uniformly over the others
    picks = torch.stack([torch.stack(hard_negatives(video, text, temp, every, generator=g)) for _ in range(200)])
    assert not (picks == torch.arange(6)).any() and set(picks[:, 0, 0].tolist()) == {1, 2, 3, 4, 5}


def test_mlm_masking_is_the_officials_and_returns_the_originals():
    """criterions.py MLMLoss.mask: [PAD] and [CLS] never chosen ([SEP] may be), chosen with prob; 80% [MASK], 10%
    random ids, 10% kept."""
    from pipeline.losses import mlm_masked
    ids = torch.tensor([[2, 10, 11, 12, 13, 3, 0, 0], [2, 20, 3, 0, 0, 0, 0, 0]])
    maskable = (ids != 0) & (ids != 2)
    masked, positions, labels = mlm_masked(ids, maskable, mask_id=4, vocab_size=50, prob=0.5,
                                           generator=torch.Generator().manual_seed(1))
    assert len(positions) >= 1
    chosen = torch.zeros_like(maskable)
    chosen[positions[:, 0], positions[:, 1]] = True
    assert not (chosen & ~maskable).any()
    assert torch.equal(labels, ids[positions[:, 0], positions[:, 1]])
    assert torch.equal(masked[~chosen], ids[~chosen])
    # a batch of texts too short to draw from still gets one masked token
    _, positions, _ = mlm_masked(ids[1:], maskable[1:], 4, 50, prob=0.0)
    assert positions.tolist() == [[0, 1]]
    # the proportions over many draws: half the maskable tokens chosen, of those 80/10/10
    big = torch.randint(5, 1000, (400, 32))
    masked, positions, labels = mlm_masked(big, torch.ones_like(big, dtype=torch.bool), 4, 1000, prob=0.5,
                                           generator=torch.Generator().manual_seed(2))
    after = masked[positions[:, 0], positions[:, 1]]
    assert abs(len(positions) / big.numel() - 0.5) < 0.01
    assert abs((after == 4).float().mean() - 0.8) < 0.01
    assert abs((after == labels).float().mean() - 0.1) < 0.01


def test_contrastive_loss_over_gathered_rows_averages_to_the_whole_batch_loss():
    """Two ranks' losses over the gathered batch (each with its offset) average to the one-process loss on it."""
    from pipeline.losses import contrastive_loss
    g = torch.Generator().manual_seed(3)
    video = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=-1)
    temp = torch.tensor([0.1])
    ids = torch.arange(8) // 2  # pairs of rows share a sample
    ranks = [contrastive_loss(video[r * 4:(r + 1) * 4], text[r * 4:(r + 1) * 4], temp, video, text, offset=r * 4,
                              ids=ids[r * 4:(r + 1) * 4], ids_all=ids) for r in range(2)]
    assert torch.allclose((ranks[0] + ranks[1]) / 2, contrastive_loss(video, text, temp, ids=ids), atol=1e-6)
    assert not torch.allclose(ranks[0], contrastive_loss(video[:4], text[:4], temp, ids=ids[:4]))
