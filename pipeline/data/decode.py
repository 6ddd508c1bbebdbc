"""Decoders: encoded sample bytes + a `ClipPlan` -> normalized (3, T, S, S) clips (the plan says how). The only module that talks to
PyAV, PIL and DALI.

Two implementations of one protocol (`Decoder.decode(samples) -> (video, failures)`):
- `CpuDecoder`: PyAV (codec threads) for video, PIL for images; runs inside the loader's worker processes, so it is
  multi-process through the DataLoader.
- `DaliDecoder`: nvidia-dali. With device "gpu" the bytes are decoded on the GPU (NVDEC, mixed backend), the planned
  frames picked, cropped, resized, flipped and normalized there, and the batch handed over as a CUDA tensor by a
  device-to-device copy (never through the host). With device "cpu" the same pipeline runs on DALI's CPU backend,
  which reads VP8/VP9/MJPEG but not H.264: that is how CI exercises this code path without a GPU.
Both take the plan computed by the stream (same frames, box and flip), so they agree within their rounding.

`probe` reads a container's header (frame count, rate, size) without decoding; the stream plans with it and counts
what cannot be read.
"""
from __future__ import annotations

import bisect
import io
from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

import numpy as np
import torch

from pipeline.data.transforms import ClipPlan, normalized, planned_pixels

VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "avi", "mov", "m4v")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class DecodeError(Exception):
    """A sample that cannot be used; `kind` is the skip counter it goes to (corrupt_video, empty_video, ...)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class MediaInfo:
    frames: int
    fps: float
    width: int
    height: int


@dataclass
class EncodedSample:
    """One sample as it leaves the stream: its media bytes and the plan of what to take from them."""

    key: str
    media: str  # "video" | "image"
    data: bytes
    plan: ClipPlan


class Decoder(Protocol):
    def decode(self, samples: Sequence[EncodedSample]) -> tuple[torch.Tensor, list[tuple[int, str]]]:
        """Returns ((B', 3, T, S, S) clips of the samples that decoded, [(index, skip kind)] of those that did not)."""
        ...


# ---------------------------------------------------------------------------------------------------------- probing
def probe(data: bytes, media: str) -> MediaInfo:
    """Returns the frame count, rate and size of encoded `media` bytes; raises DecodeError for unusable ones."""
    return _probe_video(data) if media == "video" else _probe_image(data)


def _probe_video(data: bytes) -> MediaInfo:
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            if container.format.name.endswith("_pipe") or container.format.name == "image2":
                raise DecodeError("wrong_type", f"a still image ({container.format.name}) where a video belongs")
            if not container.streams.video:
                raise DecodeError("empty_video", "no video stream in the container")
            stream = container.streams.video[0]
            frames = stream.frames or sum(1 for p in container.demux(stream) if p.size)
            rate = stream.average_rate or stream.guessed_rate or 0
            width, height = stream.codec_context.width, stream.codec_context.height
    except DecodeError:
        raise
    except Exception as e:  # PyAV raises many kinds (InvalidDataError, ValueError, ...) for a broken container
        raise DecodeError("corrupt_video", f"unreadable video container: {e}") from None
    if frames <= 0:
        raise DecodeError("empty_video", "the video has no frames")
    if width <= 0 or height <= 0:
        raise DecodeError("corrupt_video", f"bad frame size {width}x{height}")
    return MediaInfo(int(frames), float(rate), int(width), int(height))


def _probe_image(data: bytes) -> MediaInfo:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Exception as e:
        raise DecodeError("corrupt_image", f"unreadable image: {e}") from None
    return MediaInfo(1, 0.0, int(width), int(height))


# ------------------------------------------------------------------------------------------------------ CPU (PyAV)
def video_frames(data: bytes, indices: Sequence[int], threads: int = 0) -> np.ndarray:
    """Returns the frames at `indices` (in that order, repeats allowed) as (T, H, W, 3) uint8 RGB.

    Decoding is what a clip costs, so no frame is decoded that need not be. The packets are read first (no
    decoding), which gives each frame's presentation index and the key frames. The decoder then runs up to the last
    wanted frame, except that where a wanted frame lies past a key frame at least `SEEK_MIN_SKIP` frames beyond the
    decoder's position, it is flushed and restarted at that key frame. A clip with one key frame decodes as it
    always did; a long clip with short GOPs decodes a few GOPs instead of all of it (bench/RESULTS.md). In H.264,
    the packets of non-reference pictures that are not wanted are not decoded at all: no other picture is predicted
    from them (nal_ref_idc 0), and x264's B-frames are about half of a clip's frames. Frames are the same either way:
    decoding restarts only at key frames, a frame that leads an open GOP after a restart is never kept, and a
    dropped picture is one nothing refers to.
    """
    import av

    wanted = sorted(set(indices))
    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            stream.codec_context.thread_count = threads
            packets = [p for p in container.demux(stream) if p.size]
            try:
                kept = _decoded_frames(stream.codec_context, packets, wanted, _nal_reader(stream.codec_context))
            except _FallingStamps:  # the container's timestamps are not the frames' (AVI with B-frames)
                stream.codec_context.flush_buffers()
                kept = _decoded_frames(stream.codec_context, packets, wanted, stamps=False)
    except Exception as e:
        raise DecodeError("corrupt_video", f"video decoding failed: {e}") from None
    if len(kept) < len(wanted):
        raise DecodeError("corrupt_video", f"only {len(kept)} of the {len(wanted)} planned frames decoded")
    return np.stack([kept[i] for i in indices])


# restarting the decoder at a key frame pays off only when it skips at least this many frames of decoding
SEEK_MIN_SKIP = 8


class _FallingStamps(Exception):
    """The decoder gave frames with falling timestamps: the packets' timestamps do not order the frames."""


def _decoded_frames(codec, packets: list, targets: list, nals: Optional["_NalReader"] = None,
                    stamps: bool = True) -> dict:
    """{index: RGB frame} of the sorted presentation indices `targets`, decoding `packets` (in decode order); with
    `nals` (H.264), unwanted packets of non-reference pictures are passed over. Frames are placed by their
    timestamps where these can say (`_presentation_indices`), else (or when not `stamps`) counted as they come;
    raises _FallingStamps when timestamps that looked usable come out of the decoder out of order."""
    from av.video.reformatter import VideoReformatter

    index_of = _presentation_indices(packets) if stamps else None
    keys = [(index_of[p.pts], j) for j, p in enumerate(packets) if p.is_keyframe and p.pts in index_of] \
        if index_of else []
    wanted = set(targets)
    unused = {j for j, p in enumerate(packets) if index_of.get(p.pts) not in wanted and nals.disposable(p)} \
        if index_of and nals else set()
    rgb = VideoReformatter()  # one colour converter for the clip: a frame's own is built anew for each frame
    kept: dict[int, np.ndarray] = {}
    position, j, emitted, drained, last = 0, 0, 0, False, -1
    for target in targets:
        k = bisect.bisect_right(keys, (target, len(packets))) - 1
        if k >= 0 and keys[k][0] - position >= SEEK_MIN_SKIP and keys[k][1] > j:
            codec.flush_buffers()  # frames in flight are dropped: all lie before the key frame
            position, j, last = keys[k] + (-1,)
        while target not in kept and target >= position and not drained:
            if j in unused:
                j += 1
                continue
            if j < len(packets):
                frames, j = codec.decode(packets[j]), j + 1
            else:  # the end: the frames still held back for reordering or in other threads
                frames, drained = codec.decode(None), True
            for frame in frames:
                index = index_of.get(frame.pts) if index_of else emitted
                emitted += 1
                if index is None:
                    continue
                if index <= last:
                    raise _FallingStamps()
                last = index
                if index in wanted and index >= position and index not in kept:  # not a leading frame of an open GOP
                    kept[index] = rgb.reformat(frame, format="rgb24").to_ndarray()
                position = max(position, index + 1)
    return kept


class _NalReader:
    """Reads the NAL unit headers of H.264 packets stored length-prefixed (mp4, matroska: avcC), the prefix size
    taken from the codec's extradata."""

    def __init__(self, length_size: int):
        self.length_size = length_size

    def headers(self, data: bytes) -> list[int]:
        """The first byte of each NAL unit of `data` (none when the prefixes do not add up)."""
        out, i, n = [], 0, self.length_size
        while i + n < len(data):
            size = int.from_bytes(data[i:i + n], "big")
            if size == 0 or i + n + size > len(data):
                return []
            out.append(data[i + n])
            i += n + size
        return out

    def disposable(self, packet) -> bool:
        """True for a packet of slices that all have nal_ref_idc 0 (a picture no other is predicted from)."""
        slices = [h for h in self.headers(bytes(packet)) if 1 <= h & 0x1F <= 5]
        return bool(slices) and all(h & 0x60 == 0 for h in slices)


def _nal_reader(codec) -> Optional[_NalReader]:
    """A NAL reader for length-prefixed H.264, else None (start-code streams, as in AVI, and other codecs keep
    every packet)."""
    extra = bytes(codec.extradata or b"")
    if codec.name != "h264" or len(extra) < 5 or extra[0] != 1:
        return None
    return _NalReader((extra[4] & 3) + 1)


def _presentation_indices(packets: list) -> Optional[dict]:
    """{pts: presentation index} from the packets' timestamps, or None when they cannot say (a packet without a
    pts, repeated ones, a first packet that is not a key frame): then frames are counted in output order and no
    restart happens. Packets the container marks to be discarded (an edit list's leading frames) are decoded but
    get no index, as their frames are never shown."""
    stamps = [p.pts for p in packets if not p.is_discard]
    if not packets or None in stamps or len(set(stamps)) != len(stamps) or not packets[0].is_keyframe:
        return None
    return {pts: i for i, pts in enumerate(sorted(stamps))}


def image_frames(data: bytes, count: int) -> np.ndarray:
    """Returns the image as `count` identical frames (T, H, W, 3) uint8 RGB: an image is a 1-frame clip."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            rgb = np.asarray(image.convert("RGB"))
    except Exception as e:
        raise DecodeError("corrupt_image", f"image decoding failed: {e}") from None
    return np.broadcast_to(rgb, (count,) + rgb.shape)


class CpuDecoder:
    """PyAV/PIL decoding and torch transforms on the CPU, one sample at a time (the workers give the parallelism)."""

    def __init__(self, threads: int = 1):
        self.threads = threads

    def pixels_one(self, sample: EncodedSample) -> torch.Tensor:
        """Returns the sample's planned (3, T, S, S) uint8 pixels, not normalized (what loader workers hand over)."""
        plan = sample.plan
        if sample.media == "video":
            frames = video_frames(sample.data, plan.indices, self.threads)
        else:
            frames = image_frames(sample.data, len(plan.indices))
        return planned_pixels(torch.from_numpy(np.ascontiguousarray(frames)), plan)

    def decode_one(self, sample: EncodedSample) -> torch.Tensor:
        """Returns the sample's planned (3, T, S, S) float clip, normalized as the plan says."""
        return normalized(self.pixels_one(sample), sample.plan.mean, sample.plan.std)

    def decode(self, samples: Sequence[EncodedSample]) -> tuple[torch.Tensor, list[tuple[int, str]]]:
        clips, failures = [], []
        for i, sample in enumerate(samples):
            try:
                clips.append(self.decode_one(sample))
            except DecodeError as e:
                failures.append((i, e.kind))
        return _stacked(clips, samples), failures


def _stacked(clips: list[torch.Tensor], samples: Sequence[EncodedSample]) -> torch.Tensor:
    if clips:
        return torch.stack(clips)
    plan = samples[0].plan if samples else ClipPlan((0,), (0, 0, 1, 1), False, 1)
    return torch.empty((0, 3, len(plan.indices), plan.size, plan.size))


# ----------------------------------------------------------------------------------------------------------- DALI
def nvdec_ready(data: bytes) -> bytes:
    """Returns the video with the H.264 SPS frame cropping removed (a remux through FFmpeg's h264_metadata
    bitstream filter, no decoding); other codecs, uncropped streams and anything PyAV cannot remux come back as is.

    Why: an H.264 frame whose width or height is not a multiple of 16 is coded larger and cropped by the SPS
    (340x256 is coded 352x256). DALI's video decoder caches NVDEC decoders by coded size but files them under the
    cropped size, so such clips never find a cached decoder and each one creates a new NVDEC decoder, serialized in
    the driver (~70 ms per clip on an H100, whatever the threads: ~11 clips/s). Uncropped, the decoder is reused.
    The container still gives the display size, and DALI converts only that top-left area, so the frames and the
    planned boxes are unchanged.
    """
    import av

    try:
        with av.open(io.BytesIO(data)) as source:
            stream = source.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            if stream.codec_context.name != "h264" or (width % 16 == 0 and height % 16 == 0):
                return data
            out = io.BytesIO()
            with av.open(out, "w", format="mp4") as target:
                copy = target.add_stream_from_template(stream)
                bsf = av.bitstream.BitStreamFilterContext(
                    "h264_metadata=crop_left=0:crop_right=0:crop_top=0:crop_bottom=0", stream, copy)
                for packet in source.demux(stream):
                    for filtered in bsf.filter(packet if packet.size else None):
                        filtered.stream = copy
                        target.mux(filtered)
        return out.getvalue()
    except Exception:  # not remuxable: DALI decodes (or rejects) the original
        return data


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


class DaliDecoder:
    """DALI pipelines (one for videos, one for images, built on first use) fed through external_source.

    Throughput comes from concurrency: DALI's video decoder decodes the samples of one run in parallel, one sample
    per thread of its pool, and each thread works through its clip frame by frame (NVDEC decode, colour conversion,
    a stream synchronize) up to the last planned frame. So a run should hold many samples (`max_batch`, several
    training batches: see `pipeline.data.loader.DaliSettings`) and the pool many threads; the threads mostly wait
    on the GPU, so they are not pinned to cores (`affine=False`), where they would fight the DataLoader workers.
    `decode` is synchronous; the loader overlaps several decoders in background threads.
    """

    def __init__(self, device: str = "gpu", max_batch: int = 32, threads: int = 8, device_id: Optional[int] = None):
        if not dali_available():
            raise RuntimeError("decoder 'dali' needs nvidia-dali (pip install nvidia-dali-cuda130)")
        if device not in ("gpu", "cpu"):
            raise ValueError(f"DALI device must be 'gpu' or 'cpu', got {device!r}")
        if device == "gpu" and device_id is None:
            device_id = torch.cuda.current_device()
        self.device, self.max_batch, self.threads, self.device_id = device, max_batch, threads, device_id
        self._pipes: dict[tuple[str, int, int], object] = {}

    def decode(self, samples: Sequence[EncodedSample]) -> tuple[torch.Tensor, list[tuple[int, str]]]:
        if not samples:
            return _stacked([], samples), []
        out: list[Optional[torch.Tensor]] = [None] * len(samples)
        failures: list[tuple[int, str]] = []
        for media in ("video", "image"):
            idx = [i for i, s in enumerate(samples) if s.media == media]
            for start in range(0, len(idx), self.max_batch):
                part = idx[start:start + self.max_batch]
                for i, clip in zip(part, self._decoded_or_none([samples[i] for i in part])):
                    out[i] = clip
                    if clip is None:
                        failures.append((i, "corrupt_" + media))
        clips = [c for c in out if c is not None]
        if clips:
            return torch.stack(clips), sorted(failures)
        return torch.empty((0, 3, len(samples[0].plan.indices), samples[0].plan.size, samples[0].plan.size),
                           device=self._torch_device()), sorted(failures)

    def _decoded_or_none(self, samples: list[EncodedSample]) -> list[Optional[torch.Tensor]]:
        """Decodes the batch; when DALI rejects it, retries sample by sample so one bad sample costs only itself."""
        try:
            return list(self._run(samples))
        except RuntimeError:
            if len(samples) == 1:
                return [None]
        self._pipes.clear()  # a pipeline that raised is not reused
        clips = []
        for s in samples:
            try:
                clips.append(self._run([s])[0])
            except RuntimeError:
                self._pipes.clear()
                clips.append(None)
        return clips

    def _run(self, samples: list[EncodedSample]) -> torch.Tensor:
        media, plan = samples[0].media, samples[0].plan
        pipe = self._pipe(media, len(plan.indices), _dali_look(plan))
        pipe.feed_input("encoded", [np.frombuffer(s.data, np.uint8) for s in samples])
        if media == "video":
            pipe.feed_input("frames", [np.asarray(s.plan.indices, np.int32) for s in samples])
        pipe.feed_input("roi_start", [np.asarray(s.plan.box[1::-1], np.float32) for s in samples])  # (y0, x0)
        pipe.feed_input("roi_end", [np.asarray(s.plan.box[:1:-1], np.float32) for s in samples])  # (y1, x1)
        pipe.feed_input("mirror", [np.asarray(int(s.plan.flip), np.int32) for s in samples])
        (batch,) = pipe.run()
        clips = self._as_torch(batch.as_tensor())
        if media == "image":  # (B, 3, S, S) -> (B, 3, T, S, S): an image is a 1-frame clip repeated to T
            clips = clips.unsqueeze(2).expand(-1, -1, len(plan.indices), -1, -1).contiguous()
        return clips

    def _as_torch(self, tensor) -> torch.Tensor:
        if self.device == "cpu":
            return torch.from_numpy(np.array(tensor))
        from nvidia.dali.plugin.pytorch import feed_ndarray

        out = torch.empty(tensor.shape(), dtype=torch.float32, device=self._torch_device())
        feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(out.device))  # device-to-device copy
        return out

    def _torch_device(self) -> torch.device:
        return torch.device("cpu") if self.device == "cpu" else torch.device("cuda", self.device_id)

    def _pipe(self, media: str, t: int, look: tuple):
        key = (media, t, look)
        if key not in self._pipes:
            pipe = _dali_pipeline(media, look, self.device, batch_size=self.max_batch, num_threads=self.threads,
                                  device_id=self.device_id if self.device == "gpu" else None,
                                  exec_dynamic=True, prefetch_queue_depth=1)
            pipe.build()
            self._pipes[key] = pipe
        return self._pipes[key]


def _dali_look(plan: ClipPlan) -> tuple:
    """What a DALI pipeline is built for, apart from the media and the frame count: size, resize, normalization."""
    return plan.size, plan.interp, plan.antialias, plan.mean, plan.std


def _dali_pipeline(media: str, look: tuple, device: str, **pipeline_kwargs):
    from nvidia.dali import fn, pipeline_def, types

    size, interp, antialias, mean, std = look

    @pipeline_def(**pipeline_kwargs)
    def pipeline():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1, no_copy=False)
        roi_start = fn.external_source(name="roi_start", dtype=types.FLOAT, ndim=1)
        roi_end = fn.external_source(name="roi_end", dtype=types.FLOAT, ndim=1)
        mirror = fn.external_source(name="mirror", dtype=types.INT32, ndim=0)
        backend = "mixed" if device == "gpu" else "cpu"
        if media == "video":
            frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
            pixels = fn.decoders.video(encoded, device=backend, frames=frames, affine=False)
            layout = "CFHW"
        else:
            pixels = fn.decoders.image(encoded, device=backend, output_type=types.RGB)
            layout = "CHW"
        pixels = fn.resize(pixels, size=[size, size], roi_start=roi_start, roi_end=roi_end, roi_relative=False,
                           interp_type=types.INTERP_CUBIC if interp == "bicubic" else types.INTERP_LINEAR,
                           antialias=antialias)
        return fn.crop_mirror_normalize(pixels, mirror=mirror, dtype=types.FLOAT, output_layout=layout,
                                        mean=[255.0 * m for m in mean], std=[255.0 * s for s in std])

    return pipeline()


# ---------------------------------------------------------------------------------------------------------- choice
def resolved_decoder_name(name: str) -> str:
    """Returns "dali" or "cpu" for a config's `auto|cpu|dali`: auto picks DALI where DALI and a GPU are present."""
    if name == "auto":
        return "dali" if dali_available() and torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "dali"):
        raise ValueError(f"data.decoder must be auto, cpu or dali, got {name!r}")
    return name


def dali_device() -> str:
    """Returns where a DALI decoder runs: the GPU where there is one, else DALI's CPU backend (VP8/VP9 only)."""
    return "gpu" if torch.cuda.is_available() else "cpu"
