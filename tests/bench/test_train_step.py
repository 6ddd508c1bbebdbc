"""bench/train_step.py on the CPU: every code path of the measured step in its --quick shapes (synthetic input, real
tiny shards through the CPU decoder, the split, the profiler, the loader's ceiling), and the arithmetic of its
report (FLOPs, GPU busy from a trace, the multi-GPU projection)."""
import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import av
import pytest

import torch

from bench.train_step import (PartTimer, busy_from_trace, idle_by_part, interval_union, mamba_block_flops, projection,
                              vit_layer_flops, with_official_mask_count)

REPO = Path(__file__).resolve().parents[2]


def run_bench(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "bench.train_step", "--quick", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def check_run(run, batch):
    assert run["batch"] == batch and run["steps"] >= 1
    assert run["step_ms"] > 0 and run["clips_per_s"] == pytest.approx(1e3 * batch / run["step_ms"], rel=1e-6)
    assert 0 <= run["data_wait_ms"] <= run["step_ms"]
    assert all(v == v and abs(v) < 1e4 for v in run["losses"])  # finite
    if run["mode"] == "split":
        assert sum(run["parts_ms"].values()) <= run["step_ms"] * 1.001
        assert sum(run["parts_ms"].values()) >= run["step_ms"] * 0.95  # the parts are the whole step


def test_stage1_quick_on_synthetic_input_and_through_dali(tmp_path):
    """DALI here is its CPU backend, which reads VP9 (the GPU run reads H.264 through NVDEC); hybrid decoding adds
    the CPU decoder in the workers."""
    out = tmp_path / "train_step_stage1.json"
    proc = run_bench("--stage", "1", "--data", "dali", "hybrid", "--make-shards", str(tmp_path / "data"),
                     "--source-codec", "vp9", "--loader-ceiling", "--json", str(out), "--trace-dir",
                     str(tmp_path / "traces"))
    record = json.loads(out.read_text())
    assert record["stage"] == 1 and record["device"] == "cpu" and record["batch"] == 2
    assert [(r["data"], r["mode"]) for r in record["runs"]] == [
        ("synthetic", "unsplit"), ("synthetic", "split"), ("synthetic", "profile"), ("dali", "unsplit"),
        ("dali", "split"), ("dali", "profile"), ("hybrid", "unsplit")]
    assert record["runs"][3]["decoded"]["dali"] >= 2 * record["runs"][3]["steps"]
    assert set(record["runs"][6]["decoded"]) <= {"cpu", "dali"} and sum(record["runs"][6]["decoded"].values()) >= 2
    dali, hybrid = record["loader"]
    assert dali["decoder"] == "dali" and dali["clips_per_s"] > 0 and set(dali["decoded"]) == {"dali"}
    assert hybrid["decoder"] == "hybrid" and hybrid["clips_per_s"] > 0 and sum(hybrid["decoded"].values()) > 0
    for run in record["runs"]:
        check_run(run, 2)
    split = record["runs"][1]["parts_ms"]
    assert {"teacher", "student_fwd", "student_bwd", "optimizer"} <= set(split) and "text_fwd" not in split
    traces = sorted(p.name for p in (tmp_path / "traces").iterdir())  # the profiled runs' traces, with part marks
    assert traces == ["train_step_stage1_dali.json.gz", "train_step_stage1_synthetic.json.gz"]
    with gzip.open(tmp_path / "traces" / traces[1], "rt") as f:
        names = {e.get("name") for e in json.load(f)["traceEvents"]}
    assert {"train_step", "part=teacher", "part=student_fwd", "part=student_bwd", "part=optimizer"} <= names
    flops = record["flops"]
    assert flops["per_clip_fwd_bwd"] == pytest.approx(flops["teacher_fwd"] + 3 * flops["student_fwd"])
    assert flops["backbone_tokens"] == 1 + 2 * (16 - 12)  # 2 frames of 4x4 patches, 12 of 16 masked (official count)
    assert record["config"]["train"]["batch_size"] == 2 and record["config"]["deepspeed"]["zero_stage"] == 1
    assert record["config"]["train"]["betas"] == [0.9, 0.95]  # the recipe's stage 1 (run_mask_pretrain.sh)
    assert [p["gpus"] for p in record["projection"]] == [8, 64, 256]
    assert "| synthetic | split |" in proc.stdout
    summary = run_bench("--summary", str(tmp_path)).stdout  # the comparison's report, without the official's record
    assert "## Targets (issue 23)" in summary and "| >= 2x the official clips/s | 1 | official: not run | - |" in summary


def test_stage2_quick_with_real_shards_through_the_cpu_decoder(tmp_path):
    out = tmp_path / "s2.json"
    run_bench("--stage", "2", "--data", "cpu", "--make-shards", str(tmp_path / "data"), "--source-keyint", "4",
              "--loader-ceiling", "--profile-steps", "0", "--json", str(out))
    record = json.loads(out.read_text())
    assert [(r["data"], r["mode"]) for r in record["runs"]] == [("synthetic", "unsplit"), ("synthetic", "split"),
                                                                 ("cpu", "unsplit")]
    for run in record["runs"]:
        check_run(run, 2)
    split = record["runs"][1]["parts_ms"]
    assert {"teacher", "student_fwd", "student_bwd", "text_fwd", "text_bwd", "optimizer"} <= set(split)
    assert record["flops"]["text_fwd"] > 0
    assert record["config"]["loss"] == {"vtc": 1.0, "vtm": 1.0, "mlm": 1.0, "align": 1.0, "mlm_prob": 0.5}
    (ceiling,) = record["loader"]
    assert ceiling["decoder"] == "cpu" and ceiling["clips_per_s"] > 0 and ceiling["x_step"] > 0
    assert ceiling["warmup_batches"] == 2 * 1 + 2  # past the loader's in-flight batches (1 worker x prefetch 2)
    assert record["source"]["videos"] == 8 and record["source"]["bytes_per_clip"] > 0
    assert record["source"]["keyint"] == 4
    with tarfile.open(next((tmp_path / "data" / "shards").glob("*.tar"))) as tar:  # re-encoded: 8 frames, 2 GOPs
        clip = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith(".mp4"))).read()
    with av.open(io.BytesIO(clip)) as container:
        packets = [p for p in container.demux(container.streams.video[0]) if p.size]
    assert len(packets) == 8 and sum(p.is_keyframe for p in packets) == 2


