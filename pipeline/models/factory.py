"""Builders of the models a config describes: the VideoMamba backbone and the stage-2 video-text model with its
tokenizer; `token_grid` is the (T', h, w) grid of tokens a backbone works on, which masks and teacher must fit."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from pipeline.models.video_text import TextSpec, VideoTextModel
from pipeline.models.videomamba import (SIZE_DROP_PATH, VideoMamba, build_videomamba, load_official_checkpoint,
                                        token_grid)

__all__ = ["build_from_config", "build_video_text_model", "token_grid"]

if TYPE_CHECKING:
    from open_clip.tokenizer import SimpleTokenizer


def build_from_config(model_cfg, num_frames: int, img_size: int, num_classes: int = 0) -> VideoMamba:
    """Returns the VideoMamba that a `pipeline.config.ModelConfig` describes, with `model_cfg.pretrained` (an
    official checkpoint, any fsspec URL) loaded when set; an unset drop-path rate is the size's."""
    drop_path = model_cfg.drop_path_rate
    drop_path = SIZE_DROP_PATH[model_cfg.size] if drop_path is None else drop_path
    model = build_videomamba(
        model_cfg.size, num_frames=num_frames, img_size=img_size, num_classes=num_classes,
        depth=model_cfg.depth, embed_dim=model_cfg.embed_dim, patch_size=model_cfg.patch_size,
        tubelet_size=model_cfg.tubelet_size, drop_path_rate=drop_path,
        token_order=model_cfg.token_order, checkpoint_blocks=model_cfg.checkpoint_blocks,
        scan_backend=model_cfg.scan_backend, residual_in_fp32=model_cfg.residual_in_fp32)
    if model_cfg.pretrained:
        load_official_checkpoint(model, model_cfg.pretrained)
    return model


def build_video_text_model(cfg, num_frames: int, img_size: int,
                           teacher_dim: Optional[int] = None) -> tuple[VideoTextModel, SimpleTokenizer]:
    """The stage-2 model that a `pipeline.config.VideoTextStageConfig` describes (random weights; the caller loads
    them) and its tokenizer."""
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer = SimpleTokenizer()
    t = cfg.text
    spec = TextSpec(len(tokenizer.encoder), t.width, t.depth, t.heads, t.fusion_layers, t.max_len, t.embed_dim)
    return VideoTextModel(build_from_config(cfg.model, num_frames, img_size), spec, teacher_dim), tokenizer
