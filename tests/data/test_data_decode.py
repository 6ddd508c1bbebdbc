"""Frame sampling, transforms and the two decoders (PyAV on the CPU; DALI's CPU backend on VP9 clips)."""
from __future__ import annotations

import io

import av
import numpy as np
import pytest
import torch

from pipeline.data import build_loader
from pipeline.data.decode import CpuDecoder, DecodeError, EncodedSample, dali_available, dali_ready, probe
from pipeline.data.transforms import (CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, MULTISCALE_SCALES, ClipPlan,
                                      clip_plan, denormalized, multiscale_box, normalized, planned_clip, planned_pixels,
                                      random_resized_box, resampled_frames, segment_frames)

needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia-dali is not installed")


def level(i: int, frames: int = 8) -> int:
    """The grey level of frame i of the session clips (conftest's make_mp4_session)."""
    return 30 + 200 * i // (frames - 1)


# ------------------------------------------------------------------------------------------------------ sampling
def test_training_picks_one_frame_inside_each_equal_segment():
    rng = np.random.default_rng(0)
    picks = np.stack([segment_frames(40, 8, True, rng) for _ in range(200)])
    assert ((picks >= np.arange(8) * 5) & (picks < np.arange(1, 9) * 5)).all()
    assert all(len(set(picks[:, j])) == 5 for j in range(8))  # every frame of each segment gets picked


def test_evaluation_takes_segment_middles_and_short_clips_repeat_frames():
    rng = np.random.default_rng(0)
    assert segment_frames(40, 8, False, rng).tolist() == [2, 7, 12, 17, 22, 27, 32, 37]
    short = segment_frames(3, 8, True, rng)
    assert len(short) == 8 and set(short.tolist()) == {0, 1, 2} and (np.diff(short) >= 0).all()


def test_target_fps_retimes_the_clip_before_sampling():
    assert resampled_frames(30, 30.0, 10.0).tolist() == list(range(0, 30, 3))
    assert resampled_frames(10, 5.0, 10.0).tolist() == [0, 0, 1, 2, 2, 2, 3, 4, 4, 4, 5, 6, 6, 6, 7, 8, 8, 8, 9, 9][:20]
    assert resampled_frames(12, 24.0, None).tolist() == list(range(12))


def test_random_resized_crop_boxes_stay_inside_and_follow_the_scale_range():
    rng = np.random.default_rng(1)
    boxes = [random_resized_box(64, 48, rng) for _ in range(300)]
    areas = [(x1 - x0) * (y1 - y0) / (64 * 48) for x0, y0, x1, y1 in boxes]
    assert all(0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 48 for x0, y0, x1, y1 in boxes)
    assert min(areas) >= 0.45 and max(areas) <= 1.0 and np.std(areas) > 0.05


def test_evaluation_plan_is_a_centre_square_without_flip():
    for crop in ("multiscale", "random_resized"):
        plan = clip_plan(16, 8.0, 64, 48, 4, 32, False, None, np.random.default_rng(0), crop=crop, normalize="clip")
        assert plan.box == (8, 0, 56, 48) and not plan.flip and plan.indices == (1, 5, 9, 13)


def official_multiscale_candidates(width, height, size, scales=MULTISCALE_SCALES):
    """Every (w, h, x0, y0) the official GroupMultiScaleCrop can pick (video_sm/datasets/transforms.py
    _sample_crop_size with max_distort=1, fix_crop and more_fix_crop: fill_fix_offset's 13 offsets), transcribed."""
    base = min(width, height)
    crop_sizes = [int(base * x) for x in scales]
    crop_h = [size if abs(x - size) < 3 else x for x in crop_sizes]
    crop_w = [size if abs(x - size) < 3 else x for x in crop_sizes]
    pairs = [(w, h) for i, h in enumerate(crop_h) for j, w in enumerate(crop_w) if abs(i - j) <= 1]
    out = set()
    for w, h in pairs:
        w_step, h_step = (width - w) // 4, (height - h) // 4
        offsets = [(0, 0), (4 * w_step, 0), (0, 4 * h_step), (4 * w_step, 4 * h_step), (2 * w_step, 2 * h_step),
                   (0, 2 * h_step), (4 * w_step, 2 * h_step), (2 * w_step, 4 * h_step), (2 * w_step, 0),
                   (w_step, h_step), (3 * w_step, h_step), (w_step, 3 * h_step), (3 * w_step, 3 * h_step)]
        out |= {(w, h, x, y) for x, y in offsets}
    return out


