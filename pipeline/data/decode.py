"""Decoders: encoded sample bytes + a `ClipPlan` -> normalized (3, T, S, S) clips (the plan says how). The only
module that talks to PyAV, PIL and DALI.

Two implementations of one protocol (`Decoder.decode(samples) -> (video, failures)`):
- `CpuDecoder`: PyAV (codec threads) for video, PIL for images; runs inside the loader's worker processes, so it is
  multi-process through the DataLoader.
- `DaliDecoder`: nvidia-dali. With device "gpu" the bytes are decoded on the GPU (NVDEC, mixed backend), the planned
  frames picked, cropped, resized, flipped and normalized there, and the batch handed over as a CUDA tensor by a
  device-to-device copy (never through the host). With device "cpu" the same pipeline runs on DALI's CPU backend,
  which reads VP8/VP9/MJPEG but not H.264: that is how CI exercises this code path without a GPU.
Both take the plan computed by the stream (same frames, box and flip), so they agree within their rounding.

`opened` gives a sample's media as a source opened once: its header (frame count, rate, size: what the stream plans
with, and counts what cannot be read), then the planned frames or the stream DALI gets, without opening it again.
"""
from __future__ import annotations

import bisect
import io
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Optional, Protocol, Sequence

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


# ------------------------------------------------------------------------------------------- opening media once
def opened(data: bytes, media: str) -> "MediaSource":
    """Returns the encoded `media` bytes as a source to plan from (`info`) and to take frames from, opened once (close
    it, or use `with`)."""
    return VideoSource(data) if media == "video" else ImageSource(data)


def probe(data: bytes, media: str) -> MediaInfo:
    """Returns the frame count, rate and size of encoded `media` bytes; raises DecodeError for unusable ones."""
    with opened(data, media) as source:
        return source.info


class MediaSource:
    """What a video and an image source share: `frames(indices, threads)` (subclasses), the plan's pixels from them,
    `with` closing it."""

    def __enter__(self) -> "MediaSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        pass

    def frames(self, indices: Sequence[int], threads: int = 0) -> np.ndarray:
        raise NotImplementedError

    def pixels(self, plan: ClipPlan, threads: int = 0) -> torch.Tensor:
        """The plan's (3, T, S, S) uint8 pixels."""
        return planned_pixels(torch.from_numpy(np.ascontiguousarray(self.frames(plan.indices, threads))), plan)

    def dali_ready(self, sample: EncodedSample) -> EncodedSample:
        """`sample` (of these bytes) as DALI's decoder should get it: see `dali_ready`."""
        return sample


