"""Test-time frames as the official VideoMamba/UMT evaluation takes them: UMT's "middle" sampling (short clips padded
with the last frame), DiDeMo's first 30 seconds, the whole frame resized bicubic to a square with ImageNet's
normalization (VideoMamba) or open_clip's own resize, crop and normalization."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.data.decode import CpuDecoder, EncodedSample, probe
from pipeline.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, VIDEOMAMBA_EVAL_FRAMES, eval_plan,
                                      open_clip_eval_frames, planned_clip, trimmed_frame_count, umt_middle_frames)
from tests.conftest import mp4_frame_level


def official_middle(num_frames, vlen):
    """UMT's get_frame_indices(sample="middle") as written there (video_mm/dataset/video_utils.py)."""
    acc_samples = min(num_frames, vlen)
    intervals = np.linspace(start=0, stop=vlen, num=acc_samples + 1).astype(int)
    ranges = [(interv, intervals[idx + 1] - 1) for idx, interv in enumerate(intervals[:-1])]
    frame_indices = [(x[0] + x[1]) // 2 for x in ranges]
    if len(frame_indices) < num_frames:
        padded = [frame_indices[-1]] * num_frames
        padded[:len(frame_indices)] = frame_indices
        frame_indices = padded
    return frame_indices


@pytest.mark.parametrize("vlen", [1, 3, 7, 8, 9, 40, 301])
def test_middle_sampling_is_umts(vlen):
    assert umt_middle_frames(vlen, 8).tolist() == official_middle(8, vlen)
    assert umt_middle_frames(3, 8).tolist() == [0, 1, 2, 2, 2, 2, 2, 2]  # each frame once, the last repeated


def test_thirty_seconds_at_most_when_trimmed():
    assert trimmed_frame_count(80, 2.0, 30.0) == 60
    assert trimmed_frame_count(50, 2.0, 30.0) == 50 and trimmed_frame_count(80, 2.0, None) == 80
    assert trimmed_frame_count(1000, 29.97, 30.0) == 899  # int(30 * fps), as read_frames_decord cuts


def test_a_didemo_clip_longer_than_30_seconds_is_cut(tmp_path, make_mp4):
    frames, fps = 80, 2  # 40 seconds
    data = make_mp4(tmp_path / "long.mp4", frames=frames, size=32, fps=fps).read_bytes()
    info = probe(data, "video")
    plan = eval_plan(info.frames, info.fps, info.width, info.height, 8, 32, VIDEOMAMBA_EVAL_FRAMES, trim_seconds=30.0)
    assert plan.indices == tuple(official_middle(8, 60)) and max(plan.indices) < 60
    clip = CpuDecoder().decode_one(EncodedSample("long", "video", data, plan))
    grey = clip[:, :, 0, 0] * torch.tensor(IMAGENET_STD).view(3, 1) * 255 + torch.tensor(IMAGENET_MEAN).view(3, 1) * 255
    expected = torch.tensor([mp4_frame_level(i, frames) for i in plan.indices], dtype=torch.float32)
    assert torch.allclose(grey.mean(0), expected, atol=6)  # the first 30 s only (video codec rounding)
    untrimmed = eval_plan(info.frames, info.fps, info.width, info.height, 8, 32, VIDEOMAMBA_EVAL_FRAMES)
    assert max(untrimmed.indices) >= 70


def test_videomamba_frames_are_the_whole_frame_bicubic_with_imagenet_normalization():
    torch.manual_seed(0)
    frames = torch.randint(0, 256, (2, 24, 40, 3), dtype=torch.uint8)
    plan = eval_plan(2, 8.0, 40, 24, 2, 16, VIDEOMAMBA_EVAL_FRAMES)
    assert plan.box == (0, 0, 40, 24)  # nothing cropped: the aspect ratio is not kept, as the official Resize((s, s))
    clip = planned_clip(frames, plan)
    # torchvision's Resize((16, 16), BICUBIC) of uint8 tensors (0.16: no antialias), /255, Normalize(ImageNet)
    x = F.interpolate(frames.permute(0, 3, 1, 2).float(), size=(16, 16), mode="bicubic", align_corners=False)
    x = x.round().clamp(0, 255) / 255.0
    expected = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(clip, expected.permute(1, 0, 2, 3), atol=1e-5)


def test_open_clip_frames_are_its_own_resize_crop_and_normalization():
    frames = torch.zeros(1, 20, 40, 3, dtype=torch.uint8)
    frames[:, :, 10:30] = 200  # the centre square is all 200
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    plan = eval_plan(1, 0.0, 40, 20, 1, 8, open_clip_eval_frames(mean, std))
    assert plan.box == (10, 0, 30, 20) and plan.interp == "bicubic" and plan.antialias
    clip = planned_clip(frames, plan)
    assert torch.allclose(clip, torch.full_like(clip, (200 / 255 - 0.5) / 0.25), atol=1e-5)


def test_dali_gives_the_cpu_decoders_eval_frames(clip_vp9):
    pytest.importorskip("nvidia.dali")
    from pipeline.data.decode import DaliDecoder

    info = probe(clip_vp9, "video")
    plans = [eval_plan(info.frames, info.fps, info.width, info.height, 8, 24, VIDEOMAMBA_EVAL_FRAMES),
             eval_plan(info.frames, info.fps, info.width, info.height, 3, 24, open_clip_eval_frames((0.5,) * 3,
                                                                                                     (0.3,) * 3))]
    for plan in plans:
        samples = [EncodedSample("v", "video", clip_vp9, plan)] * 2
        cpu, _ = CpuDecoder().decode(samples)
        dali, failures = DaliDecoder("cpu", max_batch=2).decode(samples)
        assert failures == [] and dali.shape == cpu.shape
        diff = (dali - cpu).abs()  # as in test_data_decode: chroma upsampling differs at sharp edges only
        assert diff.mean() < 0.05 and diff.flatten().quantile(0.9) < 0.12