@pytest.mark.parametrize("width,height,size", [(340, 256, 224), (64, 48, 32), (320, 240, 224)])
def test_multiscale_crop_picks_the_official_sizes_and_offsets(width, height, size):
    """The K400 pretraining crop: sides int(shorter side * (1, .875, .75, .66)) snapped to the output side within 3
    pixels, at most one scale step between width and height, one of the 13 fixed offsets; every candidate comes
    up, nothing else does, and the planned clip is size x size."""
    rng = np.random.default_rng(0)
    boxes = [multiscale_box(width, height, size, rng) for _ in range(4000)]
    picked = {(x1 - x0, y1 - y0, x0, y0) for x0, y0, x1, y1 in boxes}
    assert picked == official_multiscale_candidates(width, height, size)
    assert all(0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height for x0, y0, x1, y1 in boxes)
    sides = {int(min(width, height) * s) for s in MULTISCALE_SCALES}
    sides = {size if abs(s - size) < 3 else s for s in sides}
    assert {w for w, _, _, _ in picked} == sides and {h for _, h, _, _ in picked} == sides
    plan = clip_plan(8, 8.0, width, height, 4, size, True, None, rng, crop="multiscale", normalize="imagenet")
    frames = torch.zeros((4, height, width, 3), dtype=torch.uint8)
    assert planned_clip(frames, plan).shape == (3, 4, size, size)
    flips = [clip_plan(8, 8.0, width, height, 4, size, True, None, rng, crop="multiscale",
                       normalize="imagenet").flip for _ in range(200)]
    assert 60 < sum(flips) < 140  # GroupRandomHorizontalFlip(flip=True): half the clips


def test_the_snapped_crop_side_stays_inside_a_frame_smaller_than_the_output():
    """int(222 * 1) = 222 snaps to 224 (within 3 pixels) but the frame is 222 high: the box keeps inside it."""
    rng = np.random.default_rng(2)
    for _ in range(200):
        x0, y0, x1, y1 = multiscale_box(300, 222, 224, rng)
        assert 0 <= x0 < x1 <= 300 and 0 <= y0 < y1 <= 222


@pytest.mark.parametrize("normalize,mean,std", [("imagenet", IMAGENET_MEAN, IMAGENET_STD),
                                                ("clip", CLIP_MEAN, CLIP_STD)])
def test_a_training_plan_carries_the_normalization_to_the_decoded_frames(normalize, mean, std):
    plan = clip_plan(2, 8.0, 8, 8, 2, 8, True, None, np.random.default_rng(0), crop="random_resized",
                     normalize=normalize)
    assert (plan.mean, plan.std) == (mean, std)
    clip = planned_clip(torch.full((2, 8, 8, 3), 200, dtype=torch.uint8), plan)
    expect = (200 / 255 - torch.tensor(mean)) / torch.tensor(std)
    torch.testing.assert_close(clip.mean(dim=(1, 2, 3)), expect.float(), atol=1e-4, rtol=0)
    torch.testing.assert_close(denormalized(clip, normalize), torch.full_like(clip, 200.0), atol=1e-3, rtol=0)


@pytest.mark.parametrize("interp,antialias", [("bilinear", True), ("bicubic", False), ("bicubic", True)])
def test_planned_pixels_are_8_bit_within_a_grey_level_of_the_float_resize(interp, antialias):
    """Bilinear (training) resizes the 8-bit frames directly; bicubic (evaluation) exactly as torchvision on uint8
    frames: a float resize, clamped and rounded."""
    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 40, 50, 3), dtype=np.uint8))
    plan = ClipPlan((0, 1, 2), (4, 2, 44, 38), True, 24, interp, antialias)
    pixels = planned_pixels(frames, plan)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 3, 24, 24)
    resized = torch.nn.functional.interpolate(frames[:, 2:38, 4:44].permute(0, 3, 1, 2).float(), size=(24, 24),
                                              mode=interp, align_corners=False, antialias=antialias)
    rounded = resized.clamp(0, 255).round().flip(-1).permute(1, 0, 2, 3)
    difference = (pixels.float() - rounded).abs()
    assert difference.max() <= (0 if interp == "bicubic" else 1)
    torch.testing.assert_close(planned_clip(frames, plan), normalized(pixels, plan.mean, plan.std))