class VideoSource(MediaSource):
    """A video container opened once (PyAV): its header, its packets (read once, never decoded twice), the planned
    frames and the stream DALI should get.

    Why one open: opening a container makes FFmpeg decode its first frame (`avformat_find_stream_info` learns the
    stream from it), about a key frame's decoding, so planning from one open and decoding from another paid for a
    key frame twice per clip. Errors are DecodeErrors of the kind the loader counts.
    """

    def __init__(self, data: bytes):
        self.data = data
        self._container = None
        self._packets: Optional[list] = None

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container, self._packets = None, None

    @property
    def stream(self):
        """The first video stream (opened on first use); raises DecodeError for a container that is not a video."""
        if self._container is None:
            import av

            try:
                container = av.open(io.BytesIO(self.data))
            except Exception as e:  # PyAV raises many kinds (InvalidDataError, ValueError, ...)
                raise DecodeError("corrupt_video", f"unreadable video container: {e}") from None
            problem = _not_a_video(container)
            if problem:
                container.close()
                raise problem
            self._container = container
        return self._container.streams.video[0]

    @property
    def packets(self) -> list:
        """The stream's packets with data, in decode order (read, not decoded)."""
        if self._packets is None:
            stream = self.stream
            try:
                self._packets = [p for p in self._container.demux(stream) if p.size]
            except Exception as e:
                raise DecodeError("corrupt_video", f"unreadable video container: {e}") from None
        return self._packets

    @property
    def info(self) -> MediaInfo:
        """Frame count, rate and size, from the header (the packets are counted where it has no frame count)."""
        stream = self.stream
        frames = stream.frames or len(self.packets)
        rate = stream.average_rate or stream.guessed_rate or 0
        width, height = stream.codec_context.width, stream.codec_context.height
        if frames <= 0:
            raise DecodeError("empty_video", "the video has no frames")
        if width <= 0 or height <= 0:
            raise DecodeError("corrupt_video", f"bad frame size {width}x{height}")
        return MediaInfo(int(frames), float(rate), int(width), int(height))

    def frames(self, indices: Sequence[int], threads: int = 0) -> np.ndarray:
        """Returns the frames at `indices` (in that order, repeats allowed) as (T, H, W, 3) uint8 RGB.

        Decoding is what a clip costs, so no frame is decoded that need not be. The packets give each frame's
        presentation index and the key frames; `decoding_plan` then says which to feed: up to the last wanted
        frame, restarting at key frames to skip whole GOPs, and passing over H.264's unwanted non-reference
        pictures. Frames are the same as decoding everything gives (tests/data/test_data_decode.py).
        """
        wanted = sorted(set(indices))
        stream, packets = self.stream, self.packets
        try:
            codec = stream.codec_context
            if codec.is_open:  # decoded before: start afresh
                codec.flush_buffers()
            else:
                stream.thread_type = "AUTO"
                codec.thread_count = threads
            index_of = _presentation_indices(packets)
            kept = None
            if index_of:
                try:
                    plan = decoding_plan(packets, index_of, wanted, _nal_reader(codec), lambda p: True)
                    kept = _planned_frames(codec, packets, plan, index_of, wanted)
                except _FallingStamps:  # the container's timestamps are not the frames' (AVI with B-frames)
                    codec.flush_buffers()
            if kept is None:
                kept = _frames_in_output_order(codec, packets, wanted)
        except Exception as e:
            raise DecodeError("corrupt_video", f"video decoding failed: {e}") from None
        if len(kept) < len(wanted):
            raise DecodeError("corrupt_video", f"only {len(kept)} of the {len(wanted)} planned frames decoded")
        return np.stack([kept[i] for i in indices])

    def dali_ready(self, sample: EncodedSample) -> EncodedSample:
        """`sample` (of these bytes) as DALI's video decoder should get it: see `dali_ready`. The packets handed
        on are retimed, so the source lets them go (a later use opens the bytes afresh)."""
        try:
            ready = _dali_video(self.stream, self.packets, sample.plan.indices)
        except Exception:  # not remuxable: DALI decodes (or rejects) the original
            return sample
        finally:
            self.close()
        if ready is None:
            return sample
        data, indices = ready
        return EncodedSample(sample.key, sample.media, data, replace(sample.plan, indices=indices))


def _not_a_video(container) -> Optional[DecodeError]:
    """Why an opened container is no video to decode (a still image, no video stream), or None."""
    name = container.format.name
    if name.endswith("_pipe") or name == "image2":
        return DecodeError("wrong_type", f"a still image ({name}) where a video belongs")
    if not container.streams.video:
        return DecodeError("empty_video", "no video stream in the container")
    return None


class ImageSource(MediaSource):
    """An image (PIL), read when its frames are asked for; DALI gets it as it is."""

    def __init__(self, data: bytes):
        self.data = data

    @property
    def info(self) -> MediaInfo:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(self.data)) as image:
                width, height = image.size
        except Exception as e:
            raise DecodeError("corrupt_image", f"unreadable image: {e}") from None
        return MediaInfo(1, 0.0, int(width), int(height))

    def frames(self, indices: Sequence[int], threads: int = 0) -> np.ndarray:
        """The image as one frame per index: see `image_frames`."""
        return image_frames(self.data, len(indices))


# ------------------------------------------------------------------------------------------------------ CPU (PyAV)
def video_frames(data: bytes, indices: Sequence[int], threads: int = 0) -> np.ndarray:
    """Returns the frames at `indices` (in that order, repeats allowed) as (T, H, W, 3) uint8 RGB: see
    `VideoSource.frames`."""
    with VideoSource(data) as source:
        return source.frames(indices, threads)


# restarting the decoder at a key frame pays off only when it skips at least this many frames of decoding
SEEK_MIN_SKIP = 8


@dataclass(frozen=True)
class Span:
    """A run of decoding: from the frame at presentation index `start` (0, or a key frame's), the packets at
    `positions` (decode order)."""

    start: int
    positions: tuple[int, ...]


