"""Masks: the count per sample, and the structure that makes each kind what it is."""
import pytest
import torch

from pipeline.masking import MASK_KINDS, build_mask, masked_count

GRID = (4, 6, 5)  # T, H, W: H and W differ so that a row/column mix-up shows
B = 8


def _mask(kind, ratio=0.8, grid=GRID, seed=0, attention=None):
    return build_mask(kind, ratio, grid, B, torch.Generator().manual_seed(seed), attention=attention)


def _attention(grid=GRID, seed=1):
    t, h, w = grid
    return torch.rand(B, t * h * w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.8, 0.9])
def test_every_row_masks_the_announced_count_and_keeps_each_frame_visible(kind, ratio):
    """Random masks may hide a whole frame at high ratios (tokens are chosen regardless of frame)."""
    t, h, w = GRID
    mask = _mask(kind, ratio, attention=_attention())
    assert mask.shape == (B, t * h * w) and mask.dtype == torch.bool
    counts = mask.sum(dim=1)
    assert (counts == masked_count(kind, ratio, GRID)).all()
    if kind != "random":
        assert (mask.view(B, t, h * w).sum(-1) < h * w).all(), "a frame lost all its patches"


def test_counts_follow_the_documented_rounding():
    t, h, w = 8, 14, 14  # 224 px, patch 16, 8 frames
    assert masked_count("random", 0.8, (t, h, w)) == round(0.8 * t * h * w)
    assert masked_count("tube", 0.8, (t, h, w)) == t * round(0.8 * h * w)
    assert masked_count("attention", 0.8, (t, h, w)) == t * 157
    assert masked_count("clip_row", 0.8, (t, h, w)) == t * 11 * w
    assert masked_count("frame_row", 0.8, (t, h, w)) == t * 11 * w


def test_random_mask_covers_positions_evenly_and_differs_between_samples():
    t, h, w = GRID
    masks = torch.cat([_mask("random", 0.5, seed=s) for s in range(50)])  # 400 samples
    assert len({tuple(m.tolist()) for m in masks[:B]}) == B
    frequency = masks.float().mean(0)
    assert frequency.min() > 0.35 and frequency.max() < 0.65, "random masking favours some positions"


def test_tube_mask_is_the_same_spatial_mask_in_every_frame():
    t, h, w = GRID
    mask = _mask("tube").view(B, t, h * w)
    assert (mask == mask[:, :1]).all()
    assert len({tuple(m[0].tolist()) for m in mask}) > 1, "every sample got the same tube"


def test_frame_row_mask_drops_whole_rows_chosen_anew_in_each_frame():
    t, h, w = GRID
    mask = _mask("frame_row").view(B, t, h, w)
    rows = mask[..., 0]
    assert (mask == rows[..., None]).all(), "a row is only partly masked"
    assert (rows.sum(-1) == round(0.8 * h)).all()
    per_frame_differs = [(rows[b] != rows[b, :1]).any().item() for b in range(B)]
    assert any(per_frame_differs), "frame-row masked the same rows in every frame of every sample"


def test_clip_row_mask_drops_the_same_whole_rows_in_every_frame():
    t, h, w = GRID
    mask = _mask("clip_row").view(B, t, h, w)
    rows = mask[..., 0]
    assert (mask == rows[..., None]).all(), "a row is only partly masked"
    assert (rows == rows[:, :1]).all(), "clip-row rows differ between frames"
    assert len({tuple(r[0].tolist()) for r in rows}) > 1, "every sample got the same rows"


def test_attention_topk_mask_keeps_each_frames_most_attended_patches():
    t, h, w = GRID
    attention = _attention()
    mask = _mask("attention_topk", 0.8, attention=attention).view(B, t, h * w)
    scores = attention.view(B, t, h * w)
    keep = h * w - round(0.8 * h * w)
    for b in range(B):
        for f in range(t):
            visible = scores[b, f][~mask[b, f]]
            hidden = scores[b, f][mask[b, f]]
            assert visible.numel() == keep
            assert visible.min() > hidden.max()


def test_attention_topk_mask_accepts_frame_shaped_attention_and_ignores_the_generator():
    t, h, w = GRID
    attention = _attention()
    flat = _mask("attention_topk", attention=attention, seed=0)
    framed = _mask("attention_topk", attention=attention.view(B, t, h * w), seed=7)
    assert torch.equal(flat, framed)


def test_attention_mask_samples_patches_in_proportion_to_the_attention():
    """The official rule: visible patches drawn by torch.multinomial(attention) without replacement, so a patch
    with most of the attention is nearly always visible, one with none never, and the draw varies."""
    t, h, w = GRID
    attention = torch.full((B, t, h * w), 1e-3)
    attention[..., 0] = 1.0  # one dominant patch per frame
    attention[..., 1] = 0.0  # one patch nobody attends to
    torch.manual_seed(0)
    masks = torch.stack([_mask("attention", 0.8, attention=attention).view(B, t, h * w) for _ in range(20)])
    assert (~masks[..., 0]).float().mean() > 0.95
    assert masks[..., 1].all()
    assert len({tuple(m.flatten().tolist()) for m in masks}) > 1


def test_same_generator_seed_gives_the_same_mask():
    for kind in ("random", "tube", "frame_row", "clip_row"):
        assert torch.equal(_mask(kind, seed=3), _mask(kind, seed=3))
        assert not torch.equal(_mask(kind, seed=3), _mask(kind, seed=4))


@pytest.mark.parametrize("kind,ratio,attention,message", [
    ("diagonal", 0.8, None, "not one of"),
    ("random", 1.0, None, "must be in"),
    ("clip_row", 0.95, None, "masks all 6 rows"),
    ("attention", 0.8, None, "need the teacher"),
    ("attention", 0.8, torch.rand(B, 7), "does not match"),
])
def test_bad_arguments_are_named(kind, ratio, attention, message):
    with pytest.raises(ValueError, match=message):
        build_mask(kind, ratio, GRID, B, torch.Generator().manual_seed(0), attention=attention)


@pytest.mark.parametrize("kind", ["random", "tube", "frame_row"])
def test_kept_index_is_what_boolean_indexing_keeps(kind):
    from pipeline.masking import kept_index

    mask = build_mask(kind, 0.75, (4, 4, 4), 3, generator=torch.Generator().manual_seed(1))
    tokens = torch.arange(3 * 64).view(3, 64)
    count = int((~mask[0]).sum())
    assert torch.equal(tokens.gather(1, kept_index(mask, count)), tokens[~mask].view(3, count))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the CUDA generator's draws need a GPU"))])
@pytest.mark.parametrize("shape,count", [((32, 196), 39), ((8, 8), 1), ((64, 196), 40)])
def test_drawn_without_replacement_is_torch_multinomial_without_its_host_checks(device, shape, count):
    """The same indices from the same RNG state, and the same state after (the masks and hard negatives of a run
    drawn before this change are drawn again)."""
    from pipeline.masking import drawn_without_replacement

    for seed in range(3):
        weights = torch.rand(shape, generator=torch.Generator().manual_seed(100 + seed)).to(device)
        weights[0, 0] = 0.0  # never drawn
        ours, torch_own = (torch.Generator(device).manual_seed(seed) for _ in range(2))
        drawn = drawn_without_replacement(weights, count, generator=ours)
        assert torch.equal(drawn, torch.multinomial(weights, count, generator=torch_own))
        assert torch.equal(torch.rand(4, generator=ours, device=device),
                           torch.rand(4, generator=torch_own, device=device))
        assert drawn.shape == (shape[0], count) and 0 not in drawn[0].tolist()
        assert all(len(set(row.tolist())) == count for row in drawn)