def test_a_variant_of_a_stage_gets_its_own_rows_in_the_summary(tmp_path):
    """The lever bench/gpu_train_step.sh's `grads` phase measures: bf16 with fp32 gradient accumulation, which
    DeepSpeed steps with its BF16_Optimizer (CPU bf16 here); the summary labels it beside the plain stage. Its point
    is fewer host ops in the optimizer step (DeepSpeed's ZeRO-1 bf16 step checks and copies every gradient tensor):
    the `ops` run counts them, and the same aten ops run on a GPU."""
    common = ("--stage", "1", "--split-steps", "0", "--profile-steps", "0", "--ops-steps", "1",
              "--override", "train.precision=bf16")
    run_bench(*common, "--json", str(tmp_path / "train_step_stage1.json"))
    run_bench(*common, "--override", "train.grad_accum_dtype=fp32",
              "--json", str(tmp_path / "train_step_stage1_fp32grads.json"))
    variant = json.loads((tmp_path / "train_step_stage1_fp32grads.json").read_text())
    assert variant["config"]["train"]["grad_accum_dtype"] == "fp32"
    assert variant["config"]["train"]["precision"] == "bf16"
    check_run(variant["runs"][0], 2)
    plain = json.loads((tmp_path / "train_step_stage1.json").read_text())
    ops = {name: next(r for r in record["runs"] if r["mode"] == "ops")["ops_per_step"]
           for name, record in (("bf16", plain), ("fp32grads", variant))}
    assert {"teacher", "student_fwd", "student_bwd", "optimizer"} <= set(ops["bf16"]) == set(ops["fp32grads"])
    assert ops["fp32grads"]["optimizer"] < 0.5 * ops["bf16"]["optimizer"], ops
    assert ops["fp32grads"]["teacher"] == ops["bf16"]["teacher"]  # the frozen teacher is the same work
    summary = run_bench("--summary", str(tmp_path)).stdout
    assert "host ops (synthetic, aten ops dispatched per step, by part)" in summary
    assert "| >= 2x the official clips/s | 1 | official: not run | - |" in summary
    assert "| >= 2x the official clips/s | 1 (fp32grads) | official: not run | - |" in summary
    assert "## Ours, stage 1\n" in summary and "## Ours, stage 1 (fp32grads)\n" in summary