def decoding_plan(packets: list, index_of: dict, targets: list, nals: Optional["_NalReader"],
                  restarts_at: Callable[[object], bool]) -> list[Span]:
    """Returns the spans of packets a decoder must be fed to output the sorted presentation indices `targets`.

    A span runs from the first packet, or from a key frame that `restarts_at` accepts where one lies at least
    `SEEK_MIN_SKIP` frames past the previous target, through each of its targets' own packets (a picture is predicted
    only from pictures decoded before it). The packets of non-reference H.264 pictures (nal_ref_idc 0, with
    `nals`) that are not wanted are left out: no other picture is predicted from them, and x264's B-frames are
    about half of a clip's frames. A long clip with short GOPs decodes a few GOPs instead of all of it
    (bench/RESULTS.md)."""
    position_of = {index_of[p.pts]: j for j, p in enumerate(packets) if p.pts in index_of}
    keys = [(index_of[p.pts], j) for j, p in enumerate(packets)
            if p.is_keyframe and p.pts in index_of and restarts_at(p)]
    runs: list[list[int]] = []  # [start index, first packet, last packet]
    previous = -1
    for target in targets:
        k = bisect.bisect_right(keys, (target, len(packets))) - 1
        if k >= 0 and keys[k][0] - previous > SEEK_MIN_SKIP and (not runs or keys[k][1] > runs[-1][2]):
            runs.append([keys[k][0], keys[k][1], position_of[target]])
        elif runs:
            runs[-1][2] = max(runs[-1][2], position_of[target])
        else:
            runs.append([0, 0, position_of[target]])
        previous = target
    wanted = set(targets)
    return [Span(start, tuple(j for j in range(first, last + 1)
                              if not (nals and index_of.get(packets[j].pts) not in wanted
                                      and nals.disposable(packets[j]))))
            for start, first, last in runs]


class _FallingStamps(Exception):
    """The decoder gave frames with falling timestamps: the packets' timestamps do not order the frames."""


def _planned_frames(codec, packets: list, plan: list[Span], index_of: dict, targets: list) -> dict:
    """{index: RGB frame} of the presentation indices `targets`, feeding the plan's spans and draining the decoder
    after each; raises _FallingStamps when the frames come out with falling timestamps (then these cannot place
    them). A frame before its span's start (one that leads an open GOP, predicted from frames not decoded) is never
    kept."""
    from av.video.reformatter import VideoReformatter

    rgb = VideoReformatter()  # one colour converter for the clip: a frame's own is built anew for each frame
    kept: dict[int, np.ndarray] = {}
    wanted = set(targets)
    for n, span in enumerate(plan):
        if n:
            codec.flush_buffers()  # ends the draining, so decoding can start over at the span's key frame
        last = -1
        for frames in _outputs(codec, [packets[j] for j in span.positions]):
            for frame in frames:
                index = index_of.get(frame.pts)
                if index is None:  # a frame the container says is never shown (an edit list's leading frames)
                    continue
                if index <= last:
                    raise _FallingStamps()
                last = index
                if index in wanted and index >= span.start:
                    kept[index] = rgb.reformat(frame, format="rgb24").to_ndarray()
    return kept


def _outputs(codec, packets: list) -> Iterator[list]:
    """The frames the decoder gives for each packet fed, then those it held back (drained at the end)."""
    for packet in packets:
        yield codec.decode(packet)
    yield codec.decode(None)


def _frames_in_output_order(codec, packets: list, targets: list) -> dict:
    """{index: RGB frame} of the presentation indices `targets`, counting frames as the decoder outputs them
    (every packet fed in order, until the last target)."""
    from av.video.reformatter import VideoReformatter

    rgb, kept, wanted, index = VideoReformatter(), {}, set(targets), 0
    for frames in _outputs(codec, packets):
        for frame in frames:
            if index in wanted:
                kept[index] = rgb.reformat(frame, format="rgb24").to_ndarray()
            index += 1
        if len(kept) == len(wanted):
            break
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

    def idr(self, packet) -> bool:
        """True for a packet holding an IDR picture (a key frame that no later picture looks past)."""
        return any(h & 0x1F == 5 for h in self.headers(bytes(packet)))

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

    def pixels_one(self, sample: EncodedSample, source: Optional[MediaSource] = None) -> torch.Tensor:
        """Returns the sample's planned (3, T, S, S) uint8 pixels, not normalized (what loader workers hand over);
        `source`: the sample's media already opened (`opened`), else it is opened here."""
        if source is not None:
            return source.pixels(sample.plan, self.threads)
        with opened(sample.data, sample.media) as own:
            return own.pixels(sample.plan, self.threads)

    def decode_one(self, sample: EncodedSample, source: Optional[MediaSource] = None) -> torch.Tensor:
        """Returns the sample's planned (3, T, S, S) float clip, normalized as the plan says."""
        return normalized(self.pixels_one(sample, source), sample.plan.mean, sample.plan.std)

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
# the container a trimmed video is written in, by codec; videos of other codecs go to DALI whole
TRIM_CONTAINERS = {"h264": "mp4", "vp8": "webm", "vp9": "webm"}


