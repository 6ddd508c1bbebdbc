"""Write a synthetic video-text corpus that a model can learn from on a CPU: real mp4 clips of moving shapes, each
with several captions that say exactly what moves ("two red squares move to the left slowly on a white background"),
jpg image-text pairs (still shapes) for stage 2, and held-out retrieval annotations in the MSRVTT 1k-A and MSVD formats.

A clip shows 1-3 shapes of one kind and colour moving together in one direction at one speed over a plain background;
every caption names all six attributes (shape, colour, count, direction, speed, background). Some colour x shape
pairs (HELD_OUT_PAIRS, e.g. red circles) appear only in the eval split, so retrieval on it needs generalisation.
The same --seed gives the same files (jsonl byte-identical, the same decoded frames); any --workers count gives the
same output.

Writes (DIR may be any fsspec URL; with a memory:// URL use --workers 1):
  DIR/videos.jsonl               {"key", "path", "captions", "duration", "fps", "width", "height", "attributes"}
  DIR/videos/<key>.mp4           the training clips (yuv420p, H.264 or VP9)
  DIR/images.jsonl               {"key", "path", "captions", "width", "height", "attributes"}
  DIR/images/<key>.jpg           still shapes, captions without motion
  DIR/eval/msrvtt_test.json      [{"video": "<key>.mp4", "caption": "<one caption>"}, ...]
  DIR/eval/msvd_test.json        [{"video": "<key>.mp4", "caption": ["...", ...]}, ...]
  DIR/eval/videos/<key>.mp4      the held-out clips;  DIR/eval/videos.jsonl  their records (as videos.jsonl)
  DIR/corpus.json                the settings and the held-out pairs

Example: videomamba synth --out data/synth --videos 200 --images 50 --seed 0 --size 64 --frames 24 --codec vp9
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import multiprocessing
import os
import time
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator, Optional

import av
import fsspec
import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.errors import ConfigError

# ------------------------------------------------------------------------------------------------- the attributes
SHAPES = ("circle", "square", "triangle", "diamond")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds"}
COLORS = {  # RGB, far apart from each other and from every background
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 230),
    "yellow": (240, 210, 30),
    "purple": (160, 30, 220),
    "orange": (245, 130, 20),
}
BACKGROUNDS = {"white": (245, 245, 245), "black": (12, 12, 12), "gray": (128, 128, 128)}
COUNTS = (1, 2, 3)
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy) in image coordinates
SPEEDS = {"slow": 0.2, "fast": 0.5}  # distance travelled over the whole clip, as a fraction of the frame size

# Colour x shape pairs that only the eval split shows: every colour keeps three shapes in training, every shape
# at least four colours, so each word is learnt; only these combinations are new at eval time.
HELD_OUT_PAIRS = (
    ("red", "circle"), ("green", "square"), ("blue", "triangle"),
    ("yellow", "diamond"), ("purple", "circle"), ("orange", "square"),
)

# ------------------------------------------------------------------------------------------------------ captions
# Placeholders: {n} count word, {color}, {shapes} noun in number, {s} verb ending in number, {dir_to} ("to the
# left", "upward"), {dir} ("left", "up"), {adv} ("slowly"), {adj} ("slow"), {bg}. The count word always comes
# right before "{adj} {color}" or "{color}", so a caption parses back to its attributes.
VIDEO_TEMPLATES = (
    "{n} {color} {shapes} move{s} {dir_to} {adv} on a {bg} background",
    "a {bg} background with {n} {color} {shapes} sliding {dir} {adv}",
    "{n} {adj} {color} {shapes} heading {dir} across a {bg} screen",
    "on a {bg} background, {n} {color} {shapes} {adv} travel{s} {dir_to}",
    "{n} {color} {shapes} glide{s} {dir} {adv} over a plain {bg} backdrop",
    "video of {n} {color} {shapes} going {dir} {adv} against a {bg} background",
    "{adv}, {n} {color} {shapes} drift{s} {dir_to} on {bg}",
    "{n} {adj} {color} {shapes} on a {bg} background moving {dir}",
)
IMAGE_TEMPLATES = (
    "{n} {color} {shapes} on a {bg} background",
    "a {bg} background with {n} {color} {shapes}",
    "a picture of {n} {color} {shapes} against {bg}",
    "{n} {color} {shapes} resting still on a plain {bg} backdrop",
    "still image of {n} {color} {shapes} on {bg}",
)
COUNT_WORDS = {1: ("a", "one"), 2: ("two",), 3: ("three",)}
DIRECTION_PHRASES = {"left": "to the left", "right": "to the right", "up": "upward", "down": "downward"}
SPEED_WORDS = {"slow": ("slowly", "slow"), "fast": ("quickly", "fast")}  # (adverb, adjective)

# ------------------------------------------------------------------------------------------------------- encoding
# our codec name -> (FFmpeg encoder, encoder options). Both give byte-identical output run after run with one thread;
# x264's macroblock-tree rate control does not at 32 px (a few clips in ten differ between runs), so it is off.
ENCODERS = {
    "h264": ("libx264", {"preset": "veryfast", "crf": "18", "x264-params": "mbtree=0"}),
    "vp9": ("libvpx-vp9", {"crf": "30", "b": "0", "deadline": "realtime", "cpu-used": "8"}),
}
SPLIT_IDS = {"train": 0, "eval": 1, "image": 2}  # mixed into the seed of each item's random generator


@dataclass(frozen=True)
class Attributes:
    """What one clip or image shows; `direction` and `speed` are None for images."""

    shape: str
    color: str
    count: int
    background: str
    direction: Optional[str] = None
    speed: Optional[str] = None

    def as_dict(self) -> dict:
        d = {"shape": self.shape, "color": self.color, "count": self.count, "direction": self.direction,
             "speed": self.speed, "background": self.background}
        return {k: v for k, v in d.items() if v is not None}


@dataclass(frozen=True)
class Item:
    """One file to write: its split, index (with the seed, the whole randomness of the item) and attributes."""

    split: str  # train | eval | image
    index: int
    attributes: Attributes

    @property
    def key(self) -> str:
        return {"train": "synth", "eval": "eval", "image": "image"}[self.split] + f"_{self.index:06d}"

    @property
    def path(self) -> str:
        folder = {"train": "videos", "eval": "eval/videos", "image": "images"}[self.split]
        return f"{folder}/{self.key}.{'jpg' if self.split == 'image' else 'mp4'}"


@dataclass(frozen=True)
class Settings:
    """What every item of one corpus shares."""

    out: str
    seed: int
    codec: str = "h264"
    size: int = 64
    frames: int = 24
    fps: int = 8
    captions: int = 5


# ---------------------------------------------------------------------------------------- the split of combinations
def is_held_out(color: str, shape: str) -> bool:
    return (color, shape) in HELD_OUT_PAIRS


def video_combinations(held_out: bool) -> list[Attributes]:
    """Returns every clip attribute combination of the eval split (held_out=True) or of the training split."""
    return [Attributes(shape, color, count, bg, direction, speed)
            for shape, color, count, bg, direction, speed in itertools.product(
                SHAPES, COLORS, COUNTS, BACKGROUNDS, DIRECTIONS, SPEEDS)
            if is_held_out(color, shape) == held_out]


def image_combinations() -> list[Attributes]:
    """Returns every still-image combination; images belong to training, so held-out pairs are left out."""
    return [Attributes(shape, color, count, bg) for shape, color, count, bg in itertools.product(
        SHAPES, COLORS, COUNTS, BACKGROUNDS) if not is_held_out(color, shape)]


def assigned(combos: list[Attributes], n: int, rng: np.random.Generator) -> list[Attributes]:
    """Returns n combinations: shuffled passes over `combos`, so all are distinct while n <= len(combos)."""
    out: list[Attributes] = []
    while len(out) < n:
        out += [combos[i] for i in rng.permutation(len(combos))]
    return out[:n]


def corpus_items(videos: int, images: int, eval_videos: int, seed: int) -> list[Item]:
    """Returns the items of a corpus in file order: training clips, images, eval clips."""
    plan = (("train", videos, video_combinations(False)), ("image", images, image_combinations()),
            ("eval", eval_videos, video_combinations(True)))
    items = []
    for split, n, combos in plan:
        rng = np.random.default_rng([seed, SPLIT_IDS[split]])
        items += [Item(split, i, a) for i, a in enumerate(assigned(combos, n, rng))]
    return items


# ------------------------------------------------------------------------------------------------------ captions
def captions_for(a: Attributes, n: int, rng: np.random.Generator) -> list[str]:
    """Returns n captions (distinct templates while there are enough) that all state every attribute of `a`."""
    templates = VIDEO_TEMPLATES if a.direction is not None else IMAGE_TEMPLATES
    order = list(rng.permutation(len(templates)))
    while len(order) < n:
        order += list(rng.permutation(len(templates)))
    captions = []
    for t in order[:n]:
        words = {"n": str(rng.choice(COUNT_WORDS[a.count])), "color": a.color, "bg": a.background,
                 "shapes": a.shape if a.count == 1 else PLURALS[a.shape], "s": "s" if a.count == 1 else ""}
        if a.direction is not None:
            adverb, adjective = SPEED_WORDS[a.speed]
            words.update(dir=a.direction, dir_to=DIRECTION_PHRASES[a.direction], adv=adverb, adj=adjective)
        captions.append(templates[t].format(**words))
    return captions


# ------------------------------------------------------------------------------------------------------- drawing
def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Returns the pixels inside `shape` of radius r, given offsets dx, dy of pixel centres from its centre."""
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.8 * r
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if shape == "triangle":  # apex up, base at 0.6 r below the centre
        return (dy >= -r) & (dy <= 0.6 * r) & (np.abs(dx) <= 0.6 * (dy + r))
    raise ValueError(f"unknown shape {shape!r}")


