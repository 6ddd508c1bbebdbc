"""Media bytes: read through fsspec with retries, validate (PyAV / PIL), and optionally cut, shorten or re-encode.

Every problem with one input becomes a `MediaError` whose `reason` is a short code (`missing_file`, `unreadable`,
`unreachable`, `empty_file`, `corrupt_video`, `corrupt_image`, `processing_failed`) that the failures file and the
summary count by.
"""
from __future__ import annotations

import io
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Optional, TypeVar

from fsspec.core import url_to_fs

T = TypeVar("T")

# Errors that retrying cannot fix; everything else that a read raises (timeouts, refused connections, throttling,
# 5xx responses) is treated as transient and retried with exponential backoff before it counts as a failure.
PERMANENT_READ_ERRORS = {
    FileNotFoundError: "missing_file",
    IsADirectoryError: "unreadable",
    NotADirectoryError: "missing_file",
    PermissionError: "unreadable",
    UnicodeError: "unreadable",
    ValueError: "unreadable",  # e.g. a malformed URL or an unknown protocol
    ImportError: "unreadable",  # a protocol whose fsspec driver is not installed
}


class MediaError(Exception):
    """One input that cannot be used; `reason` is the code the failures file and summary count by."""

    def __init__(self, reason: str, detail: str):
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4  # total tries, the first included
    backoff_s: float = 0.5  # wait before the 2nd try; doubles each time
    max_backoff_s: float = 8.0


@dataclass(frozen=True)
class MediaInfo:
    kind: str  # "video" | "image"
    ext: str  # the extension the sample is stored under (mp4, webm, jpg, png, ...)
    width: int
    height: int
    duration: Optional[float] = None
    fps: Optional[float] = None
    codec: Optional[str] = None


@dataclass(frozen=True)
class ProcessOptions:
    """Processing inside the shard tasks; all off by default, in which case the original bytes are stored."""

    clip: bool = False  # cut videos to the manifest's start/end
    max_duration: Optional[float] = None  # seconds kept from the (cut) start
    short_side: Optional[int] = None  # re-encode so that the shorter side has this many pixels
    fps: Optional[float] = None  # re-encode at this frame rate
    # re-encode with a key frame at least every this many frames: the loader's decoder then restarts at the key
    # frame before a sampled frame instead of decoding all the frames before it (pipeline.data.decode.video_frames)
    keyint: Optional[int] = None
    codec: str = "libx264"
    crf: int = 23
    jpeg_quality: int = 90

    def touches_video(self, start: Optional[float], end: Optional[float]) -> bool:
        return bool((self.clip and (start is not None or end is not None)) or self.max_duration or self.short_side
                    or self.fps or self.keyint)


# --------------------------------------------------------------------------------------------------------- reading
def retried(fn: Callable[[], T], retry: RetryPolicy, sleep: Callable[[float], None] = time.sleep) -> T:
    """Returns fn(), calling it again after a transient error (anything not in PERMANENT_READ_ERRORS) with
    exponential backoff; a permanent error, or the transient one of the last try, propagates."""
    delay = retry.backoff_s
    for attempt in range(1, retry.attempts + 1):
        try:
            return fn()
        except tuple(PERMANENT_READ_ERRORS):
            raise
        except Exception:  # noqa: BLE001 - anything else is a storage/network hiccup worth another try
            if attempt == retry.attempts:
                raise
            sleep(delay)
            delay = min(delay * 2, retry.max_backoff_s)
    raise AssertionError("retry.attempts must be at least 1")


def read_bytes(url: str, retry: RetryPolicy = RetryPolicy(), sleep: Callable[[float], None] = time.sleep) -> bytes:
    """Returns the whole object at `url`; raises MediaError once a permanent error or the last retry fails."""
    def cat() -> bytes:
        fs, path = url_to_fs(url)
        return fs.cat_file(path)

    try:
        return retried(cat, retry, sleep)
    except tuple(PERMANENT_READ_ERRORS) as e:
        reason = next(r for cls, r in PERMANENT_READ_ERRORS.items() if isinstance(e, cls))
        raise MediaError(reason, f"{url}: {type(e).__name__}: {e}") from None
    except Exception as e:  # noqa: BLE001
        raise MediaError("unreachable", f"{url}: {type(e).__name__}: {e} (after {retry.attempts} tries)") from None


