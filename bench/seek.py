"""The cost of a clip when its frames are sampled across it: the CPU decoder (`pipeline.data.decode.video_frames`,
which decodes what `decoding_plan` says: restarting at the key frame before a sampled frame, passing over unwanted
non-reference pictures) against decoding every frame up to the last sampled one; and the frames DALI's video decoder
goes through (it decodes from the first frame to the last sampled one) in the whole stream and in the stream
`dali_ready` trims for it.

    python -m bench.seek [--size 256] [--clips 300x30 300x60 750x50 90x250] [--frames 8] [--threads 1]
                         [--content noise|textured] [--repeats 5]

Each clip is synthetic H.264 (`shards.synth.encode_mp4`: libx264 veryfast with its B-frames, closed GOPs) of
FRAMESxKEYINT: that many frames at 30 fps with a key frame every KEYINT frames (what `videomamba shard --keyint`
writes; WebVid's clips run 10-30 s with a key frame every 1-5 s). --content: `noise`, a rolling noise texture (x264
puts few B-frames in it), or `textured`, bench.data's blocks moving under noise (about half B-frames, as in footage).
The sampled frames are the middles of --frames equal segments (the training sampler picks one frame inside each).
Times are medians over --repeats, one decoding thread (a DataLoader worker's). Prints a markdown table; the frames
are checked equal to the in-order decode's, and the trimmed stream's to the whole one's, before anything is timed.
"""
from __future__ import annotations

import argparse
import io
import statistics
import time

import av
import numpy as np

from pipeline.data.decode import EncodedSample, dali_ready, video_frames
from pipeline.data.transforms import ClipPlan
from shards.synth import encode_mp4


def synthetic_clip(frames: int, keyint: int, size: int, content: str = "noise") -> bytes:
    """H.264 in mp4 (the synthetic corpus's encoder) of `content` (every frame differs), a key frame every `keyint`
    frames."""
    if content == "textured":
        from bench.data import source_clip

        pixels = source_clip(0, frames, size, size)
    else:
        base = np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)
        pixels = np.stack([np.roll(base, 3 * i, axis=1) for i in range(frames)])
    return encode_mp4(pixels, fps=30, options={"g": str(keyint)})


def dali_frames(data: bytes, indices: list[int]) -> tuple[int, int]:
    """Frames DALI's decoder goes through for `indices` (up to the last one) in the whole stream and in the one
    `dali_ready` hands it; raises SystemExit when the trimmed stream's frames are not the planned ones."""
    plan = ClipPlan(tuple(indices), (0, 0, 2, 2), False, 2)
    ready = dali_ready(EncodedSample("clip", "video", data, plan))
    whole, trimmed = frames_of(data), frames_of(ready.data)
    if not all(np.array_equal(trimmed[j], whole[i]) for i, j in zip(indices, ready.plan.indices)):
        raise SystemExit("the trimmed stream's frames at the renumbered indices are not the planned ones")
    return max(indices) + 1, max(ready.plan.indices) + 1


def frames_of(data: bytes) -> list[np.ndarray]:
    with av.open(io.BytesIO(data)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]


def in_order(data: bytes, indices: list[int], threads: int) -> list[np.ndarray]:
    """The frames at `indices`, decoding every frame up to the last (the decoder before restarts)."""
    wanted, kept = set(indices), {}
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = threads
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                kept[i] = frame.to_ndarray(format="rgb24")
            if i >= max(indices):
                break
    return [kept[i] for i in indices]


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--clips", nargs="+", default=["90x250", "90x30", "300x30", "300x60", "750x50"],
                        metavar="FRAMESxKEYINT")
    parser.add_argument("--frames", type=int, default=8, help="frames sampled per clip")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--content", choices=["noise", "textured"], default="noise")
    args = parser.parse_args(argv)
    print(f"{args.size}² H.264 ({args.content}), {args.frames} frames sampled, {args.threads} decoding thread(s), "
          f"median of {args.repeats}\n")
    print("| clip frames | key frame every | planned ms | in order ms | speed-up | DALI frames, whole | trimmed |\n"
          "|---:|---:|---:|---:|---:|---:|---:|")
    for spec in args.clips:
        frames, keyint = (int(v) for v in spec.split("x"))
        data = synthetic_clip(frames, keyint, args.size, args.content)
        indices = [int((k + 0.5) * frames / args.frames) for k in range(args.frames)]
        got = video_frames(data, indices, args.threads)
        if not all(np.array_equal(a, b) for a, b in zip(got, in_order(data, indices, args.threads))):
            raise SystemExit(f"{spec}: the planned decoding's frames differ from the in-order decode's")
        whole, trimmed = dali_frames(data, indices)
        ours = median_ms(lambda: video_frames(data, indices, args.threads), args.repeats)
        plain = median_ms(lambda: in_order(data, indices, args.threads), args.repeats)
        print(f"| {frames} | {keyint} | {ours:.0f} | {plain:.0f} | {plain / ours:.2f}x | {whole} | {trimmed} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
