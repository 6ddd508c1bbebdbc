"""The student's alignment heads: the official clip_decoder (the default) reads the un-normed stream entering the last
block plus the fixed sinusoid positions, exactly as a reference transcribed from the official module computes it;
the earlier LayerNorm + Linear head over the final-normed tokens stays an option."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.models import build_videomamba
from pipeline.models.heads import AlignmentHead, ClipDecoder, build_alignment_head, sinusoid_table


# ------------------------------------------------------------------------ the official code, transcribed for reference
def official_sinusoid_table(n_position, d_hid):
    """videomamba/video_mm/models/backbones/videomamba/videomamba.py get_sinusoid_encoding_table (the same in
    video_sm/models/videomamba_pretrain.py), as written there."""
    def get_position_angle_vec(position):
        return [position / np.power(10000, 2 * (hid_j // 2) / d_hid) for hid_j in range(d_hid)]

    sinusoid_table = np.array([get_position_angle_vec(pos_i) for pos_i in range(n_position)])
    sinusoid_table[:, 0::2] = np.sin(sinusoid_table[:, 0::2])
    sinusoid_table[:, 1::2] = np.cos(sinusoid_table[:, 1::2])
    return torch.tensor(sinusoid_table, dtype=torch.float, requires_grad=False).unsqueeze(0)


class OfficialLinearDecoder(nn.Module):
    """video_mm's Linear_Decoder: norm(head(x)) (video_sm's adds the L2 that the project's loss applies)."""

    def __init__(self, output_dim, embed_dim):
        super().__init__()
        self.head = nn.Linear(embed_dim, output_dim)
        self.norm = nn.LayerNorm(output_dim)

    def forward(self, x):
        return self.norm(self.head(x))