# ------------------------------------------------------------------------------------------------------ validation
def validate(data: bytes, kind_hint: Optional[str], url_ext: str) -> MediaInfo:
    """Returns what the bytes hold; raises MediaError when they are empty or do not decode. Images are checked with
    PIL (verify, then a full load), videos must open in PyAV and yield at least one decoded frame."""
    if not data:
        raise MediaError("empty_file", "zero bytes")
    if kind_hint == "image":
        return _validate_image(data)
    if kind_hint is None:  # no telling extension: an image decoder is cheaper to try than FFmpeg's probing
        try:
            return _validate_image(data)
        except MediaError:
            pass
    return _validate_video(data, url_ext)


def _validate_image(data: bytes) -> MediaInfo:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        with Image.open(io.BytesIO(data)) as im:  # verify() leaves the image unusable; load() catches truncation
            im.load()
            fmt = (im.format or "jpeg").lower()
            return MediaInfo("image", {"jpeg": "jpg", "mpo": "jpg"}.get(fmt, fmt), im.width, im.height)
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
        raise MediaError("corrupt_image", f"{type(e).__name__}: {e}") from None


def _validate_video(data: bytes, url_ext: str) -> MediaInfo:
    import av

    try:
        with av.open(io.BytesIO(data), "r") as container:
            if not container.streams.video:
                raise MediaError("corrupt_video", "no video stream")
            stream = container.streams.video[0]
            frame = next(container.decode(stream), None)
            if frame is None:
                raise MediaError("corrupt_video", "no frame decodes")
            duration = _duration(container, stream)
            fps = float(stream.average_rate) if stream.average_rate else None
            return MediaInfo("video", _video_ext(container.format.name, url_ext), frame.width, frame.height,
                             duration, fps, stream.codec_context.name)
    except MediaError:
        raise
    except Exception as e:  # noqa: BLE001 - FFmpeg errors come in many types
        raise MediaError("corrupt_video", f"{type(e).__name__}: {e}") from None


def _duration(container, stream) -> Optional[float]:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000
    return None


def _video_ext(format_name: str, url_ext: str) -> str:
    """Keeps the URL's extension when it names a video container; else derives one from what FFmpeg detected."""
    from shards.manifest import VIDEO_EXTS

    if url_ext in VIDEO_EXTS:
        return url_ext
    names = format_name.split(",")
    for ext in ("mp4", "webm", "mkv", "avi", "mov"):
        if ext in names or (ext == "mkv" and "matroska" in names):
            return ext
    return "mp4"


# ------------------------------------------------------------------------------------------------------ processing
def process_video(data: bytes, opts: ProcessOptions, start: Optional[float],
                  end: Optional[float]) -> tuple[bytes, dict]:
    """Returns (mp4 bytes, what was done): frames from `start` to `end` (when opts.clip), at most opts.max_duration
    seconds, resized to opts.short_side and resampled to opts.fps, encoded with opts.codec. No audio."""
    import av

    t0 = (start or 0.0) if opts.clip else 0.0
    t1 = end if opts.clip and end is not None else None
    if opts.max_duration:
        t1 = min(t1, t0 + opts.max_duration) if t1 is not None else t0 + opts.max_duration
    try:
        with av.open(io.BytesIO(data), "r") as src:
            stream = src.streams.video[0]
            src_fps = float(stream.average_rate) if stream.average_rate else 25.0
            fps = opts.fps or src_fps
            frames = _frames_between(src, stream, t0, t1)
            out, n = _encode(frames, fps, src_fps, None if t1 is None else t1 - t0, opts)
    except MediaError:
        raise
    except Exception as e:  # noqa: BLE001
        raise MediaError("processing_failed", f"{type(e).__name__}: {e}") from None
    if n == 0:
        raise MediaError("processing_failed", f"no frames between {t0:.3f}s and {t1 if t1 is not None else 'end'}")
    done = {"start": t0, "end": t0 + n / fps, "fps": fps, "frames": n}
    return out, done


