"""Builders of the models a config describes: the VideoMamba backbone and the stage-2 video-text model with its
tokenizer; `token_grid` is the (T', h, w) grid of tokens a backbone works on, which masks and teacher must fit."""
from __future__ import annotations

from typing import Optional

from pipeline.models.text import BertTextTokenizer, load_bert_text_encoder
from pipeline.models.video_text import VideoTextModel
from pipeline.models.videomamba import (SIZE_DROP_PATH, VideoMamba, build_videomamba, load_official_checkpoint,
                                        token_grid)

__all__ = ["build_from_config", "build_video_text_model", "token_grid"]


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


def build_video_text_model(cfg, num_frames: int, img_size: int, teacher_dim: Optional[int] = None,
                           bert_weights: bool = True) -> tuple[VideoTextModel, BertTextTokenizer]:
    """The stage-2 model that a `pipeline.config.VideoTextStageConfig` (or any config with `model` and `text`)
    describes and its tokenizer: the backbone as `build_from_config` makes it, the BERT text encoder of
    `text.pretrained` (its weights unless `bert_weights` is false: a caller that loads a whole checkpoint next needs
    only its shape and tokenizer) with fusion from `text.fusion_layer`, fresh heads."""
    backbone = build_from_config(cfg.model, num_frames, img_size)
    text, tokenizer = load_bert_text_encoder(cfg.text.pretrained, cfg.text.fusion_layer, backbone.embed_dim,
                                             weights=bert_weights)
    align_cls = cfg.teacher.cls_target if hasattr(cfg, "teacher") else True
    return VideoTextModel(backbone, text, cfg.text.embed_dim, cfg.text.temp, teacher_dim, align_cls,
                          cfg.model.align_head), tokenizer
