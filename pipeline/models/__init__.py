"""The VideoMamba backbone: `build_videomamba`, `build_from_config`, `load_official_checkpoint`; see CONTRACTS.md."""
from __future__ import annotations

from pipeline.models.factory import build_from_config
from pipeline.models.mamba import BidirectionalMamba, choose_backend
from pipeline.models.videomamba import (SIZE_DROP_PATH, SIZES, VideoMamba, VideoMambaOutput, build_videomamba,
                                        load_official_checkpoint)

__all__ = ["BidirectionalMamba", "SIZE_DROP_PATH", "SIZES", "VideoMamba", "VideoMambaOutput", "build_from_config",
           "build_videomamba", "choose_backend", "load_official_checkpoint"]
