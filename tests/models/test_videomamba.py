"""VideoMamba: official layout and sizes, shapes, masking, token orders, intermediate layers, checkpointing, bf16."""
import math

import pytest
import torch

from pipeline.models import build_videomamba
from tests.models.official_layout import official_state_shapes

TINY = dict(depth=2, embed_dim=64)


# the model zoo's rounded counts (videomamba/image_sm/MODEL_ZOO.md: Ti 7M, S 26M, M 74M)
@pytest.mark.parametrize("size,depth,width,published_millions", [("tiny", 24, 192, 7), ("small", 24, 384, 26),
                                                                  ("middle", 32, 576, 74)])
def test_sizes_have_the_official_layout_and_parameter_count(size, depth, width, published_millions):
    with torch.device("meta"):
        model = build_videomamba(size, num_frames=8, img_size=224, num_classes=1000)
    expected = official_state_shapes(depth, width)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    count = sum(p.numel() for p in model.parameters())
    assert count == sum(math.prod(s) for s in expected.values())
    assert round(count / 1e6) == published_millions


@pytest.mark.parametrize("frames,size,tubelet", [(1, 32, 1), (4, 32, 1), (4, 48, 2), (3, 64, 1)])
def test_output_shapes(frames, size, tubelet):
    model = build_videomamba("tiny", num_frames=frames, img_size=size, tubelet_size=tubelet, **TINY)
    out = model.forward_features(torch.randn(2, 3, frames, size, size), return_layers=[0])
    t, h, w = model.patch_grid
    assert (t, h, w) == (frames // tubelet, size // 16, size // 16)
    assert out.cls.shape == (2, 64) and out.tokens.shape == (2, t * h * w, 64)
    assert [l.shape for l in out.layers] == [(2, 1 + t * h * w, 64)]
    assert torch.isfinite(out.tokens).all()


def test_head_and_last_layer_output():
    model = build_videomamba("tiny", num_frames=2, img_size=32, num_classes=5, **TINY).eval()
    x = torch.randn(2, 3, 2, 32, 32)
    out = model.forward_features(x, return_layers=[-1])
    assert torch.equal(out.layers[0][:, 0], out.cls) and torch.equal(out.layers[0][:, 1:], out.tokens)
    assert torch.allclose(model(x), model.head(out.cls))
    with pytest.raises(ValueError, match="block 2 does not exist"):
        model.forward_features(x, return_layers=[2])


def manual_forward(model, x, order_keys=None, visible=None):
    """Reference: embed, keep the `visible` tokens, sort them by `order_keys`, run the blocks and norm_f; returns
    ([cls], tokens in the order processed, the canonical index of each processed token)."""
    tokens = model.patch_embed(x)
    B, D, T, H, W = tokens.shape
    tokens = tokens.flatten(3).permute(0, 2, 3, 1) + model.pos_embed[:, None, 1:] + \
        model.temporal_pos_embedding[:, :, None]
    tokens = tokens.reshape(B, T * H * W, D)
    index = visible if visible is not None else torch.arange(T * H * W).expand(B, -1)
    if order_keys is not None:
        index = index.gather(1, order_keys[index].argsort(dim=1))
    seq = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(B, -1, -1),
                     tokens.gather(1, index[..., None].expand(-1, -1, D))], dim=1)
    hidden, residual = seq, None
    for block in model.layers:
        hidden, residual = block(hidden, residual)
    out = model.norm_f(residual + hidden)
    return out[:, 0], out[:, 1:], index