def official_student_output(backbone, decoder, x, mask):
    """PretrainVideoMamba.forward_features (fused_add_norm=True, eval: no drop path) and the alignment part of its
    forward, written from the official code with the project's parameters: `mask` (B, 1 + N) with [cls] first."""
    x = backbone.patch_embed(x)
    B, C, T, H, W = x.shape
    x = x.permute(0, 2, 3, 4, 1).reshape(B * T, H * W, C)
    x = torch.cat((backbone.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    x = x + backbone.pos_embed
    cls_tokens = x[:B, :1, :]
    x = x[:, 1:]
    x = (x.reshape(B, T, H * W, C) + backbone.temporal_pos_embedding[:, :, None]).reshape(B, T * H * W, C)
    x = torch.cat((cls_tokens, x), dim=1)
    hidden_states = x[~mask].reshape(B, -1, C)
    residual = None
    for layer in backbone.layers:  # Block.forward: Add -> norm -> mixer, the residual kept in fp32
        residual = hidden_states if residual is None else residual + hidden_states
        hidden_states = layer.mixer(layer.norm(residual))
        residual = residual.float()
    x_clip_vis = residual  # the final norm runs with prenorm=False: `residual` is the last block's input stream
    table = official_sinusoid_table(T * H * W + 1, C)
    clip_pos_emd_vis = table.repeat(B, 1, 1).type_as(x)[~mask].view(B, -1, C)
    return decoder(x_clip_vis + clip_pos_emd_vis)


def tiny_backbone(**kwargs):
    torch.manual_seed(0)
    return build_videomamba("tiny", num_frames=2, img_size=32, depth=3, embed_dim=24, scan_backend="torch",
                            **kwargs).eval()


def random_mask(batch, tokens, kept, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    for row in mask:
        row[torch.randperm(tokens, generator=g)[:kept]] = False
    return mask


# --------------------------------------------------------------------------------------------------------- tests
def test_the_sinusoid_table_is_the_official_one():
    for n, d in ((9, 24), (1569, 576)):
        torch.testing.assert_close(sinusoid_table(n, d), official_sinusoid_table(n, d)[0], atol=0, rtol=0)


@pytest.mark.parametrize("masked", [True, False])
def test_clip_decoder_matches_the_official_student_output(masked):
    """The head reads the residual stream entering the last block (un-normed, not the final norm's output) plus the
    sinusoid rows of the tokens kept ([cls] at 0, patch i at 1 + i), through Linear -> LayerNorm."""
    backbone = tiny_backbone()
    head = ClipDecoder(24, 16)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_()
    official = OfficialLinearDecoder(16, 24)
    official.load_state_dict(head.state_dict())  # the official names: head.*, norm.*
    x = torch.randn(2, 3, 2, 32, 32)
    mask = random_mask(2, 8, kept=3) if masked else None
    with torch.no_grad():
        out = backbone.forward_features(x, mask=mask)
        ours = head(out, mask)
        with_cls = torch.cat([torch.zeros(2, 1, dtype=torch.bool),
                              mask if masked else torch.zeros(2, 8, dtype=torch.bool)], dim=1)
        reference = official_student_output(backbone, official, x, with_cls)
    assert ours.shape == (2, 1 + (3 if masked else 8), 16)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    # not the final-normed tokens: the stream is what the last block reads, before its output is added
    assert out.stream.dtype == torch.float32 and not torch.allclose(out.stream[:, 1:], out.tokens.float())
    torch.testing.assert_close(head(out, mask, with_cls=False), ours[:, 1:])


def test_the_stream_comes_back_in_spatial_first_order_from_temporal_first_blocks():
    """With one block the stream entering it is the embedded tokens: whatever order the block scans, the output's
    stream is in the canonical order (as the mask and the position table index it)."""
    backbone = build_videomamba("tiny", num_frames=2, img_size=32, depth=1, embed_dim=24, scan_backend="torch",
                                token_order="temporal_first").eval()
    x, mask = torch.randn(2, 3, 2, 32, 32), random_mask(2, 8, kept=4, seed=1)
    with torch.no_grad():
        embedded, _, _ = backbone._embedded_tokens(x, mask)
        torch.testing.assert_close(backbone.forward_features(x, mask=mask).stream, embedded)


def test_clip_decoder_is_initialised_as_the_official_linear_decoder():
    head = ClipDecoder(576, 512)
    bound = math.sqrt(6 / (576 + 512))  # xavier_uniform_
    assert head.head.weight.abs().max() <= bound and head.head.weight.abs().max() > 0.9 * bound
    assert torch.count_nonzero(head.head.bias) == 0
    assert torch.equal(head.norm.weight, torch.ones(512)) and torch.count_nonzero(head.norm.bias) == 0
    assert set(head.state_dict()) == {"head.weight", "head.bias", "norm.weight", "norm.bias"}  # no saved table


def test_clip_decoder_in_bf16_reads_the_fp32_stream_and_trains_the_backbone():
    backbone = tiny_backbone().train()
    head = ClipDecoder(24, 16)
    x, mask = torch.randn(2, 3, 2, 32, 32), random_mask(2, 8, kept=2)
    out = backbone.forward_features(x, mask=mask)
    head(out, mask).square().mean().backward()
    assert backbone.layers[0].mixer.in_proj.weight.grad is not None
    assert backbone.norm_f.weight.grad is None  # the head does not read the final norm's output
    assert ClipDecoder(24, 16).to(torch.bfloat16)(out, mask).dtype == torch.bfloat16


def test_the_head_kinds():
    backbone = tiny_backbone()
    out = backbone.forward_features(torch.randn(1, 3, 2, 32, 32))
    assert isinstance(build_alignment_head("clip_decoder", 24, 16), ClipDecoder)
    earlier = build_alignment_head("norm_linear", 24, 16)
    assert isinstance(earlier, AlignmentHead) and earlier(out, None).shape == (1, 9, 16)
    torch.testing.assert_close(earlier(out, None, with_cls=False), earlier.proj(earlier.norm(out.tokens)))
    with pytest.raises(ValueError, match="not one of clip_decoder, norm_linear"):
        build_alignment_head("mlp", 24, 16)
