"""Write a synthetic video-text corpus of moving shapes, with captions that say exactly what moves (work in progress)."""
from __future__ import annotations

import io
from typing import Optional

import av
import numpy as np

# our codec name -> (FFmpeg encoder, encoder options); both deterministic with one thread
ENCODERS = {
    "h264": ("libx264", {"preset": "veryfast", "crf": "18"}),
    "vp9": ("libvpx-vp9", {"crf": "30", "b": "0", "deadline": "realtime", "cpu-used": "8"}),
}


def encode_mp4(frames: np.ndarray, fps: int = 8, codec: str = "h264") -> bytes:
    """Returns the bytes of an mp4 (yuv420p) holding `frames` (T, H, W, 3) uint8 RGB with even H and W.

    One encoder thread: the output is then byte-identical across runs (and workers are processes, not threads).
    """
    if codec not in ENCODERS:
        raise ValueError(f"codec {codec!r} is not one of {', '.join(ENCODERS)}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs even frame sizes, got {width}x{height}")
    encoder, options = ENCODERS[codec]
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream(encoder, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.thread_count = 1
        stream.options = dict(options)
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()