def shape_tracks(a: Attributes, size: int, frames: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Returns the centres (count, frames, 2) as (x, y) and the radius of the shapes of one clip or image.

    The shapes sit in lanes across the direction of motion (so they never touch and can be counted), each at its
    own place along it, and move together; the path stays inside the frame.
    """
    dx, dy = DIRECTIONS[a.direction] if a.direction is not None else DIRECTIONS[str(rng.choice(list(DIRECTIONS)))]
    axis, sign = (0, dx) if dx else (1, dy)
    travel = SPEEDS[a.speed] * size if a.speed is not None else 0.0
    edge = 2.0
    lane = (size - 2 * edge) / a.count
    r = min(size * rng.uniform(0.10, 0.13), lane / 2 - 2.5)  # gaps of 3+ px
    steps = np.linspace(0.0, 1.0, frames) if frames > 1 else np.zeros(1)
    tracks = np.empty((a.count, frames, 2))
    for i in range(a.count):
        across = edge + lane * (i + 0.5) + rng.uniform(-1, 1) * 0.5 * (lane / 2 - r - 1)
        start = rng.uniform(r + 1, size - r - 1 - travel)
        along = start + travel * steps if sign > 0 else size - start - travel * steps
        tracks[i, :, axis] = along
        tracks[i, :, 1 - axis] = across
    return tracks, r


def render(a: Attributes, size: int, frames: int, rng: np.random.Generator) -> np.ndarray:
    """Returns the (frames, size, size, 3) uint8 RGB pixels of a clip (frames=1 for an image) showing `a`."""
    tracks, r = shape_tracks(a, size, frames, rng)
    centres = np.arange(size) + 0.5
    clip = np.empty((frames, size, size, 3), np.uint8)
    clip[:] = BACKGROUNDS[a.background]
    color = np.array(COLORS[a.color], np.uint8)
    for t in range(frames):
        for cx, cy in tracks[:, t]:
            clip[t][shape_mask(a.shape, centres[None, :] - cx, centres[:, None] - cy, r)] = color
    return clip


# ------------------------------------------------------------------------------------------------ encoding, writing
def encode_mp4(frames: np.ndarray, fps: int = 8, codec: str = "h264", options: Optional[dict] = None) -> bytes:
    """Returns the bytes of an mp4 (yuv420p) holding `frames` (T, H, W, 3) uint8 RGB with even H and W; `options`
    are encoder options over the codec's own (e.g. {"g": "20"}: a key frame every 20 frames).

    One encoder thread: the output is then byte-identical across runs (and workers are processes, not threads).
    """
    if codec not in ENCODERS:
        raise ValueError(f"codec {codec!r} is not one of {', '.join(ENCODERS)}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs even frame sizes, got {width}x{height}")
    encoder, defaults = ENCODERS[codec]
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream(encoder, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.thread_count = 1
        stream.options = {**defaults, **(options or {})}
        for index, pixels in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
            frame.pts = index  # in the stream's time base, 1/fps
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buf.getvalue()


def encode_jpg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def write_item(job: tuple[Settings, Item]) -> dict:
    """Renders, encodes and writes one item; returns its manifest record (what videos/images.jsonl hold)."""
    settings, item = job
    rng = np.random.default_rng([settings.seed, SPLIT_IDS[item.split], item.index])
    a = item.attributes
    is_image = item.split == "image"
    pixels = render(a, settings.size, 1 if is_image else settings.frames, rng)
    captions = captions_for(a, settings.captions, rng)
    data = encode_jpg(pixels[0]) if is_image else encode_mp4(pixels, settings.fps, settings.codec)
    fs, root = fsspec.core.url_to_fs(settings.out)
    with fs.open(f"{root.rstrip('/')}/{item.path}", "wb") as f:
        f.write(data)
    record = {"key": item.key, "path": item.path, "captions": captions}
    if not is_image:
        record.update(duration=round(settings.frames / settings.fps, 6), fps=settings.fps)
    record.update(width=settings.size, height=settings.size, attributes=a.as_dict())
    return record


def written(jobs: list[tuple[Settings, Item]], workers: int) -> Iterator[dict]:
    """Yields the records of `jobs` in order, written by `workers` processes (in this process when workers <= 1)."""
    if workers <= 1 or len(jobs) < 2:
        yield from map(write_item, jobs)
        return
    chunk = max(1, min(16, len(jobs) // (4 * workers)))
    with multiprocessing.Pool(workers) as pool:
        yield from pool.imap(write_item, jobs, chunksize=chunk)


def write_text(fs, path: str, text: str) -> None:
    with fs.open(path, "w") as f:
        f.write(text)


def jsonl(records: Iterable[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def checked_settings(videos: int, images: int, eval_videos: int, settings: Settings) -> None:
    """Raises ConfigError naming the option when a setting cannot make a corpus."""
    problems = []
    if videos < 1:
        problems.append(f"--videos {videos}: need at least 1")
    if images < 0:
        problems.append(f"--images {images}: cannot be negative")
    if eval_videos < 0:
        problems.append(f"--eval-videos {eval_videos}: cannot be negative")
    if settings.codec not in ENCODERS:
        problems.append(f"--codec {settings.codec!r}: one of {', '.join(ENCODERS)}")
    if settings.size < 32 or settings.size % 2:
        problems.append(f"--size {settings.size}: must be even (yuv420p) and at least 32 (room for 3 shapes)")
    if settings.frames < 2:
        problems.append(f"--frames {settings.frames}: need at least 2 for motion")
    if settings.fps < 1:
        problems.append(f"--fps {settings.fps}: must be positive")
    if settings.captions < 1:
        problems.append(f"--captions {settings.captions}: need at least 1")
    if problems:
        raise ConfigError("; ".join(problems))


def write_corpus(out: str, videos: int, images: int, seed: int, codec: str = "h264", size: int = 64,
                 frames: int = 24, fps: int = 8, eval_videos: int = 64, captions: int = 5,
                 workers: Optional[int] = None, progress: bool = True) -> dict:
    """Writes the corpus (layout in the module docstring) to `out` (a local path or fsspec URL); returns a summary.

    `workers` processes render and encode (default: the CPU count); the files do not depend on it.
    """
    settings = Settings(out=out, seed=seed, codec=codec, size=size, frames=frames, fps=fps, captions=captions)
    checked_settings(videos, images, eval_videos, settings)
    started = time.perf_counter()
    fs, root = fsspec.core.url_to_fs(out)
    root = root.rstrip("/")
    for folder in ("videos", "images", "eval/videos"):
        fs.makedirs(f"{root}/{folder}", exist_ok=True)
    items = corpus_items(videos, images, eval_videos, seed)
    jobs = [(settings, item) for item in items]
    records: dict[str, list[dict]] = {"train": [], "image": [], "eval": []}
    bar = tqdm(total=len(jobs), desc="synth", unit="file", disable=not progress)
    for item, record in zip(items, written(jobs, workers or os.cpu_count() or 1)):
        records[item.split].append(record)
        bar.update()
    bar.close()
    write_text(fs, f"{root}/videos.jsonl", jsonl(records["train"]))
    write_text(fs, f"{root}/images.jsonl", jsonl(records["image"]))
    write_text(fs, f"{root}/eval/videos.jsonl", jsonl(records["eval"]))
    msrvtt = [{"video": r["path"].rsplit("/", 1)[1], "caption": r["captions"][0]} for r in records["eval"]]
    msvd = [{"video": r["path"].rsplit("/", 1)[1], "caption": r["captions"]} for r in records["eval"]]
    write_text(fs, f"{root}/eval/msrvtt_test.json", json.dumps(msrvtt, indent=1) + "\n")
    write_text(fs, f"{root}/eval/msvd_test.json", json.dumps(msvd, indent=1) + "\n")
    described = {**asdict(settings), "videos": videos, "images": images, "eval_videos": eval_videos,
                 "held_out_pairs": [list(p) for p in HELD_OUT_PAIRS]}
    del described["out"]
    write_text(fs, f"{root}/corpus.json", json.dumps(described, indent=1) + "\n")
    return {**described, "out": out, "seconds": time.perf_counter() - started}


# ----------------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help="where to write the corpus (path or fsspec URL)")
    parser.add_argument("--videos", type=int, default=200, metavar="N", help="training clips (default 200)")
    parser.add_argument("--images", type=int, default=50, metavar="M", help="training images (default 50)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="same seed, same corpus (default 0)")
    parser.add_argument("--codec", choices=sorted(ENCODERS), default="h264",
                        help="h264 (libx264) or vp9 (libvpx-vp9; what DALI's CPU decoder reads); default h264")
    parser.add_argument("--size", type=int, default=64, metavar="PX", help="frame width = height, even (default 64)")
    parser.add_argument("--frames", type=int, default=24, metavar="F", help="frames per clip (default 24)")
    parser.add_argument("--fps", type=int, default=8, help="frame rate; a clip lasts F/fps seconds (default 8)")
    parser.add_argument("--eval-videos", type=int, default=64, metavar="K",
                        help="held-out clips; up to %d are all distinct (default 64)" % len(video_combinations(True)))
    parser.add_argument("--captions", type=int, default=5, metavar="C",
                        help=f"captions per clip or image (default 5; {len(VIDEO_TEMPLATES)} templates for clips)")
    parser.add_argument("--workers", type=int, default=None, metavar="W",
                        help="processes that render and encode (default: the CPU count; the files do not change)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    s = write_corpus(args.out, args.videos, args.images, args.seed, codec=args.codec, size=args.size,
                     frames=args.frames, fps=args.fps, eval_videos=args.eval_videos, captions=args.captions,
                     workers=args.workers, progress=not args.quiet)
    print(f"synth: {s['videos']} videos + {s['eval_videos']} held-out eval videos ({s['size']}px, {s['frames']} "
          f"frames @ {s['fps']} fps, {s['codec']}), {s['images']} images -> {s['out']} in {s['seconds']:.1f}s")
    return 0
