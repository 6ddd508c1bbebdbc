"""Frame sampling, crops and normalization as the official VideoMamba/UMT recipes do them.

Everything random about a sample is decided here, up front, as a `ClipPlan` (which frames, which box, whether to
flip), from a generator seeded by the sample's identity. The plan travels with the encoded bytes, so the CPU and the
DALI decoders apply the very same plan and give the same frames within their rounding.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# open_clip's OPENAI_DATASET_MEAN / OPENAI_DATASET_STD (the CLIP teacher's normalization)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# ImageNet's: what the official video_mm code normalizes VideoMamba's input with (video_mm/dataset/__init__.py,
# create_dataset: "videomamba" in the vision encoder's name)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# data.normalize -> (mean, std): the training input's normalization, applied by every decoder (the plan carries it).
# imagenet: the official pipelines' for VideoMamba (video_sm/datasets/build.py GroupNormalize(IMAGENET_DEFAULT_MEAN,
# ...), video_mm/dataset/__init__.py create_dataset), fed to the student and, unchanged, to the CLIP teacher
NORMALIZATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "clip": (CLIP_MEAN, CLIP_STD)}
TRAIN_CROP_SCALE = (0.5, 1.0)  # RandomResizedCrop scale of the UMT / VideoMamba multi-modality recipes
TRAIN_CROP_RATIO = (3 / 4, 4 / 3)
# data.crop: multiscale, video_sm's K400 pretraining crop (video_sm/datasets/build.py DataAugmentationForVideoMAE:
# GroupMultiScaleCrop(input_size, [1, .875, .75, .66]) with its defaults max_distort 1, fix_crop, more_fix_crop);
# random_resized, the multimodal recipes' RandomResizedCrop (video_mm/dataset/__init__.py)
CROPS = ("multiscale", "random_resized")
MULTISCALE_SCALES = (1.0, 0.875, 0.75, 0.66)


@dataclass(frozen=True)
class ClipPlan:
    """What to take from one decoded clip: source frame indices, a crop box (x0, y0, x1, y1) in source pixels
    (end exclusive), whether to flip horizontally, the square output side, and how to resize and normalize.

    `interp` "bilinear" (the training recipes') or "bicubic"; a bicubic resize gives 8-bit pixels (rounded and
    clamped) as an image library or torchvision on uint8 frames does. `mean`/`std` are per channel on a 0-1 scale."""

    indices: tuple[int, ...]
    box: tuple[int, int, int, int]
    flip: bool
    size: int
    interp: str = "bilinear"
    antialias: bool = True
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD


@dataclass(frozen=True)
class EvalFrames:
    """How an evaluation takes frames from a video: `box` "whole" (the whole frame resized to a square, as the
    official VideoMamba/UMT test transform does) or "centre" (shorter side resized, centre square: open_clip's own
    preprocessing), the resize and the normalization."""

    box: str
    interp: str
    antialias: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# video_mm/dataset/__init__.py, test_transform: Resize((res, res), BICUBIC) of the (T, C, H, W) uint8 frames,
# /255, Normalize(ImageNet). torchvision 0.16 (the repo's requirements.txt) resizes tensors without antialiasing.
VIDEOMAMBA_EVAL_FRAMES = EvalFrames("whole", "bicubic", False, IMAGENET_MEAN, IMAGENET_STD)


def run_eval_frames(normalize: str) -> EvalFrames:
    """How a model trained by this project's stages is evaluated: the official geometry (VIDEOMAMBA_EVAL_FRAMES)
    with the normalization it was trained with (its run's data.normalize)."""
    mean, std = NORMALIZATIONS[normalize]
    return EvalFrames("whole", "bicubic", False, mean, std)


def open_clip_eval_frames(mean: tuple[float, ...], std: tuple[float, ...]) -> EvalFrames:
    """open_clip's test preprocessing: Resize(shorter side, BICUBIC) of a PIL image (antialiased), CenterCrop,
    Normalize with the model's own mean and std."""
    return EvalFrames("centre", "bicubic", True, tuple(mean), tuple(std))


def resampled_frames(num_source: int, source_fps: float, target_fps: float | None) -> np.ndarray:
    """Returns the source frame index of every frame of the clip re-timed to `target_fps` (all frames when None)."""
    if target_fps is None or source_fps <= 0 or abs(target_fps - source_fps) < 1e-6:
        return np.arange(num_source)
    count = max(1, int(math.floor(num_source * target_fps / source_fps)))
    return np.minimum(np.round(np.arange(count) * source_fps / target_fps).astype(int), num_source - 1)


def segment_frames(num: int, t: int, train: bool, rng: np.random.Generator) -> np.ndarray:
    """Returns `t` indices into range(num): one per equal segment, random inside it in training, its middle in eval.

    With fewer frames than segments some segments share a frame (as the official samplers pad by repetition).
    """
    edges = np.linspace(0, num, t + 1)
    lo = np.floor(edges[:-1]).astype(int)
    hi = np.maximum(lo + 1, np.floor(edges[1:]).astype(int))
    hi = np.minimum(hi, num)
    lo = np.minimum(lo, hi - 1)
    if train:
        return rng.integers(lo, hi)
    return (lo + hi - 1) // 2


def random_resized_box(width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """Returns a crop box as torchvision's RandomResizedCrop picks it (scale and aspect ratio ranges above)."""
    area = width * height
    log_ratio = (math.log(TRAIN_CROP_RATIO[0]), math.log(TRAIN_CROP_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*TRAIN_CROP_SCALE)
        ratio = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            x0 = int(rng.integers(0, width - w + 1))
            y0 = int(rng.integers(0, height - h + 1))
            return x0, y0, x0 + w, y0 + h
    return centre_box(width, height)


def multiscale_box(width: int, height: int, size: int, rng: np.random.Generator,
                   scales: tuple[float, ...] = MULTISCALE_SCALES) -> tuple[int, int, int, int]:
    """Returns a crop box as the official GroupMultiScaleCrop picks it (video_sm/datasets/transforms.py
    `_sample_crop_size`, `fill_fix_offset`): crop sides int(shorter side * scale), each snapped to the output side
    `size` when within 3 pixels; a (w, h) pair whose scales are at most one step apart (max_distort 1), drawn
    uniformly; then one of the 13 fixed offsets (corners, centre, edge centres, quarter points: more_fix_crop) on a
    grid of a quarter of the free space. The box is then resized to size x size (non-square boxes are stretched, as
    the official resize is)."""
    base = min(width, height)
    sides = [int(base * s) for s in scales]
    snapped = [size if abs(x - size) < 3 else x for x in sides]
    pairs = [(w, h) for i, h in enumerate(snapped) for j, w in enumerate(snapped) if abs(i - j) <= 1]
    crop_w, crop_h = pairs[int(rng.integers(len(pairs)))]
    crop_w, crop_h = min(crop_w, width), min(crop_h, height)  # a side snapped up past a small frame
    w_step, h_step = (width - crop_w) // 4, (height - crop_h) // 4
    offsets = [(0, 0), (4, 0), (0, 4), (4, 4), (2, 2),  # corners, centre
               (0, 2), (4, 2), (2, 4), (2, 0),  # centre left / right, lower / upper centre
               (1, 1), (3, 1), (1, 3), (3, 3)]  # quarter points
    i, j = offsets[int(rng.integers(len(offsets)))]
    x0, y0 = i * w_step, j * h_step
    return x0, y0, x0 + crop_w, y0 + crop_h


def centre_box(width: int, height: int) -> tuple[int, int, int, int]:
    """Returns the largest centred square: resizing it to the output side is "resize shorter side + centre crop"."""
    side = min(width, height)
    x0, y0 = (width - side) // 2, (height - side) // 2
    return x0, y0, x0 + side, y0 + side


def umt_middle_frames(num: int, t: int) -> np.ndarray:
    """Returns UMT's test-time frame indices (`get_frame_indices(..., sample="middle")`, video_mm/dataset/
    video_utils.py): min(t, num) equal intervals of range(num), the middle of each, padded with the last index to t.

    It differs from `segment_frames` only when the video has fewer than t frames: each frame once, then the last
    one repeated (segment_frames spreads the repeats)."""
    count = min(t, num)
    edges = np.linspace(0, num, count + 1).astype(int)
    picks = [(lo + hi - 1) // 2 for lo, hi in zip(edges[:-1], edges[1:])]
    return np.asarray(picks + [picks[-1]] * (t - count), dtype=int)


def trimmed_frame_count(num_frames: int, fps: float, seconds: float | None) -> int:
    """Returns how many frames of a video an evaluation may use: all of them, or (UMT's `trimmed30` for DiDeMo,
    video_mm/dataset/video_utils.py read_frames_decord) int(seconds * fps) when the video lasts longer."""
    if seconds is None or fps <= 0 or num_frames / fps <= seconds:
        return num_frames
    return max(1, int(seconds * fps))


def eval_plan(num_frames: int, fps: float, width: int, height: int, t: int, size: int, frames: EvalFrames,
              trim_seconds: float | None = None) -> ClipPlan:
    """Returns the test-time plan of a video (an image is a 1-frame clip): UMT's "middle" frames of the (trimmed)
    video, the whole frame or its centre square, resized and normalized as `frames` says."""
    usable = trimmed_frame_count(num_frames, fps, trim_seconds)
    box = (0, 0, width, height) if frames.box == "whole" else centre_box(width, height)
    return ClipPlan(tuple(int(i) for i in umt_middle_frames(usable, t)), box, False, size, frames.interp,
                    frames.antialias, frames.mean, frames.std)


def clip_plan(num_frames: int, fps: float, width: int, height: int, t: int, size: int, train: bool,
              target_fps: float | None, rng: np.random.Generator, *, crop: str, normalize: str) -> ClipPlan:
    """Returns the plan for a clip of `num_frames` frames at `fps` (an image is a 1-frame clip): in training the
    `crop` box ("multiscale" | "random_resized") and a flip with probability 0.5, else the centre square; normalized
    as `normalize` ("imagenet" | "clip") says (the training loader passes data.crop and data.normalize)."""
    if crop not in CROPS:
        raise ValueError(f"crop {crop!r} is not one of {', '.join(CROPS)}")
    mean, std = NORMALIZATIONS[normalize]
    timeline = resampled_frames(num_frames, fps, target_fps)
    picks = timeline[segment_frames(len(timeline), t, train, rng)]
    if not train:
        box = centre_box(width, height)
    elif crop == "multiscale":
        box = multiscale_box(width, height, size, rng)
    else:
        box = random_resized_box(width, height, rng)
    flip = bool(rng.random() < 0.5) if train else False
    return ClipPlan(tuple(int(i) for i in picks), box, flip, size, mean=mean, std=std)


def planned_pixels(frames: torch.Tensor, plan: ClipPlan) -> torch.Tensor:
    """Returns (3, T, S, S) uint8: the plan's box of (T, H, W, 3) uint8 frames (already ordered as `plan.indices`)
    resized to S x S and flipped as planned, not yet normalized (`normalized` does that, where the clip is used).

    8-bit output is what the official transforms produce too (torchvision resizes the uint8 frames and gives uint8),
    and it is a quarter of the bytes a loader worker hands over. A bilinear plan (training) resizes the 8-bit frames
    directly (torch's fixed-point kernel, within one grey level of the float resize, about 6x faster); a bicubic
    plan (evaluation) resizes in float, clamps and rounds, as torchvision 0.16 does for uint8 frames."""
    x0, y0, x1, y1 = plan.box
    x = frames[:, y0:y1, x0:x1].permute(0, 3, 1, 2)
    if plan.interp == "bicubic":
        x = F.interpolate(x.float(), size=(plan.size, plan.size), mode="bicubic", align_corners=False,
                          antialias=plan.antialias).clamp_(0, 255).round_().to(torch.uint8)
    else:
        x = F.interpolate(x.contiguous(memory_format=torch.channels_last), size=(plan.size, plan.size),
                          mode=plan.interp, align_corners=False, antialias=plan.antialias)
    if plan.flip:
        x = x.flip(-1)
    return x.permute(1, 0, 2, 3).contiguous()


def normalized(pixels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Returns float (..., 3, T, H, W) clips normalized by per-channel `mean`/`std` (0-1 scale) from uint8 pixels,
    on the pixels' device."""
    scale, shift = _affine(tuple(mean), tuple(std), pixels.device)
    return pixels.float().mul_(scale).sub_(shift)


@functools.lru_cache(maxsize=16)
def _affine(mean: tuple[float, ...], std: tuple[float, ...],
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of the normalization as (3, 1, 1, 1) tensors on `device`, made once: a tensor made on a GPU
    from host values waits for the GPU's queue, which the loader must not do before every batch."""
    scale = 1.0 / (255.0 * torch.tensor(std, dtype=torch.float64))
    shift = torch.tensor(mean, dtype=torch.float64) / torch.tensor(std, dtype=torch.float64)
    return scale.float().view(3, 1, 1, 1).to(device), shift.float().view(3, 1, 1, 1).to(device)


def planned_clip(frames: torch.Tensor, plan: ClipPlan) -> torch.Tensor:
    """Returns (3, T, S, S) float, normalized as the plan says, from (T, H, W, 3) uint8 frames already ordered as
    `plan.indices`."""
    return normalized(planned_pixels(frames, plan), plan.mean, plan.std)


def denormalized(video: torch.Tensor, normalize: str = "clip") -> torch.Tensor:
    """Returns 0-255 pixel values from a (..., 3, T, H, W) tensor normalized as `normalize` says (for checks and
    previews)."""
    mean, std = NORMALIZATIONS[normalize]
    mean = torch.tensor(mean, device=video.device).view(3, 1, 1, 1) * 255.0
    std = torch.tensor(std, device=video.device).view(3, 1, 1, 1) * 255.0
    return video * std + mean
