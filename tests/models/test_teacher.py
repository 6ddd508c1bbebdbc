"""The frozen open_clip teacher: loading through open_clip's API, per-patch targets, [cls] attention, clear errors."""
import json

import pytest
import torch

from pipeline.config import ConfigError, TeacherConfig
from pipeline.models.teacher import build_teacher, check_teacher_grid
from tests.conftest import tiny_clip, tiny_clip_config

NAME = "test-teacher-vit"
CONFIG = tiny_clip_config()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny CLIP saved by the test as a plain open_clip state dict, with its config JSON beside it."""
    folder = tmp_path_factory.mktemp("teacher")
    model = tiny_clip(folder, NAME)
    torch.save(model.state_dict(), folder / "teacher.pt")
    return folder / "teacher.pt", model


def _teacher(checkpoint, img_size=32):
    return build_teacher(TeacherConfig(model=NAME, pretrained=str(checkpoint[0]), img_size=img_size))


def test_teacher_loads_the_checkpoints_weights_and_is_frozen(checkpoint):
    teacher = _teacher(checkpoint)
    saved = checkpoint[1].visual.state_dict()
    loaded = teacher.visual.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not teacher.visual.training
    assert teacher.grid == (2, 2) and teacher.width == CONFIG["embed_dim"]


def test_patch_tokens_are_the_last_blocks_through_the_projection_and_ln_post_is_an_option(checkpoint):
    """The official VideoMamba recipe (--clip_return_cls) projects the last block's tokens without ln_post;
    teacher.ln_post=true gives open_clip's own final tokens (ln_post) through the projection."""
    frames = torch.randn(3, 3, 32, 32)
    official = _teacher(checkpoint)(frames)
    with_norm = build_teacher(TeacherConfig(model=NAME, pretrained=str(checkpoint[0]), img_size=32, ln_post=True))
    out = with_norm(frames)
    visual = checkpoint[1].visual.eval()
    visual.output_tokens = True
    with torch.no_grad():
        pooled, tokens = visual(frames)  # open_clip's own forward: tokens after ln_post, before the projection
        x = visual._embeds(frames)
        for block in visual.transformer.resblocks:
            x = block(x)
        raw = x[:, 1:] @ visual.proj
    visual.output_tokens = False
    assert out.tokens.shape == official.tokens.shape == (3, 4, CONFIG["embed_dim"])
    torch.testing.assert_close(out.tokens, tokens @ visual.proj)
    torch.testing.assert_close(official.tokens, raw)
    assert not torch.allclose(official.tokens, out.tokens)
    assert out.cls_attention is None
    assert not out.tokens.requires_grad


def test_cls_attention_matches_multihead_attentions_own_weights(checkpoint):
    teacher = _teacher(checkpoint)
    frames = torch.randn(2, 3, 32, 32)
    out = teacher(frames, with_attention=True)
    visual = teacher.visual
    with torch.no_grad():
        x = visual._embeds(frames)
        for block in visual.transformer.resblocks[:-1]:
            x = block(x)
        last = visual.transformer.resblocks[-1]
        y = last.ln_1(x)
        _, weights = last.attn(y, y, y, need_weights=True, average_attn_weights=True)
    torch.testing.assert_close(out.cls_attention, weights[:, 0, 1:])
    assert out.cls_attention.shape == (2, 4)


def test_teacher_at_another_resolution_resizes_its_position_embedding(checkpoint):
    teacher = _teacher(checkpoint, img_size=64)
    assert teacher.grid == (4, 4)
    assert teacher(torch.randn(1, 3, 64, 64)).tokens.shape == (1, 16, CONFIG["embed_dim"])
    with pytest.raises(ValueError, match="takes 64x64 frames, got 32x32"):
        teacher(torch.randn(1, 3, 32, 32))


def test_grid_mismatch_with_the_student_is_explained(checkpoint):
    teacher = _teacher(checkpoint)
    check_teacher_grid(teacher, img_size=32, patch_size=16)
    with pytest.raises(ConfigError, match=r"set teacher.img_size=64"):
        check_teacher_grid(teacher, img_size=64, patch_size=16)
    with pytest.raises(ConfigError, match="grid does not match"):
        check_teacher_grid(teacher, img_size=32, patch_size=8)


def test_unreachable_pretrained_tag_names_the_tag_and_how_to_give_a_file(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network here either way; fail fast
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent-hub-cache")
    with pytest.raises(ConfigError) as err:
        build_teacher(TeacherConfig(model="ViT-B-16", pretrained="openai", img_size=224))
    message = str(err.value)
    assert "'openai'" in message and "ViT-B-16" in message
    assert "teacher.pretrained=/path/to/teacher.pt" in message


@pytest.mark.parametrize("model,pretrained,message", [
    ("ViT-B-16", "no-such-tag", "neither a checkpoint file nor a pretrained tag"),
    ("ViT-B-16", "/nonexistent/teacher.pt", "no such checkpoint file"),
    ("ViT-B-16", None, "random weights give meaningless targets"),
    ("not-a-model", "openai", "not an open_clip model"),
])
def test_bad_teacher_settings_are_named(model, pretrained, message):
    with pytest.raises(ConfigError, match=message):
        build_teacher(TeacherConfig(model=model, pretrained=pretrained, img_size=224))


def test_custom_model_without_its_config_json_is_explained(checkpoint, tmp_path):
    lonely = tmp_path / "teacher.pt"
    lonely.write_bytes(checkpoint[0].read_bytes())
    with pytest.raises(ConfigError, match="unknown-vit.json"):
        build_teacher(TeacherConfig(model="unknown-vit", pretrained=str(lonely), img_size=32))


def test_checkpoint_from_an_fsspec_url_loads(checkpoint):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/teachers/teacher.pt", checkpoint[0].read_bytes())
    fs.pipe(f"/teachers/{NAME}.json", json.dumps(CONFIG).encode())
    teacher = build_teacher(TeacherConfig(model=NAME, pretrained="memory://teachers/teacher.pt", img_size=32))
    frames = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(teacher(frames).tokens, _teacher(checkpoint)(frames).tokens)


def test_a_checkpoint_that_does_not_fit_the_model_is_named(checkpoint, tmp_path):
    (tmp_path / f"{NAME}.json").write_text(json.dumps(CONFIG))
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="garbage.pt'.*cannot load it"):
        build_teacher(TeacherConfig(model=NAME, pretrained=str(tmp_path / "garbage.pt"), img_size=32))
    wider = {**CONFIG, "vision_cfg": {**CONFIG["vision_cfg"], "width": 96}}
    (tmp_path / f"{NAME}.json").write_text(json.dumps(wider))
    (tmp_path / "teacher.pt").write_bytes(checkpoint[0].read_bytes())
    with pytest.raises(ConfigError, match="cannot load it into open_clip model"):
        build_teacher(TeacherConfig(model=NAME, pretrained=str(tmp_path / "teacher.pt"), img_size=32))