def test_planned_clip_normalizes_with_clip_mean_and_std_and_flips():
    frames = torch.zeros((2, 8, 8, 3), dtype=torch.uint8)
    frames[..., 0] = 255
    frames[:, :, :4] = 0
    clip = planned_clip(frames, ClipPlan((0, 1), (0, 0, 8, 8), False, 8))
    red = (1.0 - CLIP_MEAN[0]) / CLIP_STD[0]
    assert clip.shape == (3, 2, 8, 8)
    assert torch.allclose(clip[0, :, :, 6:], torch.tensor(red), atol=1e-5)
    flipped = planned_clip(frames, ClipPlan((0, 1), (0, 0, 8, 8), True, 8))
    assert torch.equal(flipped, clip.flip(-1))
    assert torch.allclose(denormalized(clip)[0, :, :, 6:], torch.tensor(255.0), atol=1e-3)


# --------------------------------------------------------------------------------------------------------- PyAV
def test_cpu_decoder_returns_the_planned_frames_in_order(clip_h264):
    info = probe(clip_h264, "video")
    assert (info.frames, info.fps, info.width, info.height) == (8, 8.0, 32, 32)
    plan = ClipPlan((7, 0, 3, 3), (0, 0, 32, 32), False, 32)
    clip = CpuDecoder().decode_one(EncodedSample("k", "video", clip_h264, plan))
    grey = denormalized(clip)[:, :, 24:, :].mean(dim=(0, 2, 3))  # rows below the moving box are flat grey
    assert torch.allclose(grey, torch.tensor([level(i) for i in (7, 0, 3, 3)], dtype=torch.float32), atol=3)


