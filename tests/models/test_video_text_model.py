"""Stage 2's model: shapes of both encoders and of the cross-modal heads, the official pooling and temperature, and
gradients reaching every part."""
import torch
import torch.nn.functional as F

from pipeline.models import build_videomamba
from pipeline.models.text import load_bert_text_encoder
from pipeline.models.video_text import VideoTextModel


def tiny_model(bert_dir, teacher_dim=None):
    torch.manual_seed(0)
    backbone = build_videomamba("tiny", num_frames=2, img_size=32, depth=2, embed_dim=24, scan_backend="torch")
    text, tokenizer = load_bert_text_encoder(bert_dir, fusion_layer=2, cross_width=24)
    return VideoTextModel(backbone, text, embed_dim=16, teacher_dim=teacher_dim), tokenizer


def test_forward_shapes_and_embeddings(tiny_bert_dir):
    model, tokenizer = tiny_model(tiny_bert_dir, teacher_dim=20)
    video = torch.randn(3, 3, 2, 32, 32)
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[:, :4] = True  # 4 of the 2x2x2 tokens hidden
    tokens = tokenizer(["a red ball", "two blue squares move up slowly", "a green circle"], 8)
    out = model(video, mask, tokens.ids, tokens.attention_mask)
    assert out.video_embed.shape == (3, 16) and out.text_embed.shape == (3, 16)
    assert torch.allclose(out.video_embed.norm(dim=-1), torch.ones(3), atol=1e-5)  # masked: one pooled vector
    assert torch.allclose(out.text_embed.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert out.video_tokens.shape == (3, 4, 24)  # the visible patch tokens, no [cls]
    assert out.aligned.shape == (3, 1 + 4, 20)  # [cls] first (the [CLS] target), then the visible tokens
    assert out.text_hidden.shape == (3, 8, 32)
    assert model.match_logits(out.text_hidden, tokens.attention_mask, out.video_tokens).shape == (3, 2)
    positions = torch.tensor([[0, 1], [2, 3]])
    masked = tokens.ids.clone()
    masked[0, 1] = masked[2, 3] = tokenizer.mask_token_id
    out = model(video, mask, tokens.ids, tokens.attention_mask, masked)
    assert out.masked_hidden.shape == out.text_hidden.shape == (3, 8, 32)
    _, logits = model.fused_heads(out.masked_hidden, tokens.attention_mask, out.video_tokens, 0, positions)
    assert logits.shape == (2, tokenizer.vocab_size)


def test_one_pass_over_all_rows_gives_what_separate_passes_give(tiny_bert_dir):
    """The text-only layers over the captions and their masked copies at once, and the fusion layers over the
    matching rows and the MLM rows at once (half the kernel launches), give the states and logits of the official
    separate passes (the text encoder, then the matching pairs, then the masked texts)."""
    model, tokenizer = tiny_model(tiny_bert_dir)
    model.eval()  # no dropout: the same rows give the same numbers
    video = torch.randn(3, 3, 2, 32, 32)
    tokens = tokenizer(["a red ball", "two blue squares move up slowly", "a green circle"], 8)
    masked = tokens.ids.clone()
    masked[:, 1] = tokenizer.mask_token_id
    positions = torch.tensor([[0, 1], [1, 1], [2, 1]])
    with torch.no_grad():
        out = model(video, None, tokens.ids, tokens.attention_mask, masked)
        alone = model(video, None, tokens.ids, tokens.attention_mask)
        masked_alone = model.text_encoder.encode(masked, tokens.attention_mask)
        torch.testing.assert_close(out.text_hidden, alone.text_hidden)
        torch.testing.assert_close(out.text_embed, alone.text_embed)
        torch.testing.assert_close(out.masked_hidden, masked_alone)
        pairs = out.video_tokens.flip(0)
        rows = (torch.cat([out.text_hidden, out.masked_hidden]), tokens.attention_mask.repeat(2, 1),
                torch.cat([pairs, out.video_tokens]))
        match, words = model.fused_heads(*rows, 3, positions)
        torch.testing.assert_close(match, model.match_logits(out.text_hidden, tokens.attention_mask, pairs))
        fused = model.text_encoder.fuse(masked_alone, tokens.attention_mask, out.video_tokens)
        torch.testing.assert_close(words, model.text_encoder.mlm_logits(fused[:, 1]))


def test_a_whole_clip_is_pooled_per_frame_and_similarities_averaged(tiny_bert_dir):
    """keep_temporal (umt_videomamba.py / videomamba.py PretrainVideoMamba.forward): pool_norm([cls] + each frame's
    mean token), projected and normalized per frame; the embedding's dot product is get_sim's frame average."""
    model, _ = tiny_model(tiny_bert_dir)
    model.eval()
    video = torch.randn(2, 3, 2, 32, 32)
    with torch.no_grad():
        embed, tokens, _ = model.encode_video(video)
        out = model.backbone.forward_features(video)
        frames = out.tokens.reshape(2, 2, 4, 24).mean(2)
        per_frame = F.normalize(model.vision_proj(model.pool_norm(out.cls[:, None] + frames)), dim=-1)
    assert tokens.shape == (2, 8, 24)
    assert torch.allclose(embed, per_frame.mean(1), atol=1e-6)
    text = F.normalize(torch.randn(5, 16), dim=-1)
    official = torch.einsum("mld,nd->mln", per_frame, text).mean(1)  # criterions.py get_sim, agg "mean"
    assert torch.allclose(embed @ text.T, official, atol=1e-6)


def test_temperature_is_clamped_in_training_as_the_official_model(tiny_bert_dir):
    model, tokenizer = tiny_model(tiny_bert_dir)
    assert model.temp.item() == torch.tensor(0.07).item()
    with torch.no_grad():
        model.temp.fill_(0.9)
    tokens = tokenizer(["a red ball", "a green circle"], 8)
    model(torch.randn(2, 3, 2, 32, 32), None, tokens.ids, tokens.attention_mask)
    assert model.temp.item() == 0.5


def test_the_matching_head_sees_the_video_and_gradients_reach_both_encoders(tiny_bert_dir):
    model, tokenizer = tiny_model(tiny_bert_dir)
    tokens = tokenizer(["a red ball", "a green circle spins"], 8)
    out = model(torch.randn(2, 3, 2, 32, 32), None, tokens.ids, tokens.attention_mask)
    swapped = model.match_logits(out.text_hidden, tokens.attention_mask, out.video_tokens.flip(0))
    logits = model.match_logits(out.text_hidden, tokens.attention_mask, out.video_tokens)
    assert not torch.allclose(logits, swapped)  # cross-attention: other videos, other scores
    (logits.sum() + (out.video_embed * out.text_embed).sum() / out.temp.sum()).backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    for prefix in ("backbone.patch_embed.", "pool_norm.", "text_encoder.bert.embeddings.word_embeddings.",
                   "text_encoder.bert.encoder.layer.2.crossattention.", "vision_proj.", "text_proj.", "itm_head.",
                   "temp"):
        found = [g for name, g in grads.items() if name.startswith(prefix)]
        assert found and all(g is not None and g.abs().sum() > 0 for g in found), prefix


def test_the_stage2_builder_starts_from_exactly_the_pretrained_berts_weights(tiny_bert_dir):
    """configs/stage2_video_text.yaml with text.pretrained=<a tiny BERT>: every BERT tensor the model holds is the
    directory's, the fusion layers' cross-attention is new, the tokenizer is the directory's."""
    from pathlib import Path

    from transformers import BertForMaskedLM

    from pipeline.config import VideoTextStageConfig, load_config
    from pipeline.models.factory import build_video_text_model

    config = Path(__file__).resolve().parents[2] / "configs" / "stage2_video_text.yaml"
    cfg = load_config(VideoTextStageConfig, str(config), [f"text.pretrained={tiny_bert_dir}", "text.fusion_layer=1",
                                                          "model.depth=2", "model.embed_dim=24", "text.embed_dim=16"])
    model, tokenizer = build_video_text_model(cfg, num_frames=2, img_size=32)
    bert = BertForMaskedLM.from_pretrained(tiny_bert_dir).state_dict()
    own = model.state_dict()
    compared = [k for k in bert if f"text_encoder.{k}" in own]
    assert len(compared) == len([k for k in own if k.startswith("text_encoder.") and ".crossattention." not in k])
    assert all(torch.equal(own[f"text_encoder.{k}"], bert[k]) for k in compared)
    assert sum(".crossattention.self.query.weight" in k for k in own) == 2  # layers 1 and 2 of 3 fuse
    assert tokenizer(["a red ball"], 8).ids[0, 0] == tokenizer.cls_token_id
    assert model.temp.item() == torch.tensor(0.07).item() and model.vision_proj.out_features == 16
