"""Official checkpoints: strict loading after wrapper/prefix removal, kernel inflation, position-embedding
interpolation, head handling, errors that name the keys; round trips through fsspec."""
import fsspec
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ModelConfig
from pipeline.models import build_from_config, build_videomamba, load_official_checkpoint

TINY = dict(depth=2, embed_dim=64)


def save(obj, url):
    with fsspec.open(url, "wb") as f:
        torch.save(obj, f)
    return url


def states_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("wrap", ["plain", "model", "module"])
def test_round_trip_is_exact(tmp_path, wrap):
    src = build_videomamba("tiny", num_frames=4, img_size=32, num_classes=3, **TINY)
    sd = src.state_dict()
    obj = {"plain": sd, "model": {"model": sd, "epoch": 3},
           "module": {"module": {"module." + k: v for k, v in sd.items()}}}[wrap]
    dst = build_videomamba("tiny", num_frames=4, img_size=32, num_classes=3, **TINY)
    notes = load_official_checkpoint(dst, save(obj, str(tmp_path / "ckpt.pth")))
    assert notes == [] and states_equal(dst.state_dict(), sd)
    x = torch.randn(1, 3, 4, 32, 32)
    assert torch.equal(src.eval()(x), dst.eval()(x))


def test_other_frame_count_and_resolution_are_interpolated():
    src = build_videomamba("tiny", num_frames=4, img_size=32, **TINY)
    url = save({"model": src.state_dict()}, "memory://vm/ckpt_t4_32.pth")
    dst = build_videomamba("tiny", num_frames=8, img_size=64, **TINY)
    notes = load_official_checkpoint(dst, url)
    assert any("pos_embed: 2x2 -> 4x4" in n for n in notes) and any("4 -> 8" in n for n in notes)
    pos = src.pos_embed.detach()
    grid = pos[:, 1:].reshape(1, 2, 2, 64).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 16, 64)
    assert torch.allclose(dst.pos_embed[:, 1:], want) and torch.equal(dst.pos_embed[:, :1], pos[:, :1])
    temporal = F.interpolate(src.temporal_pos_embedding.detach().permute(0, 2, 1), size=(8,), mode="linear",
                             align_corners=False).permute(0, 2, 1)
    assert torch.allclose(dst.temporal_pos_embedding, temporal)
    assert torch.equal(dst.layers[1].mixer.A_b_log, src.layers[1].mixer.A_b_log)


def test_image_checkpoint_inflates_into_a_video_model(tmp_path):
    """An image model's checkpoint: Conv2d patch kernel, no temporal embedding, a 1000-class head."""
    src = build_videomamba("tiny", num_frames=1, img_size=32, num_classes=10, **TINY)
    sd = {k: v for k, v in src.state_dict().items() if k != "temporal_pos_embedding"}
    sd["patch_embed.proj.weight"] = sd["patch_embed.proj.weight"][:, :, 0]
    dst = build_videomamba("tiny", num_frames=4, img_size=32, tubelet_size=2, **TINY)
    notes = load_official_checkpoint(dst, save({"model": sd}, str(tmp_path / "in1k.pth")))
    assert len(notes) == 3  # kernel inflated, temporal embedding at zero, head not used
    kernel = dst.patch_embed.proj.weight
    assert kernel.shape == (64, 3, 2, 16, 16)
    assert torch.equal(kernel[:, :, 1], sd["patch_embed.proj.weight"]) and kernel[:, :, 0].abs().max() == 0
    assert dst.temporal_pos_embedding.abs().max() == 0
    # a still video then embeds like the image did, frame by frame
    img = torch.randn(1, 3, 1, 32, 32)
    assert torch.allclose(dst.patch_embed(img.repeat(1, 1, 2, 1, 1)), src.patch_embed(img), atol=1e-5)