def test_unusable_bytes_raise_the_kind_they_are_counted_under(clip_h264, jpg_bytes):
    with pytest.raises(DecodeError) as e:
        probe(b"not an mp4 at all", "video")
    assert e.value.kind == "corrupt_video"
    with pytest.raises(DecodeError) as e:
        probe(clip_h264[:100], "image")
    assert e.value.kind == "corrupt_image"
    with pytest.raises(DecodeError) as e:  # a jpg saved as {key}.mp4: PyAV would read it as a 1-frame video
        probe(jpg_bytes, "video")
    assert e.value.kind == "wrong_type"
    plan = ClipPlan((0, 7), (0, 0, 32, 32), False, 16)
    cut = clip_h264[: len(clip_h264) // 2] + bytes(len(clip_h264) // 2)
    video, failures = CpuDecoder().decode([EncodedSample("a", "video", cut, plan),
                                           EncodedSample("b", "image", jpg_bytes, plan)])
    assert failures == [(0, "corrupt_video")] and video.shape == (1, 3, 2, 16, 16)


# --------------------------------------------------------------------------------------------------------- DALI
def encoded_clip(frames: int, keyint: int, codec: str = "h264", x264_params: str = "") -> bytes:
    """A clip whose every frame differs (a rolling noise texture, the index in a corner), a key frame every
    `keyint` frames; H.264 with the synthetic corpus's B-frames (closed GOPs unless x264_params says
    open-gop=1) or VP9."""
    from shards.synth import ENCODERS, encode_mp4

    base = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    images = np.stack([np.roll(base, 3 * i, axis=1) for i in range(frames)])
    for i, image in enumerate(images):
        image[:8, :8] = (5 * i) % 256
    options = {"g": str(keyint)}
    if x264_params:
        options["x264-params"] = f"{ENCODERS['h264'][1]['x264-params']}:{x264_params}"
    return encode_mp4(images, fps=30, codec=codec, options=options)


def frames_in_order(data: bytes) -> list[np.ndarray]:
    with av.open(io.BytesIO(data)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]


def packets_fed(data: bytes, targets: list[int], skip_disposable: bool = False) -> int:
    """How many packets `video_frames`'s decoding sends to the decoder for these frames (passing over unwanted
    non-reference pictures, as `video_frames` does, with `skip_disposable`)."""
    from pipeline.data.decode import _nal_reader, _planned_frames, _presentation_indices, decoding_plan

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        nals = _nal_reader(stream.codec_context) if skip_disposable else None
        packets = [p for p in container.demux(stream) if p.size]
        index_of = _presentation_indices(packets)
        plan = decoding_plan(packets, index_of, sorted(set(targets)), nals, lambda p: True)
        fed = []
        decode = stream.codec_context.decode

        class Counting:  # the real decoder, its packets counted
            def decode(self, packet):
                fed.append(packet)
                return decode(packet)

            def flush_buffers(self):
                stream.codec_context.flush_buffers()

        kept = _planned_frames(Counting(), packets, plan, index_of, sorted(set(targets)))
        assert sorted(kept) == sorted(set(targets))
        return sum(p is not None for p in fed)


@pytest.mark.parametrize("codec,x264_params", [("h264", ""), ("h264", "open-gop=1"), ("vp9", "")])
@pytest.mark.parametrize("threads", [1, 0])
def test_video_frames_restarts_at_key_frames_and_gives_the_frames_of_decoding_in_order(codec, x264_params, threads):
    """A long clip with short GOPs: the wanted frames (unsorted, repeated, across GOPs and in the first) are the
    ones decoding from the start gives, bit for bit, with frame threads or without, and far fewer packets are
    decoded; a leading frame of an open GOP is never taken for a wanted one."""
    from pipeline.data.decode import video_frames

    data = encoded_clip(240, keyint=20, codec=codec, x264_params=x264_params)
    reference = frames_in_order(data)
    assert len(reference) == 240
    indices = [230, 3, 61, 61, 118, 150, 40, 199]
    got = video_frames(data, indices, threads=threads)
    for frame, i in zip(got, indices):
        assert np.array_equal(frame, reference[i]), i
    assert packets_fed(data, indices) < 0.6 * 231  # decoding in order feeds the 231 packets up to frame 230


def test_video_frames_of_a_clip_with_one_key_frame_decode_in_order():
    from pipeline.data.decode import video_frames

    data = encoded_clip(60, keyint=250)
    reference = frames_in_order(data)
    got = video_frames(data, [50, 7, 33])
    assert all(np.array_equal(f, reference[i]) for f, i in zip(got, [50, 7, 33]))
    assert packets_fed(data, [7, 33, 50]) >= 51


def h264_in(container: str, frames: int, keyint: int = 250) -> bytes:
    """H.264 with x264's B-frames (the synthetic corpus's encoder settings) in `container`: mp4 and matroska store
    length-prefixed NAL units, avi start codes (Annex B)."""
    from shards.synth import ENCODERS

    base = np.kron(np.random.default_rng(1).integers(0, 255, (11, 11, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8))
    out = io.BytesIO()
    with av.open(out, "w", format=container) as target:
        stream = target.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        stream.codec_context.thread_count = 1
        stream.options = {**ENCODERS["h264"][1], "g": str(keyint)}
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(base[i % 24:i % 24 + 64, :64]), format="rgb24")
            frame.pts = i
            target.mux(stream.encode(frame))
        target.mux(stream.encode())
    return out.getvalue()


@pytest.mark.parametrize("container", ["mp4", "matroska"])
def test_unwanted_non_reference_pictures_are_not_decoded(container):
    """The B-frames no picture refers to (nal_ref_idc 0) are passed over unless wanted; the frames are those of
    decoding every packet, bit for bit."""
    from pipeline.data.decode import _nal_reader, video_frames

    data = h264_in(container, 60)
    reference = frames_in_order(data)
    with av.open(io.BytesIO(data)) as source:
        stream = source.streams.video[0]
        nals = _nal_reader(stream.codec_context)
        disposable = sum(nals.disposable(p) for p in source.demux(stream) if p.size)
    assert disposable >= 10
    indices = [55, 2, 17, 30, 30, 44]
    assert all(np.array_equal(f, reference[i]) for f, i in zip(video_frames(data, indices), indices))
    every, fewer = packets_fed(data, indices), packets_fed(data, indices, skip_disposable=True)
    assert every >= 56 and fewer <= every - disposable // 2


def test_avi_frames_are_placed_in_decoder_order_where_its_timestamps_cannot_say():
    """AVI stores H.264 with B-frames under decode-order timestamps: the frames come out of the decoder with falling
    timestamps, so they are counted as they come instead, and are still the right ones."""
    from pipeline.data.decode import _nal_reader, video_frames

    data = h264_in("avi", 60)
    reference = frames_in_order(data)
    indices = [55, 2, 17, 30, 44]
    assert all(np.array_equal(f, reference[i]) for f, i in zip(video_frames(data, indices), indices))
    with av.open(io.BytesIO(data)) as source:
        assert _nal_reader(source.streams.video[0].codec_context) is None  # start codes: every packet is decoded


def test_nal_headers_are_read_from_their_length_prefixes():
    from pipeline.data.decode import _NalReader

    prefixed = b"\x00\x00\x00\x02\x06\xaa" + b"\x00\x00\x00\x03\x01\x9a\x00"  # an SEI, a slice with ref_idc 0
    assert _NalReader(4).headers(prefixed) == [0x06, 0x01] and _NalReader(4).disposable(prefixed)
    assert _NalReader(4).headers(prefixed[:-1]) == []  # a length past the packet: nothing is assumed
    assert not _NalReader(4).disposable(prefixed[:-1])
    reference = b"\x00\x02\x41\x9a" + b"\x00\x02\x01\x9a"  # 2-byte prefixes; one slice is a reference
    assert _NalReader(2).headers(reference) == [0x41, 0x01] and not _NalReader(2).disposable(reference)
    assert not _NalReader(4).disposable(b"\x00\x00\x00\x02\x06\x05")  # no slice at all


def frames_at_coded_size(data: bytes) -> np.ndarray:
    """Decodes with the SPS's own size (a bare H.264 decoder: FFmpeg's demuxer would crop to the container's)."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        decoder = av.CodecContext.create("h264", "r")
        decoder.extradata = stream.codec_context.extradata
        frames = [f for packet in container.demux(stream) for f in decoder.decode(packet)]
    return np.stack([f.to_ndarray(format="rgb24") for f in frames])


def test_dali_ready_drops_the_sps_crop_and_keeps_every_pixel():
    from shards.synth import encode_mp4

    frames = np.random.default_rng(0).integers(0, 256, (6, 40, 50, 3), dtype=np.uint8)
    cropped = encode_mp4(frames)  # coded as 64x48 macroblocks, cropped to 50x40 by the SPS
    every = ClipPlan(tuple(range(6)), (0, 0, 50, 40), False, 32)
    ready = dali_ready(EncodedSample("k", "video", cropped, every))
    before, after = frames_at_coded_size(cropped), frames_at_coded_size(ready.data)
    assert before.shape == (6, 40, 50, 3) and after.shape == (6, 48, 64, 3)
    assert np.array_equal(after[:, :40, :50], before)  # a remux: the same coded pixels
    assert probe(ready.data, "video").width == 50 and ready.plan == every  # the display size; nothing trimmed
    uncropped = EncodedSample("k", "video", encode_mp4(frames[:, :32, :48]), every)
    assert dali_ready(uncropped) is uncropped
    garbage = EncodedSample("k", "video", b"not a video", every)
    assert dali_ready(garbage) is garbage


@pytest.mark.parametrize("codec,frames,keyint", [("h264", 90, 250), ("h264", 300, 30), ("vp9", 300, 30)])
def test_dali_ready_hands_over_only_the_packets_the_plan_needs(codec, frames, keyint):
    """The trimmed stream, its frames counted in output order as DALI counts them, gives at the renumbered
    indices the very frames the plan wants: without the unwanted non-reference pictures of H.264, and with the
    GOPs between the planned frames of a long clip left out."""
    data = encoded_clip(frames, keyint=keyint, codec=codec) if codec == "vp9" else h264_in("mp4", frames, keyint)
    reference = frames_in_order(data)
    indices = (frames - 7, 3, frames // 3, frames // 3, frames // 2, 20, frames - 40, frames - 20)
    ready = dali_ready(EncodedSample("k", "video", data, ClipPlan(indices, (0, 0, 64, 64), True, 32)))
    trimmed = frames_in_order(ready.data)
    assert ready.plan.box == (0, 0, 64, 64) and ready.plan.flip
    assert all(np.array_equal(trimmed[new], reference[old]) for new, old in zip(ready.plan.indices, indices))
    assert len(trimmed) <= (0.8 if codec == "h264" and keyint > frames else 0.5) * max(indices)


@needs_dali
def test_dali_cpu_backend_gives_the_pyav_frames_on_vp9(clip_vp9, jpg_bytes):
    from pipeline.data.decode import DaliDecoder

    info = probe(clip_vp9, "video")
    rng = np.random.default_rng(4)
    samples = [EncodedSample(f"v{i}", "video", clip_vp9,
                             clip_plan(info.frames, info.fps, 32, 32, 4, 24, True, None, rng, crop="random_resized",
                                       normalize="imagenet")) for i in range(3)]
    samples.append(EncodedSample("i", "image", jpg_bytes, ClipPlan((0,) * 4, (4, 2, 36, 22), True, 24)))
    assert any(s.plan.flip for s in samples) and any(not s.plan.flip for s in samples)
    cpu, cpu_fail = CpuDecoder().decode(samples)
    dali, dali_fail = DaliDecoder("cpu", max_batch=4).decode(samples)
    assert cpu_fail == dali_fail == [] and dali.shape == cpu.shape == (4, 3, 4, 24, 24)
    # Normalized units (0.04 is about 2.7 grey levels). The decoders upsample 4:2:0 chroma differently, so sharp
    # colour edges differ by up to ~70 levels in a few pixels; flat areas agree within 1. A wrong frame index
    # (28 levels apart here), box or flip moves the mean far above this.
    diff = (dali - cpu).abs()
    assert diff.mean() < 0.04 and diff.flatten().quantile(0.9) < 0.1


@needs_dali
def test_dali_decodes_the_trimmed_stream_to_the_frames_of_the_whole_one():
    """DALI itself (its CPU backend, VP9) on a long clip with short GOPs: the trimmed stream and its renumbered
    indices give exactly the clip the whole stream gives."""
    from pipeline.data.decode import DaliDecoder

    data = encoded_clip(300, keyint=30, codec="vp9")
    whole = EncodedSample("k", "video", data, ClipPlan((290, 5, 100, 100, 150, 230, 231, 20), (2, 4, 60, 58), True, 24))
    trimmed = dali_ready(whole)
    assert len(trimmed.data) < 0.5 * len(data)
    decoder = DaliDecoder("cpu", max_batch=1)
    (a, a_fail), (b, b_fail) = decoder.decode([whole]), decoder.decode([trimmed])
    assert a_fail == b_fail == [] and torch.equal(a, b)


@needs_dali
def test_dali_decoder_counts_what_it_cannot_decode(clip_vp9, clip_h264):
    from pipeline.data.decode import DaliDecoder

    plan = ClipPlan((0, 5), (0, 0, 32, 32), False, 16)
    samples = [EncodedSample("ok", "video", clip_vp9, plan), EncodedSample("h264", "video", clip_h264, plan)]
    video, failures = DaliDecoder("cpu", max_batch=2).decode(samples)  # DALI's CPU backend has no H.264
    assert failures == [(1, "corrupt_video")] and video.shape == (1, 3, 2, 16, 16)


@needs_dali
def test_loader_with_the_dali_decoder_matches_the_cpu_decoder(shard_writer, data_cfg, clip_vp9):
    index = shard_writer.corpus("w", shards=2, per_shard=3, clip=clip_vp9)
    batches = {}
    for decoder in ("cpu", "dali"):
        loader = build_loader(data_cfg(index, decoder=decoder, epochs=1), 4, rank=0, world_size=1, seed=5)
        batches[decoder] = list(loader)
        assert loader.stats() == {}
    for a, b in zip(batches["cpu"], batches["dali"]):
        assert a["key"] == b["key"] and a["text"] == b["text"]
        assert (a["video"] - b["video"]).abs().mean() < 0.04


@needs_dali
@pytest.mark.parametrize("workers", [0, 2])
def test_hybrid_decoding_gives_the_batches_of_either_decoder_in_order(shard_writer, data_cfg, clip_vp9, workers):
    """decoder: hybrid hands out the same batches, in the same order, as the CPU decoder: with no backlog allowed
    every batch is decoded in the workers, with an endless one every batch by DALI, and by default the split
    follows how busy DALI is (here, with 2 workers, it is usually half and half)."""
    from pipeline.data.loader import DaliSettings

    index = shard_writer.corpus("w", shards=4, per_shard=6, clip=clip_vp9)
    reference = list(build_loader(data_cfg(index, decoder="cpu", epochs=1, num_workers=workers), 3, rank=0,
                                  world_size=1, seed=5))
    for backlog, used in ((0, {"cpu"}), (10 ** 6, {"dali"}), (None, None)):
        loader = build_loader(data_cfg(index, decoder="hybrid", epochs=1, num_workers=workers), 3, rank=0,
                              world_size=1, seed=5)
        loader.dali = DaliSettings(batch=3, threads=1, pipelines=1, backlog=backlog)
        batches = list(loader)
        assert [b["key"] for b in batches] == [b["key"] for b in reference] and loader.stats() == {}
        assert sum(loader.decoded.values()) == 24 and (used is None or set(loader.decoded) == used)
        for a, b in zip(reference, batches):
            assert a["text"] == b["text"] and (a["video"] - b["video"]).abs().mean() < 0.04


@pytest.mark.parametrize("workers", [0, 1])
def test_the_cpu_decoders_clips_are_normalized_on_the_device_the_loader_is_given(shard_writer, data_cfg, workers):
    """The workers hand over 8-bit pixels; the main process moves them to the loader's device (the stage's training
    device: here "meta", which holds no data) and normalizes them there."""
    index = shard_writer.corpus("w", shards=1, per_shard=4)
    cfg = data_cfg(index, epochs=1, num_workers=workers)
    (batch,) = list(build_loader(cfg, 4, rank=0, world_size=1, seed=0, device=torch.device("meta")))
    assert batch["video"].device.type == "meta" and batch["video"].dtype == torch.float32
    assert batch["video"].shape == (4, 3, 4, 32, 32) and "pixels" not in batch
    (here,) = list(build_loader(cfg, 4, rank=0, world_size=1, seed=0))
    assert here["video"].device.type == "cpu" and here["video"].min() < 0  # normalized


def test_a_dali_backlog_below_one_dali_run_is_refused():
    from pipeline.data.loader import DaliSettings

    with pytest.raises(ValueError, match="at least the DALI batch"):
        DaliSettings(batch=32, backlog=8)
    assert DaliSettings(batch=32, pipelines=2).backlog_limit() == 96 and DaliSettings(backlog=0).backlog_limit() == 0


@needs_dali
@pytest.mark.parametrize("normalize,mean,std", [("imagenet", IMAGENET_MEAN, IMAGENET_STD),
                                                ("clip", CLIP_MEAN, CLIP_STD)])
def test_data_normalize_reaches_the_frames_of_both_decoders(shard_writer, data_cfg, normalize, mean, std):
    """data.normalize is the one place the training normalization is set: the CPU and the DALI decoder both give
    the flat grey-200 jpg as (200/255 - mean) / std of that normalization."""
    index = shard_writer.corpus("i", shards=1, per_shard=3, media="image")
    expect = (200 / 255 - torch.tensor(mean)) / torch.tensor(std)
    for decoder in ("cpu", "dali"):
        batches = list(build_loader(data_cfg(index, decoder=decoder, epochs=1, normalize=normalize), 3, rank=0,
                                    world_size=1, seed=0))
        video = torch.cat([b["video"] for b in batches]).cpu()
        assert torch.allclose(video.mean(dim=(0, 2, 3, 4)), expect, atol=0.05), decoder


@needs_dali
def test_dali_prefetching_hands_out_positions_and_skips_only_with_their_batches(shard_writer, data_cfg, clip_vp9,
                                                                                clip_h264):
    from data_shard_files import sample_files
    from pipeline.data.loader import DaliSettings

    special = {"w0006": sample_files(clip_h264, "mp4", "w0006", ["x"])}  # DALI's CPU backend cannot read H.264
    index = shard_writer.corpus("w", shards=3, per_shard=4, clip=clip_vp9, special=special)
    cfg = data_cfg(index, decoder="dali", num_workers=2, epochs=1)

    def loader():
        built = build_loader(cfg, 2, rank=0, world_size=1, seed=7)
        built.dali = DaliSettings(batch=4, threads=1, pipelines=2)  # groups of 2 batches, 3 groups in flight
        return built

    straight, counted = [], []
    whole = loader()
    for batch in whole:
        straight.append(batch)
        counted.append(whole.stats().get("corrupt_video", 0))
    assert sorted(k for b in straight for k in b["key"]) == [f"w{i:04d}" for i in range(12) if i != 6]
    met = counted.index(1)  # the batch that lost w0006; the seed puts it after the first
    assert met >= 1 and counted[-1] == 1, counted

    first = loader()
    it = iter(first)
    head = [next(it) for _ in range(met)]  # the bad sample's group is decoded by now, its batch not handed out
    assert first.stats() == {}
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    tail = list(resumed)
    assert resumed.stats() == {"corrupt_video": 1}
    assert [b["key"] for b in head + tail] == [b["key"] for b in straight]
    for a, b in zip(straight, head + tail):
        assert torch.equal(a["video"], b["video"])


def test_a_worker_opens_a_video_once_to_plan_and_decode_it(monkeypatch):
    """Opening a container decodes its first frame (FFmpeg's avformat_find_stream_info), so the loader's workers
    plan and decode from one open; the DALI hand-over retimes the packets it takes, and a later use reads afresh."""
    from pipeline.data.loader import SamplePlanner
    from pipeline.data.stream import Corpus, RawSample

    data = h264_in("mp4", 90)
    opens = []
    real_open = av.open
    monkeypatch.setattr(av, "open", lambda *a, **k: opens.append(a) or real_open(*a, **k))
    planner = SamplePlanner([Corpus("c", ("c.tar",), (1,), "video")], seed=0, num_frames=8, img_size=32, fps=None,
                            train=True, crop="multiscale", normalize="clip")
    raw = RawSample(0, 0, 0, 0, "k", {"mp4": data, "txt": b"a caption"})
    with planner.planned(raw) as (sample, text, captions, source):
        pixels = CpuDecoder().pixels_one(sample, source)
    assert len(opens) == 1 and text == "a caption"
    assert torch.equal(CpuDecoder().pixels_one(sample), pixels)  # what opening the bytes anew gives
    opens.clear()
    with planner.planned(raw) as (sample, _, _, source):
        ready = source.dali_ready(sample)
        assert len(opens) == 2 and ready.data is not data  # the source's open and the trimmed stream's writer
        assert torch.equal(source.pixels(sample.plan, threads=1), pixels)  # opened afresh after the hand-over
    assert len(opens) == 3


def test_a_source_decodes_again_and_keeps_refusing_what_is_no_video(clip_h264, jpg_bytes):
    from pipeline.data.decode import VideoSource

    with VideoSource(clip_h264) as source:
        first = source.frames([7, 0, 3], threads=1)
        assert np.array_equal(source.frames([3, 7], threads=1), first[[2, 0]])  # the decoder starts afresh
    still = VideoSource(jpg_bytes)
    for _ in range(2):
        with pytest.raises(DecodeError, match="still image"):
            still.info
