"""Stage 2's model: shapes of both encoders and of the cross-modal heads, and gradients reaching every part."""
import torch

from pipeline.models import build_videomamba
from pipeline.models.video_text import TextSpec, VideoTextModel


def tiny_model(teacher_dim=None):
    torch.manual_seed(0)
    backbone = build_videomamba("tiny", num_frames=2, img_size=32, depth=2, embed_dim=32, scan_backend="torch")
    spec = TextSpec(vocab_size=100, width=32, depth=3, heads=2, fusion_layers=1, max_len=8, embed_dim=16)
    return VideoTextModel(backbone, spec, teacher_dim)


def test_forward_shapes_and_normalized_embeddings(one_thread):
    model = tiny_model(teacher_dim=24)
    video = torch.randn(3, 3, 2, 32, 32)
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[:, :4] = True  # 4 of the 2x2x2 tokens hidden
    ids = torch.randint(1, 100, (3, 8))
    pad = torch.zeros(3, 8, dtype=torch.bool)
    pad[0, 5:] = True
    out = model(video, mask, ids, pad)
    assert out.video_embed.shape == (3, 16) and out.text_embed.shape == (3, 16)
    assert torch.allclose(out.video_embed.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(out.text_embed.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert out.video_tokens.shape == (3, 1 + 4, 32)  # [cls] and the visible tokens
    assert out.aligned.shape == (3, 4, 24)
    assert out.text_hidden.shape == (3, 8, 32)
    assert model.match_logits(out.text_hidden, pad, out.video_tokens).shape == (3, 2)
    positions = torch.tensor([[0, 1], [2, 3]])
    masked = ids.clone()
    masked[0, 1] = masked[2, 3] = model.text.mask_id
    assert model.text.mask_id == 100  # one id past the tokenizer's
    assert model.mlm_logits(masked, pad, out.video_tokens, positions).shape == (2, 101)


def test_the_matching_head_sees_the_video_and_gradients_reach_both_encoders(one_thread):
    model = tiny_model()
    video = torch.randn(2, 3, 2, 32, 32)
    ids = torch.randint(1, 100, (2, 8))
    pad = torch.zeros(2, 8, dtype=torch.bool)
    out = model(video, None, ids, pad)
    swapped = model.match_logits(out.text_hidden, pad, out.video_tokens.flip(0))
    logits = model.match_logits(out.text_hidden, pad, out.video_tokens)
    assert not torch.allclose(logits, swapped)  # cross-attention: other videos, other scores
    (logits.sum() + (out.video_embed * out.text_embed).sum()).backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    for prefix in ("backbone.patch_embed.", "text.token_embedding.", "text.layers.2.cross_attn.", "vision_proj.",
                   "text_proj.", "itm_head."):
        found = [g for name, g in grads.items() if name.startswith(prefix)]
        assert found and all(g is not None and g.abs().sum() > 0 for g in found), prefix
