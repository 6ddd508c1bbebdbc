"""Released video_mm checkpoints (UMT_VIDEOMAMBA): every key of the official layout is mapped onto the stage-2 model
or named in the dropped list, the load is strict and exact, position embeddings follow the model's grid, the
full-size layout (VideoMamba-M + BERT-base fused from layer 9) fits the full-size model, and a checkpoint of neither
layout is refused with the keys that did not fit."""
import argparse

import pytest
import torch
from transformers import BertConfig

from pipeline.models import build_videomamba
from pipeline.models.official import DROPPED, load_video_text_weights, official_to_project, read_checkpoint
from pipeline.models.text import bert_text_encoder, load_bert_text_encoder
from pipeline.models.video_text import VideoTextModel
from pipeline.safe_load import UnsafeFile
from tests.unsafe_files import write_bomb
from tests.models.official_layout import fake_official_video_mm, official_video_mm_shapes


def tiny_stage2(bert_dir, num_frames=4, img_size=32, teacher_dim=None, align_head="clip_decoder"):
    backbone = build_videomamba("tiny", num_frames=num_frames, img_size=img_size, depth=2, embed_dim=24,
                                scan_backend="torch")
    text, tokenizer = load_bert_text_encoder(bert_dir, fusion_layer=2, cross_width=24)
    return VideoTextModel(backbone, text, embed_dim=16, teacher_dim=teacher_dim, align_head=align_head), tokenizer


def tiny_official(bert_dir, **kwargs):
    from transformers import BertConfig as Config
    config = Config.from_pretrained(bert_dir)
    bert = dict(hidden=config.hidden_size, layers=config.num_hidden_layers, fusion_layer=2, vocab=config.vocab_size,
                max_positions=config.max_position_embeddings)
    return fake_official_video_mm(depth=2, width=24, embed_dim=16, bert=bert,
                                  clip_teacher=dict(width=32, layers=1, output_dim=16, img_size=32), **kwargs)


def test_a_fake_official_checkpoint_loads_strictly_and_exactly(tiny_bert_dir, tmp_path):
    """Every key but the teacher's and the position_ids buffer lands in the model, the student's alignment decoder
    (`vision_encoder.clip_decoder.0.*`) in its official alignment head; the load is strict (no key of the model
    left at its own value)."""
    checkpoint = tiny_official(tiny_bert_dir, num_frames=4, img_size=32, clip_output_dim=16)
    torch.save(checkpoint, tmp_path / "videomamba_m16_5M_f8_res224.pth")
    model, _ = tiny_stage2(tiny_bert_dir, teacher_dim=16)  # the teacher's width (CLIP-B/16: 512)
    assert "vision_encoder.clip_decoder." not in DROPPED
    mapped, _ = official_to_project(model, checkpoint["model"])
    assert mapped.keys() == model.state_dict().keys()
    notes = load_video_text_weights(model, str(tmp_path / "videomamba_m16_5M_f8_res224.pth"))
    official = checkpoint["model"]
    own = model.state_dict()
    renamed = {"vision_encoder.norm.weight": "backbone.norm_f.weight", "temp": "temp"}
    loaded = set()
    for key, value in official.items():
        if any(key.startswith(prefix) for prefix in DROPPED):
            continue
        name = renamed.get(key) or (key.replace("vision_encoder.pool_norm.", "pool_norm.")
                                    .replace("vision_encoder.clip_decoder.0.", "align_head.")
                                    .replace("vision_encoder.", "backbone."))
        assert torch.equal(own[name].reshape(value.shape), value), key
        loaded.add(name)
    assert loaded == set(own)  # nothing of the model kept its own value
    assert torch.equal(model.align_head.head.weight, official["vision_encoder.clip_decoder.0.head.weight"])
    assert model.text_encoder.cls.predictions.decoder.weight is model.text_encoder.bert.embeddings.word_embeddings.weight
    assert any(n.startswith("clip_teacher.*") for n in notes) and not any("clip_decoder" in n for n in notes)


@pytest.mark.parametrize("case", ["no teacher", "norm_linear", "another teacher width"])
def test_a_model_without_a_fitting_head_leaves_the_decoder_out_and_says_so(tiny_bert_dir, case):
    """An evaluation or loss.align=0 (no head), model.align_head=norm_linear, or a teacher of another width: the
    official decoder is left out with a note and the model keeps its own head; everything else loads strictly."""
    checkpoint = tiny_official(tiny_bert_dir, num_frames=4, img_size=32, clip_output_dim=16)["model"]
    kwargs = {"no teacher": {}, "norm_linear": dict(teacher_dim=16, align_head="norm_linear"),
              "another teacher width": dict(teacher_dim=20)}[case]
    model, _ = tiny_stage2(tiny_bert_dir, **kwargs)
    own_head = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("align_head.")}
    notes = load_video_text_weights(model, checkpoint)
    assert any(n.startswith("vision_encoder.clip_decoder.0.*: 4 tensors not loaded") for n in notes), notes
    assert all(torch.equal(model.state_dict()[k], v) for k, v in own_head.items())
    assert torch.equal(model.backbone.cls_token, checkpoint["vision_encoder.cls_token"])