def test_stage2_on_whole_batches_of_one_frame_images(tmp_path):
    """--images: the step on a batch of 1-frame images as data.mix=batch gives it (no temporal embedding, the
    image mask ratio 0.5): the model sees 1 + 8 of the 4x4 patches, the teacher one frame."""
    out = tmp_path / "train_step_stage2_images.json"
    run_bench("--stage", "2", "--images", "--profile-steps", "0", "--json", str(out))
    record = json.loads(out.read_text())
    assert record["media"] == "image" and [r["mode"] for r in record["runs"]] == ["unsplit", "split"]
    for run in record["runs"]:
        check_run(run, 2)
    assert record["flops"]["backbone_tokens"] == 1 + 8
    video = run_bench("--stage", "2", "--split-steps", "0", "--profile-steps", "0",
                      "--json", str(tmp_path / "train_step_stage2.json"))
    assert "batch 2 of 1-frame images" not in video.stdout
    videos = json.loads((tmp_path / "train_step_stage2.json").read_text())
    assert videos["flops"]["teacher_fwd"] == pytest.approx(2 * record["flops"]["teacher_fwd"])  # 2 frames against 1
    summary = run_bench("--summary", str(tmp_path)).stdout
    assert "| 2 (images) | official: timed on video batches; no image-batch counterpart | - |" in summary
    assert "batch 2 of 1-frame images" in summary
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    bad = subprocess.run([sys.executable, "-m", "bench.train_step", "--quick", "--stage", "1", "--images"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--images is stage 2" in bad.stderr


def test_stage2_on_image_and_clip_batches_in_turn(tmp_path):
    """--alternate: data.mix=batch's two kinds, one a step; FLOPs per sample the mean of a clip's and an image's."""
    out = tmp_path / "train_step_stage2_alternate.json"
    run_bench("--stage", "2", "--alternate", "--split-steps", "0", "--profile-steps", "0", "--json", str(out))
    record = json.loads(out.read_text())
    assert record["media"] == "alternate" and record["runs"][0]["mode"] == "unsplit"
    check_run(record["runs"][0], 2)
    assert record["flops"]["backbone_tokens"] == 9  # the quick shapes: an image's 1 + 8, a clip's 1 + 8 of 2 frames
    summary = run_bench("--summary", str(tmp_path)).stdout
    assert "| 2 (alternate) | official: timed on video batches; no image-batch counterpart | - |" in summary
    assert "image and clip batches in turn" in summary
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    bad = subprocess.run([sys.executable, "-m", "bench.train_step", "--quick", "--stage", "2", "--images",
                          "--alternate"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "pick one" in bad.stderr


def test_flops_of_the_papers_shapes():
    # VideoMamba-M block per token (D 576, E 1152, N 16, R 36, K 4) and a ViT-B/16 layer on 197 tokens
    assert mamba_block_flops(576, 1152, 16, 36, 4) == 4_700_160
    assert vit_layer_flops(197, 768) == 24 * 197 * 768 ** 2 + 4 * 197 ** 2 * 768


def test_the_official_mask_count():
    class Cfg:
        class data:
            img_size = 224

        class model:
            patch_size = 16

        class mask:
            ratio = 0.8
    with_official_mask_count(Cfg)
    assert round(Cfg.mask.ratio * 196) == 156  # int(0.8 * 196), where round(0.8 * 196) is 157


def test_gpu_busy_is_the_union_of_device_intervals_over_the_steps():
    assert interval_union([(0, 2), (1, 3), (5, 6), (5.5, 5.8)]) == 4
    trace = {"traceEvents": [
        {"name": "train_step", "cat": "user_annotation", "ts": 100, "dur": 50},
        {"name": "train_step", "cat": "user_annotation", "ts": 150, "dur": 50},
        {"name": "k1", "cat": "kernel", "ts": 110, "dur": 30},
        {"name": "k2", "cat": "kernel", "ts": 130, "dur": 20},  # overlaps k1 (two streams)
        {"name": "m", "cat": "gpu_memcpy", "ts": 190, "dur": 20},  # ends after the last annotation
        {"name": "early", "cat": "kernel", "ts": 0, "dur": 50},  # before the steps: not counted
        {"name": "cpu", "cat": "cpu_op", "ts": 120, "dur": 5}]}
    busy, wall = busy_from_trace(trace)
    assert busy == 40 + 20 and wall == 110
    assert busy_from_trace({"traceEvents": [{"name": "train_step", "cat": "user_annotation", "ts": 0,
                                             "dur": 5}]}) == (None, 5)


def test_gpu_idle_goes_to_the_part_the_host_was_in_when_it_launched_the_work_that_ended_it():
    trace = {"traceEvents": [
        {"name": "train_step", "cat": "user_annotation", "ts": 100, "dur": 100},
        {"name": "part=teacher", "cat": "user_annotation", "ts": 101, "dur": 0},
        {"name": "cudaLaunchKernel", "cat": "cuda_runtime", "ts": 102, "dur": 1, "args": {"correlation": 1}},
        {"name": "part=student_bwd", "cat": "user_annotation", "ts": 120, "dur": 0},
        {"name": "cudaLaunchKernel", "cat": "cuda_runtime", "ts": 140, "dur": 1, "args": {"correlation": 2}},
        {"name": "cudaGraphLaunch", "cat": "cuda_runtime", "ts": 141, "dur": 1, "args": {"correlation": 3}},
        {"name": "k1", "cat": "kernel", "ts": 110, "dur": 20, "args": {"correlation": 1}},  # 10 idle: teacher's
        {"name": "k2", "cat": "kernel", "ts": 145, "dur": 5, "args": {"correlation": 2}},  # 15 idle: student_bwd's
        {"name": "k3", "cat": "kernel", "ts": 148, "dur": 10, "args": {"correlation": 3}},  # overlaps k2: none
        {"name": "k4", "cat": "kernel", "ts": 170, "dur": 5, "args": {"correlation": 9}},  # launch not traced
        {"name": "k0", "cat": "kernel", "ts": 50, "dur": 5, "args": {"correlation": 8}}]}  # before the steps
    assert idle_by_part(trace) == {"teacher": 10, "student_bwd": 15, "unknown": 12}
    assert idle_by_part({"traceEvents": []}) == {}


def test_an_annotating_part_timer_marks_each_change_of_part_in_the_profilers_trace(tmp_path):
    timer = PartTimer(split=False, annotate=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with timer.region("teacher"):
            torch.ones(4).sum()
        timer.enter("text_bwd")
        timer.switch("text_bwd", "student_bwd")
        timer.leave("student_bwd")
    prof.export_chrome_trace(str(tmp_path / "trace.json"))
    events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    marks = [e["name"] for e in sorted(events, key=lambda e: e.get("ts", 0)) if e.get("name", "").startswith("part=")]
    assert marks == ["part=teacher", "part=other", "part=text_bwd", "part=student_bwd", "part=other"]


def test_projection_adds_communication_and_never_gains():
    rows = projection(0.5, 128, 200_000_000, stage=2)
    assert [r["gpus"] for r in rows] == [8, 64, 256] and [r["nodes"] for r in rows] == [1, 8, 32]
    for r in rows:
        assert 0 < r["efficiency"] <= 1 and r["step_ms"] >= 500
        assert r["clips_per_s"] == pytest.approx(r["gpus"] * 128 / (r["step_ms"] / 1e3))
    # across nodes the gradients cross InfiniBand: slower than within the NVLink node
    assert rows[1]["grad_sync_ms"] > rows[0]["grad_sync_ms"]
    assert projection(0.5, 64, 75_000_000, stage=1)[0]["embed_gather_ms"] == 0
