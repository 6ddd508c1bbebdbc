"""`videomamba run`: the whole pipeline on a tiny synthetic corpus, end to end, then again with every step skipped."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ["synth.videos=24", "synth.images=12", "synth.eval_videos=8", "synth.frames=8", "teacher.steps=8",
        "shard.samples_per_shard=8", "text.hidden=32", "text.layers=2", "text.heads=2",
        "stage1.overrides=[model.depth=2, model.embed_dim=64, data.num_frames=4, data.img_size=64, "
        "data.num_workers=0, train.max_steps=4, train.batch_size=4, train.warmup_steps=1, train.ckpt_every=2, "
        "teacher.model=tiny-clip, teacher.img_size=64, train.progress=false, train.tensorboard=false]",
        "stage2.overrides=[model.depth=2, model.embed_dim=64, data.num_frames=4, data.img_size=64, "
        "data.num_workers=0, text.fusion_layer=1, text.max_len=16, "
        "text.embed_dim=32, train.max_steps=4, train.batch_size=4, train.warmup_steps=1, train.ckpt_every=2, "
        "teacher.model=tiny-clip, teacher.img_size=64, train.progress=false, train.tensorboard=false]"]


def run(out):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--config", str(REPO / "configs" / "demo.yaml"),
                           "--out", str(out), *TINY], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_run_goes_end_to_end_then_skips_complete_steps(tmp_path):
    out = tmp_path / "demo"
    first = run(out)
    assert first.returncode == 0, first.stderr[-3000:]
    for step in ("synth", "shard_videos", "shard_images", "teacher", "eval_teacher", "stage1", "text", "stage2",
                 "eval_stage2"):
        assert (out / "steps" / f"{step}.json").exists(), step
    index = json.loads((out / "shards" / "videos" / "index.json").read_text())
    assert sum(s["samples"] for s in index["shards"]) == 24
    assert (out / "teacher" / "tiny_clip.pt").exists()
    metrics = [json.loads(line) for line in (out / "stage1" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    for dataset in ("msrvtt", "msvd"):
        assert all((out / "eval" / f"retrieval_{dataset}.{ext}").exists() for ext in ("json", "md", "png")), dataset
    msrvtt = json.loads((out / "eval" / "retrieval_msrvtt.json").read_text())
    assert msrvtt["counts"]["videos_evaluated"] == 8 and msrvtt["config"]["model"]["name"] == "tiny-clip"
    report = (out / "report.md").read_text()
    assert "| stage1 | 4 steps; alignment loss" in report and report in first.stdout
    assert "| eval_teacher | zero-shot (CLIP meanP) T2V R@1 " in report
    assert "(MSRVTT format, 8 videos; chance 1/8)" in report
    stage2 = [json.loads(line) for line in (out / "stage2" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in stage2] == [1, 2, 3, 4] and {"vtc", "vtm", "mlm", "align"} <= stage2[0].keys()
    assert "| stage2 | 4 steps; vtc " in report
    assert "| eval_stage2 | zero-shot (VideoMamba stage 2) T2V R@1 " in report
    reranked = json.loads((out / "eval_stage2" / "retrieval_msrvtt.json").read_text())
    assert reranked["rerank"]["applied"] and reranked["counts"]["videos_evaluated"] == 8

    second = run(out)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("complete (skipping") == 8
    assert (out / "report.md").read_text() == report