def test_position_embeddings_follow_the_models_grid(tiny_bert_dir):
    checkpoint = tiny_official(tiny_bert_dir, num_frames=8, img_size=64)["model"]
    model, _ = tiny_stage2(tiny_bert_dir, num_frames=4, img_size=32)
    notes = load_video_text_weights(model, checkpoint)
    assert "pos_embed: 4x4 -> 2x2 (bicubic)" in notes and "temporal_pos_embedding: 8 -> 4 (linear)" in notes
    assert model.backbone.pos_embed.shape == (1, 5, 24) and model.backbone.temporal_pos_embedding.shape == (1, 4, 24)


def test_the_full_size_layout_fits_the_full_size_model():
    """VideoMamba-M (32 x 576, 8 frames, 224 px) + BERT-base fused from layer 9 + 512-d projections, on the meta
    device: every official key is mapped or dropped and the shapes agree."""
    with torch.device("meta"):
        backbone = build_videomamba("middle", num_frames=8, img_size=224, scan_backend="torch")
        model = VideoTextModel(backbone, bert_text_encoder(BertConfig(), 9, 576), embed_dim=512, teacher_dim=512)
        state = {k: torch.empty(shape) for k, shape in official_video_mm_shapes().items()}
    mapped, _ = official_to_project(model, state)
    assert mapped.keys() == model.state_dict().keys()
    assert mapped["align_head.head.weight"].shape == (512, 576)  # clip_decoder.0: Linear(576 -> 512) -> LayerNorm
    assert sum(".crossattention.self.key.weight" in k for k in mapped) == 3
    assert mapped["text_encoder.bert.encoder.layer.9.crossattention.self.key.weight"].shape == (768, 576)


def test_a_checkpoint_of_neither_layout_is_refused_with_the_keys(tiny_bert_dir):
    model, _ = tiny_stage2(tiny_bert_dir)
    official = tiny_official(tiny_bert_dir, num_frames=4, img_size=32)["model"]
    official["vision_encoder.extra_head.weight"] = torch.zeros(3)
    del official["itm_head.bias"]
    with pytest.raises(ValueError, match=r"lacks: \['itm_head.bias'\].*does not have: \['vision_encoder.extra_head"):
        load_video_text_weights(model, official)
    with pytest.raises(ValueError, match=r"model keys it lacks: .*backbone\.cls_token"):
        load_video_text_weights(model, {"foo.weight": torch.zeros(2)})


def test_a_pickled_run_config_is_read_as_data_and_anything_else_refused(tmp_path):
    """The official training container pickles its config (a Namespace / EasyDict) beside the weights: the weights
    load and the config's class is never imported; any other object is refused before it runs."""
    torch.save({"model": {"w": torch.zeros(1)}, "config": argparse.Namespace(a=1)}, tmp_path / "with_config.pth")
    assert list(read_checkpoint(str(tmp_path / "with_config.pth"))) == ["w"]
    marker = tmp_path / "MARKER"
    with pytest.raises(UnsafeFile, match="refused"):
        read_checkpoint(str(write_bomb(tmp_path / "hostile.pth", marker)))
    assert not marker.exists()


def test_a_project_state_dict_with_another_head_loads_all_but_the_head(tiny_bert_dir):
    """A stage-2 run trained with the earlier head (norm_linear) into a model with the official one: the head is
    left out with a note and starts fresh; with the same head it loads."""
    earlier, _ = tiny_stage2(tiny_bert_dir, teacher_dim=16, align_head="norm_linear")
    model, _ = tiny_stage2(tiny_bert_dir, teacher_dim=16)
    fresh = model.align_head.head.weight.clone()
    notes = load_video_text_weights(model, earlier.state_dict())
    assert any(n.startswith("align_head.*: 4 tensors not loaded: they do not fit") for n in notes), notes
    assert torch.equal(model.align_head.head.weight, fresh)
    assert torch.equal(model.backbone.pos_embed, earlier.backbone.pos_embed)
    same, _ = tiny_stage2(tiny_bert_dir, teacher_dim=16)
    assert load_video_text_weights(same, model.state_dict()) == []
    assert torch.equal(same.align_head.head.weight, fresh)