def test_mismatched_head_is_left_out_and_the_model_keeps_its_own(tmp_path):
    src = build_videomamba("tiny", num_frames=2, img_size=32, num_classes=10, **TINY)
    dst = build_videomamba("tiny", num_frames=2, img_size=32, num_classes=4, **TINY)
    head = dst.head.weight.detach().clone()
    notes = load_official_checkpoint(dst, save(src.state_dict(), str(tmp_path / "k400.pth")))
    assert any(n.startswith("head:") for n in notes) and torch.equal(dst.head.weight, head)


def test_errors_name_missing_and_unexpected_keys(tmp_path):
    sd = build_videomamba("tiny", num_frames=2, img_size=32, **TINY).state_dict()
    del sd["layers.1.mixer.D_b"]
    sd["layers.1.mixer.extra"] = torch.zeros(1)
    dst = build_videomamba("tiny", num_frames=2, img_size=32, **TINY)
    path = save(sd, str(tmp_path / "broken.pth"))
    with pytest.raises(ValueError, match=r"broken\.pth.*missing keys: \['layers\.1\.mixer\.D_b'\].*unexpected keys: "
                                         r"\['layers\.1\.mixer\.extra'\]"):
        load_official_checkpoint(dst, path)
    with pytest.raises(ValueError, match=r"shape mismatches: \['cls_token \(1, 1, 64\) vs model \(1, 1, 32\)'.* and \d+ more"):
        load_official_checkpoint(build_videomamba("tiny", num_frames=2, img_size=32, depth=2, embed_dim=32),
                                 save({"model": build_videomamba("tiny", num_frames=2, img_size=32, depth=2,
                                                                 embed_dim=64).state_dict()}, path))


def test_build_from_config_loads_the_pretrained_checkpoint(tmp_path):
    src = build_videomamba("tiny", num_frames=2, img_size=32, **TINY)
    url = save({"model": src.state_dict()}, str(tmp_path / "vm.pth"))
    cfg = ModelConfig(size="tiny", depth=2, embed_dim=64, token_order="temporal_first", checkpoint_blocks=1,
                      scan_backend="torch", pretrained=url)
    model = build_from_config(cfg, num_frames=2, img_size=32)
    assert model.token_order == "temporal_first" and model.checkpoint_blocks == 1 and len(model.layers) == 2
    assert states_equal(model.state_dict(), src.state_dict())


def test_masked_pretraining_checkpoint_loads_its_backbone(tmp_path):
    """videomamba_pretrain.py's layout: the final norm is `norm`, and a CLIP decoder sits beside the backbone."""
    src = build_videomamba("tiny", num_frames=2, img_size=32, **TINY)
    sd = src.state_dict()
    sd["norm.weight"] = sd.pop("norm_f.weight")
    sd.update({"clip_decoder.0.head.weight": torch.randn(8, 64), "clip_decoder.0.norm.weight": torch.ones(8)})
    dst = build_videomamba("tiny", num_frames=2, img_size=32, **TINY)
    notes = load_official_checkpoint(dst, save({"model": sd}, str(tmp_path / "pretrain.pth")))
    assert any(n.startswith("norm:") for n in notes) and any("clip_decoder" in n and "2 tensors" in n for n in notes)
    assert states_equal(dst.state_dict(), src.state_dict())


def test_a_state_dict_in_memory_loads_like_a_file():
    """A stage-1 run's weights, as pipeline.engine.checkpoint.model_state_dict gives them: heads beside the backbone."""
    src = build_videomamba("tiny", num_frames=2, img_size=32, **TINY)
    run_weights = {**{f"backbone.{k}": v for k, v in src.state_dict().items()},
                   "align_head.proj.weight": torch.zeros(8, 64)}
    dst = build_videomamba("tiny", num_frames=2, img_size=32, **TINY)
    assert load_official_checkpoint(dst, run_weights) == [] and states_equal(dst.state_dict(), src.state_dict())
    with pytest.raises(ValueError, match="the given state dict: no state dict found"):
        load_official_checkpoint(dst, {"model": {"a": 1}})
