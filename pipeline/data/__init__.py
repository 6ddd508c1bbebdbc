"""Streaming video-text data: shards -> resumable per-(rank, worker) streams -> decoded, CLIP-normalized batches.

`build_loader(data_cfg, batch_size, rank, world_size, seed, train=True)` is the entry point (docs/CONTRACTS.md).
"""
from pipeline.data.loader import StreamingLoader, build_loader
from pipeline.data.transforms import CLIP_MEAN, CLIP_STD

__all__ = ["CLIP_MEAN", "CLIP_STD", "StreamingLoader", "build_loader"]