def test_temporal_first_order_runs_blocks_over_frames_first():
    model = build_videomamba("tiny", num_frames=4, img_size=32, token_order="temporal_first", **TINY).eval()
    x = torch.randn(2, 3, 4, 32, 32)
    T, H, W = model.patch_grid
    keys = torch.arange(T * H * W).reshape(T, H * W).t().reshape(-1).argsort()  # slot of each canonical token
    cls, processed, index = manual_forward(model, x, order_keys=keys)
    out = model.forward_features(x)
    expected = torch.empty_like(processed).scatter_(1, index[..., None].expand(-1, -1, 64), processed)
    assert torch.allclose(out.cls, cls, atol=1e-5) and torch.allclose(out.tokens, expected, atol=1e-5)
    spatial = build_videomamba("tiny", num_frames=4, img_size=32, **TINY).eval()
    spatial.load_state_dict(model.state_dict())
    assert not torch.allclose(spatial.forward_features(x).tokens, out.tokens, atol=1e-3)


@pytest.mark.parametrize("order", ["spatial_first", "temporal_first", "st_interleave", "ts_interleave"])
def test_masked_forward_runs_only_the_visible_tokens(order):
    model = build_videomamba("tiny", num_frames=4, img_size=32, token_order=order, depth=3, embed_dim=32).eval()
    x = torch.randn(2, 3, 4, 32, 32)
    mask = torch.rand(2, 16).argsort(dim=1) < 10  # 10 of 16 dropped, different per row
    out = model.forward_features(x, mask=mask, return_layers=[1])
    assert out.tokens.shape == (2, 6, 32) and out.layers[0].shape == (2, 7, 32)
    # each row alone gives the same: rows do not interact
    alone = model.forward_features(x[1:], mask=mask[1:])
    assert torch.allclose(alone.tokens, out.tokens[1:], atol=1e-5)
    # the visible tokens, laid out as a shorter sequence (in the block order), are all that the blocks see
    if order in ("spatial_first", "temporal_first"):
        T, H, W = model.patch_grid
        keys = torch.arange(T * H * W).reshape(T, H * W).t().reshape(-1).argsort() if order == "temporal_first" \
            else None
        visible = (~mask).nonzero()[:, 1].reshape(2, -1)
        cls, processed, index = manual_forward(model, x, order_keys=keys, visible=visible)
        canonical = processed.gather(1, index.argsort(dim=1)[..., None].expand(-1, -1, 32))
        assert torch.allclose(out.cls, cls, atol=1e-5) and torch.allclose(out.tokens, canonical, atol=1e-5)


def test_masked_forward_equals_full_forward_where_it_must():
    model = build_videomamba("tiny", num_frames=4, img_size=32, **TINY).eval()
    x = torch.randn(2, 3, 4, 32, 32)
    keep_all = torch.zeros(2, 16, dtype=torch.bool)
    assert torch.allclose(model.forward_features(x, mask=keep_all).tokens, model.forward_features(x).tokens)
    # with the mixers' outputs at zero, every token only sees itself: masked == full restricted to the kept ones
    with torch.no_grad():
        for block in model.layers:
            block.mixer.out_proj.weight.zero_()
    mask = torch.rand(2, 16).argsort(dim=1) < 12
    full = model.forward_features(x).tokens
    masked = model.forward_features(x, mask=mask).tokens
    assert torch.allclose(masked, full[~mask].reshape(2, 4, 64), atol=1e-6)


def test_mask_errors():
    model = build_videomamba("tiny", num_frames=2, img_size=32, **TINY)
    x = torch.randn(2, 3, 2, 32, 32)
    uneven = torch.zeros(2, 8, dtype=torch.bool)
    uneven[0, 0] = True
    with pytest.raises(ValueError, match="different number"):
        model.forward_features(x, mask=uneven)
    with pytest.raises(ValueError, match="shape"):
        model.forward_features(x, mask=torch.zeros(2, 9, dtype=torch.bool))


def test_activation_checkpointing_gives_the_same_outputs_and_gradients():
    torch.manual_seed(1)
    plain = build_videomamba("tiny", num_frames=2, img_size=32, **TINY)
    ckpt = build_videomamba("tiny", num_frames=2, img_size=32, checkpoint_blocks=2, **TINY)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 2, 32, 32)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[:, :3] = True
    probe = torch.randn(plain.embed_dim)  # the tokens come normed: their plain mean square hardly depends on anything
    losses = [(m.forward_features(x, mask=mask).tokens @ probe).square().mean() for m in (plain, ckpt)]
    for loss in losses:
        loss.backward()
    assert torch.allclose(losses[0], losses[1])
    assert plain.layers[0].mixer.in_proj.weight.grad.abs().max() > 1e-3  # gradients reach the checkpointed blocks
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), name


