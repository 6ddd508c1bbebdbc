"""The VideoMamba backbone: `build_videomamba`, `build_from_config`, `load_official_checkpoint`; see CONTRACTS.md."""
from __future__ import annotations

from pipeline.models.mamba import BidirectionalMamba, choose_backend
from pipeline.models.videomamba import (SIZE_DROP_PATH, SIZES, VideoMamba, VideoMambaOutput, build_videomamba,
                                        load_official_checkpoint)


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


__all__ = ["BidirectionalMamba", "SIZE_DROP_PATH", "SIZES", "VideoMamba", "VideoMambaOutput", "build_from_config", "build_videomamba",
           "choose_backend", "load_official_checkpoint"]