def dali_ready(sample: EncodedSample) -> EncodedSample:
    """Returns the sample as DALI's video decoder should get it (the loader's workers call this): only the packets
    its planned frames need, with the H.264 SPS frame cropping removed, remuxed, and the plan's frame indices
    renumbered into that stream. Images, and videos that cannot be remuxed, come back as they are.

    Why trim: DALI's `decoders.video` decodes every frame from the first up to the last planned one (no seeking,
    no skipped pictures) and converts each decoded frame to RGB with a stream synchronize (DALI 2.4,
    dali/operators/video/frames_decoder_gpu.cc), so a clip costs the frames its stream holds up to the last
    planned one. The stream handed over holds the spans of `decoding_plan`, restarting only at key frames that
    close their GOP (IDR pictures in H.264, any VP8/VP9 key frame), so that joined GOPs decode as one stream, and
    without the unwanted non-reference pictures. Its frames are numbered afresh in presentation order, which is
    how DALI counts them (the i-th frame it outputs).

    Why uncrop: an H.264 frame whose width or height is not a multiple of 16 is coded larger and cropped by the
    SPS (340x256 is coded 352x256). DALI's video decoder caches NVDEC decoders by coded size but files them under
    the cropped size, so such clips never find a cached decoder and each one creates a new NVDEC decoder,
    serialized in the driver (~70 ms per clip on an H100, whatever the threads: ~11 clips/s). Uncropped (FFmpeg's
    h264_metadata bitstream filter, no decoding), the decoder is reused. The container still gives the display
    size, and DALI converts only that top-left area, so the frames and the planned boxes are unchanged.
    """
    with opened(sample.data, sample.media) as source:
        return source.dali_ready(sample)


def _dali_video(stream, packets: list, indices: Sequence[int]) -> Optional[tuple[bytes, tuple[int, ...]]]:
    """(video bytes, frame indices) for DALI from an opened video's stream and packets, None when the video is fine
    as it is: see `dali_ready`."""
    import av

    codec = stream.codec_context
    cropped = codec.name == "h264" and (codec.width % 16 or codec.height % 16)
    index_of = _presentation_indices(packets)
    nals = _nal_reader(codec)
    kept = list(range(len(packets)))
    if index_of and codec.name in TRIM_CONTAINERS and (nals or codec.name != "h264"):
        plan = decoding_plan(packets, index_of, sorted(set(indices)), nals,
                             nals.idr if nals else lambda p: True)
        kept = [j for span in plan for j in span.positions]
    trimmed = len(kept) < len(packets)
    if not trimmed and not cropped:
        return None
    out = io.BytesIO()
    with av.open(out, "w", format=TRIM_CONTAINERS[codec.name] if trimmed else "mp4") as target:
        copy = target.add_stream_from_template(stream)
        uncrop = av.bitstream.BitStreamFilterContext(
            "h264_metadata=crop_left=0:crop_right=0:crop_top=0:crop_bottom=0", stream, copy) if cropped else None
        chosen = [packets[j] for j in kept]
        if trimmed:
            indices = _renumbered(chosen, index_of, indices)
        for packet in chosen + [None]:
            for ready in (uncrop.filter(packet) if uncrop else [packet] if packet else []):
                ready.stream = copy
                target.mux(ready)
    return out.getvalue(), tuple(indices)


def _renumbered(chosen: list, index_of: dict, indices: Sequence[int]) -> list[int]:
    """Gives the `chosen` packets (decode order) consecutive timestamps in their presentation order, decode
    timestamps that rise and never pass them, and returns `indices` as positions in that order."""
    stamps = sorted(p.pts for p in chosen)
    rank = {pts: r for r, pts in enumerate(stamps)}  # a chosen packet's position in presentation order
    step = min((b - a for a, b in zip(stamps, stamps[1:]) if b > a), default=1)
    ranks = [rank[p.pts] for p in chosen]
    delay = max(k - r for k, r in enumerate(ranks))  # how far decoding runs ahead of presentation
    pts_of = {i: pts for pts, i in index_of.items()}
    for k, (packet, r) in enumerate(zip(chosen, ranks)):
        packet.pts, packet.dts = r * step, (k - delay) * step
    return [rank[pts_of[i]] for i in indices]


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
            raise RuntimeError("data.decoder dali and hybrid need nvidia-dali (pip install nvidia-dali-cuda130)")
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
    """Returns "dali", "hybrid" or "cpu" for a config's `auto|cpu|dali|hybrid`: auto picks DALI where DALI and a
    GPU are present."""
    if name == "auto":
        return "dali" if dali_available() and torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "dali", "hybrid"):
        raise ValueError(f"data.decoder must be auto, cpu, dali or hybrid, got {name!r}")
    return name


def dali_device() -> str:
    """Returns where a DALI decoder runs: the GPU where there is one, else DALI's CPU backend (VP8/VP9 only)."""
    return "gpu" if torch.cuda.is_available() else "cpu"