def test_bf16_autocast_runs_and_stays_close_to_fp32():
    model = build_videomamba("tiny", num_frames=2, img_size=32, **TINY).eval()
    x = torch.randn(2, 3, 2, 32, 32)
    ref = model.forward_features(x).tokens
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.forward_features(x).tokens
    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref).norm() / ref.norm()) < 0.05
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.train()
        model.forward_features(x).tokens.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_bf16_weights_with_fp32_residual_run():
    """DeepSpeed's bf16 casts the module itself; the fp32 residual stream must meet bf16 norms and mixers."""
    model = build_videomamba("tiny", num_frames=2, img_size=32, residual_in_fp32=True, **TINY)
    x = torch.randn(2, 3, 2, 32, 32)
    ref = model.forward_features(x).cls
    out = model.to(torch.bfloat16).forward_features(x.to(torch.bfloat16)).cls
    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref).norm() / ref.norm()) < 0.05
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_input_of_another_grid_interpolates_position_embeddings():
    model = build_videomamba("tiny", num_frames=4, img_size=32, **TINY).eval()
    out = model.forward_features(torch.randn(1, 3, 2, 64, 64))
    assert out.tokens.shape == (1, 2 * 4 * 4, 64)


def test_one_frame_is_an_image_without_the_temporal_embedding():
    """The official use_image path (T == 1): a 1-frame input to a model built for several frames gets no temporal
    position embedding; clips of several frames do, and so does a model built for one frame."""
    torch.manual_seed(0)
    model = build_videomamba("tiny", num_frames=4, img_size=32, **TINY).eval()
    image, clip = torch.randn(2, 3, 1, 32, 32), torch.randn(2, 3, 4, 32, 32)
    before = model.forward_features(image).tokens, model.forward_features(clip).tokens
    with torch.no_grad():
        model.temporal_pos_embedding.normal_(std=1.0)
    after = model.forward_features(image).tokens, model.forward_features(clip).tokens
    assert torch.equal(before[0], after[0]) and not torch.allclose(before[1], after[1])
    assert model.is_image(1) and not model.is_image(4)
    single = build_videomamba("tiny", num_frames=1, img_size=32, **TINY).eval()
    assert not single.is_image(1)
    out = single.forward_features(image).tokens
    with torch.no_grad():
        single.temporal_pos_embedding.normal_(std=1.0)
    assert not torch.allclose(out, single.forward_features(image).tokens)


def test_drop_path_is_active_in_training_only():
    model = build_videomamba("tiny", num_frames=2, img_size=32, drop_path_rate=0.9, **TINY)
    x = torch.randn(4, 3, 2, 32, 32)
    model.eval()
    assert torch.equal(model.forward_features(x).tokens, model.forward_features(x).tokens)
    model.train()
    assert not torch.equal(model.forward_features(x).tokens, model.forward_features(x).tokens)


@pytest.mark.parametrize("size, rate", [("tiny", 0.1), ("middle", 0.4)])
def test_model_size_from_the_command_line_brings_its_drop_path_rate(size, rate):
    from pipeline.config import AlignStageConfig, load_config
    from pipeline.models import build_from_config

    repo = __import__("pathlib").Path(__file__).resolve().parents[2]
    cfg = load_config(AlignStageConfig, str(repo / "configs" / "stage1_align.yaml"),
                      [f"model.size={size}", "model.depth=2", "model.embed_dim=32"])
    assert build_from_config(cfg.model, num_frames=2, img_size=32).drop_path.p == rate
    cfg.model.drop_path_rate = 0.0  # an explicit rate wins
    assert build_from_config(cfg.model, num_frames=2, img_size=32).drop_path.p == 0.0