def _frames_between(src, stream, t0: float, t1: Optional[float]):
    """Yields (time relative to t0, frame) for decoded frames with t0 <= time < t1."""
    if t0 > 0:
        src.seek(int(t0 / stream.time_base), stream=stream, backward=True, any_frame=False)
    for frame in src.decode(stream):
        if frame.pts is None:
            continue
        t = float(frame.pts * stream.time_base)
        if t < t0 - 1e-6:
            continue
        if t1 is not None and t >= t1 - 1e-6:
            break
        yield t - t0, frame


def _encode(frames, fps: float, src_fps: float, span: Optional[float], opts: ProcessOptions) -> tuple[bytes, int]:
    """Encodes the frames at a constant `fps`: output frame k shows the latest source frame at or before k/fps, for
    every k/fps before the clip's end (`span` seconds, or where the last source frame ends)."""
    import av

    buf = io.BytesIO()
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(buf, "w", format="mp4") as dst:
        out = None
        k = 0
        pending, last_t = None, 0.0  # the latest source frame not yet past an output time, and its time
        for t, frame in frames:
            if out is None:
                out = _video_stream(dst, rate, frame, opts)
            while pending is not None and k / fps < t - 1e-6:
                k = _emit(dst, out, pending, k)
            pending, last_t = frame, t
        end = last_t + 1 / src_fps if span is None else min(span, last_t + 1 / src_fps)
        while pending is not None and k / fps < end - 1e-6:
            k = _emit(dst, out, pending, k)
        if out is not None:
            for packet in out.encode():
                dst.mux(packet)
    return buf.getvalue(), k


def _video_stream(dst, rate: Fraction, first_frame, opts: ProcessOptions):
    w, h = _target_size(first_frame.width, first_frame.height, opts.short_side)
    out = dst.add_stream(opts.codec, rate=rate)
    out.width, out.height, out.pix_fmt = w, h, "yuv420p"
    if opts.codec == "libx264":
        # One thread: each shard task holds one CPU of the cluster. No macroblock-tree rate control: with it this
        # x264 build gives different bytes for the same frames from run to run when other threads are busy, and
        # a resumed job must rebuild a shard byte for byte.
        out.options = {"crf": str(opts.crf), "preset": "veryfast", "threads": "1", "x264-params": "mbtree=0"}
    if opts.keyint:
        out.options = {**out.options, "g": str(opts.keyint)}
    return out


def _emit(dst, out, frame, k: int) -> int:
    image = frame.reformat(width=out.width, height=out.height, format="yuv420p")
    image.pts = k
    image.time_base = 1 / out.average_rate  # else it keeps the source stream's, where pts k means k of its ticks
    for packet in out.encode(image):
        dst.mux(packet)
    return k + 1


def _target_size(width: int, height: int, short_side: Optional[int]) -> tuple[int, int]:
    """Returns (w, h) with the shorter side = short_side (both even, as yuv420p requires); the source's if None."""
    if short_side:
        scale = short_side / min(width, height)
        width, height = round(width * scale), round(height * scale)
    return max(2, width - width % 2), max(2, height - height % 2)


def process_image(data: bytes, opts: ProcessOptions) -> tuple[bytes, dict]:
    """Returns (jpg bytes, what was done) with the shorter side resized to opts.short_side."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = _target_size(im.width, im.height, opts.short_side)
            rgb = im.convert("RGB").resize((w, h), Image.BICUBIC)
        buf = io.BytesIO()
        rgb.save(buf, format="JPEG", quality=opts.jpeg_quality)
    except Exception as e:  # noqa: BLE001
        raise MediaError("processing_failed", f"{type(e).__name__}: {e}") from None
    return buf.getvalue(), {"width": w, "height": h}
