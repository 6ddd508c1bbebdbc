"""`videomamba run`: the demo recipe end to end, then again with every step skipped; the general runner on a recipe
of other manifests (VP9, 80 px); a failing step; a killed Ray Train worker in stage 2; --plan of the 25M recipe."""
import json
import os
import subprocess
import sys
import time
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
    assert second.stdout.count("complete (skipping") == 9
    assert (out / "report.md").read_text() == report


# ------------------------------------------------------------------------------------ the general runner on recipes
TINY_MODEL = ["model.depth=2", "model.embed_dim=64", "model.scan_backend=torch", "data.num_frames=4",
              "data.img_size=64", "data.num_workers=0", "train.batch_size=4", "train.warmup_steps=1",
              "train.progress=false", "train.tensorboard=false", "teacher.img_size=64"]
TINY_TEXT = ["text.fusion_layer=2", "text.max_len=16", "text.embed_dim=32"]


@pytest.fixture(scope="module")
def vp9_corpus(tmp_path_factory):
    """Synthetic manifests that are not the demo's: VP9 clips of 80 px, a tiny open_clip teacher file and a tiny
    BERT directory (bert/)."""
    import torch

    from pipeline.models.text import build_tiny_bert
    from shards.synth import write_corpus
    from tests.conftest import TINY_BERT_CAPTIONS, tiny_clip

    root = tmp_path_factory.mktemp("vp9")
    write_corpus(str(root / "corpus"), videos=12, images=6, seed=3, codec="vp9", size=80, frames=8, eval_videos=6,
                 progress=False)
    model = tiny_clip(root / "teacher", "run-test-vit", image_size=64)
    torch.save({"state_dict": model.state_dict()}, root / "teacher" / "teacher.pt")
    build_tiny_bert(TINY_BERT_CAPTIONS * 4, str(root / "bert"), hidden=32, layers=3, heads=2, max_positions=64)
    return root


def write_recipe(path: Path, corpus: Path, stage2_corpora=("videos", "images"), extra: dict = ()) -> Path:
    """A recipe on the vp9 corpus: stage 1 in one Ray Train worker, stage 2 in this process, the unmasked phase
    sized by epochs, the evaluation of the final model as Ray tasks."""
    import yaml

    recipe = {
        "name": "vp9-test",
        "shard": {"samples_per_shard": 4, "workers": 2},
        "corpora": {"videos": {"input": str(corpus / "corpus" / "videos.jsonl")},
                    "images": {"input": str(corpus / "corpus" / "images.jsonl")}},
        "teacher": {"model": "run-test-vit", "pretrained": str(corpus / "teacher" / "teacher.pt")},
        "text": {"pretrained": str(corpus / "bert")},
        "stage1": {"config": str(REPO / "configs" / "stage1_align.yaml"), "corpora": ["videos"], "workers": 1,
                   "overrides": TINY_MODEL + ["train.max_steps=3", "train.ckpt_every=2"]},
        "stage2": {"config": str(REPO / "configs" / "stage2_video_text.yaml"), "corpora": list(stage2_corpora),
                   "workers": 0, "overrides": TINY_MODEL + TINY_TEXT + ["train.max_steps=3", "train.ckpt_every=2"]},
        "unmasked": {"config": str(REPO / "configs" / "stage2_video_text.yaml"), "corpora": ["videos", "images"],
                     "workers": 0, "epochs": 0.5, "warmup_epochs": 0.1,
                     "overrides": TINY_MODEL + TINY_TEXT + ["train.ckpt_every=2", "mask.ratio=0.0", "loss.align=0.0",
                                                            "train.lr=1.0e-5"]},
        "eval_stage2": {"config": str(REPO / "configs" / "eval_retrieval.yaml"),
                        "overrides": ["eval.num_workers=0", "eval.rerank_k=4"]},
        "evals": {"msrvtt": {"annotations": str(corpus / "corpus" / "eval" / "msrvtt_test.json"),
                             "videos": str(corpus / "corpus" / "eval" / "videos")},
                  "msvd": {"annotations": str(corpus / "corpus" / "eval" / "msvd_test.json"),
                           "videos": str(corpus / "corpus" / "eval" / "videos")}},
        "paper": {"msrvtt": 32.0, "msvd": 38.0},
        **dict(extra),
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_recipe(recipe, out, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--config", str(recipe), "--out", str(out),
                           *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_a_recipe_on_other_manifests_runs_every_step_then_skips_them(vp9_corpus, tmp_path):
    out = tmp_path / "run"
    done = run_recipe(write_recipe(tmp_path / "recipe.yaml", vp9_corpus), out)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = ["shard_videos", "shard_images", "stage1", "stage2", "unmasked", "eval_stage2"]
    assert all((out / "steps" / f"{s}.json").exists() for s in steps)
    assert not (out / "steps" / "synth.json").exists() and not (out / "teacher").exists()
    index = json.loads((out / "shards" / "videos" / "index.json").read_text())
    assert sum(s["samples"] for s in index["shards"]) == 12
    assert (out / "stage1" / "ray").is_dir()  # stage 1 ran as a Ray Train job
    for name, last in (("stage1", 3), ("stage2", 3), ("unmasked", 3)):  # unmasked: ceil(0.5 * 18 / 4) steps
        records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == list(range(1, last + 1)), name
        assert (out / name / "config.yaml").exists()
    unmasked = (out / "unmasked" / "config.yaml").read_text()
    assert f"init: {out / 'stage2'}" in unmasked and "ratio: 0.0" in unmasked
    assert "starts from" in (out / "logs" / "unmasked.log").read_text()
    assert "the whole stage-2 model" in (out / "logs" / "unmasked.log").read_text()
    result = json.loads((out / "eval_stage2" / "retrieval_msrvtt.json").read_text())
    assert result["counts"]["videos_evaluated"] == 6 and result["config"]["model"]["kind"] == "videomamba"
    report = (out / "report.md").read_text()
    assert "| eval_stage2 | msrvtt | 6 |" in report and report.rstrip().endswith(".png)")
    assert "| 32.0 |" in report and "| 38.0 |" in report
    html = (out / "report.html").read_text()
    for png in ("loss_stage1.png", "loss_stage2.png", "loss_unmasked.png", "lr.png", "clips_per_s.png"):
        assert (out / "plots" / png).read_bytes()[:4] == b"\x89PNG" and f"plots/{png}" in html

    again = run_recipe(tmp_path / "recipe.yaml", out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("complete (skipping") == len(steps)
    assert (out / "report.md").read_text() == report


@pytest.mark.slow
def test_a_failing_step_stops_the_run_naming_it_and_keeps_the_others(vp9_corpus, tmp_path):
    """Stage 2 reads a corpus whose shards are gone: the run stops there with the step, its log and what to do; the
    shard steps and stage 1 keep their outputs, and a rerun skips them and stops at stage 2 again."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "index.json").write_text(json.dumps({"shards": [{"url": "gone-000000.tar", "samples": 4}],
                                                   "media": "video"}))
    recipe = write_recipe(tmp_path / "recipe.yaml", vp9_corpus, stage2_corpora=("gone",),
                          extra={"corpora": {"videos": {"input": str(vp9_corpus / "corpus" / "videos.jsonl")},
                                             "images": {"input": str(vp9_corpus / "corpus" / "images.jsonl")},
                                             "gone": {"shards": str(broken / "index.json")}}})
    out = tmp_path / "run"
    done = run_recipe(recipe, out, "stage1.workers=0", "unmasked.config=", "eval_stage2.config=")
    assert done.returncode == 1, done.stderr[-3000:]
    log = out / "logs" / "stage2.log"
    assert "videomamba run: step stage2 failed: " in done.stderr and f"log: {log}" in done.stderr
    assert "resumes stage2 from its newest checkpoint" in done.stderr
    assert log.exists() and "Traceback" in log.read_text()
    assert {"shard_videos.json", "stage1.json", "stage2.failed.json"} <= set(os.listdir(out / "steps"))
    assert not (out / "steps" / "stage2.json").exists()
    stage1 = (out / "stage1" / "metrics.jsonl").read_text()

    again = run_recipe(recipe, out, "stage1.workers=0", "unmasked.config=", "eval_stage2.config=")
    assert again.returncode == 1 and "step stage2 failed" in again.stderr
    assert "stage1: complete (skipping" in again.stdout and (out / "stage1" / "metrics.jsonl").read_text() == stage1


def test_plan_of_the_25m_recipe_prices_every_step_without_touching_data(capsys):
    """`--plan` on the paper's 25M recipe: every step with its samples, steps and GPU-hours; no file outside the
    configs is opened or listed."""
    from pipeline.cli import main

    touched = []

    def audit(event, args):
        if event in ("open", "os.listdir", "os.scandir") and args and "/path/to" in str(args[0]):
            touched.append((event, args[0]))

    sys.addaudithook(audit)
    assert main(["run", "--config", str(REPO / "configs" / "recipes" / "videomamba_m_25m.yaml"), "--plan",
                 "--out", "/path/to/run"]) == 0
    table = capsys.readouterr().out
    assert not touched, touched
    assert not os.path.exists("/path/to/run")
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert {"shard_k400", "shard_webvid10m", "shard_cc12m", "stage1", "stage2", "unmasked", "eval_stage2"} <= set(rows)
    assert "| 25,473,000 |" in rows["stage2"] and "(10.0 epochs)" in rows["stage2"]
    assert "94,038 x 2048 clips (801.0 epochs)" in rows["stage1"]  # ceil(801 * 240,436 / (64 * 32))
    for step, priced_by in (("stage1", "whole step 194.8"), ("stage2", "whole step 198.2"),
                            ("unmasked", "backbone step")):
        hours = rows[step].split("|")[5].strip()
        assert hours[0].isdigit() and "GPUs; " + priced_by in hours, rows[step]
    assert rows["stage1"].split("|")[5].strip().startswith(f"{94_038 * 2048 / 194.8 / 3600:,.2f} (")
    assert "Training total: " in table


def test_a_recipe_naming_an_unknown_corpus_is_a_config_error(tmp_path, capsys):
    from pipeline.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text("stage1:\n  config: stage1_align.yaml\n  corpora: [k400]\n")
    assert main(["run", "--config", str(recipe), "--plan"]) == 2
    assert "reads corpus 'k400', which is not under corpora" in capsys.readouterr().err


@pytest.mark.slow
def test_stage2_in_two_ray_workers_survives_a_killed_worker_with_the_same_losses(vp9_corpus, tmp_path):
    """Stage 2 inside the pipeline as a 2-worker Ray Train job (gloo, ZeRO-2): one worker is killed with SIGKILL
    after step 7 (checkpoints every 6 steps, so the next one is 5 steps away: a slow machine cannot race past it);
    Ray restarts the workers (ray.max_failures), they resume from the newest checkpoint, the steps done twice give
    the same losses, the step completes with every step logged once, and its 16 losses are those of the same run
    never interrupted."""
    import psutil

    recipe = write_recipe(tmp_path / "recipe.yaml", vp9_corpus)
    out = tmp_path / "run"
    args = ["stage1.workers=0", "unmasked.config=", "eval_stage2.config=", "ray.max_failures=1", "stage2.workers=2",
            "stage2.overrides=[" + ", ".join(TINY_MODEL + TINY_TEXT + [
                "train.max_steps=16", "train.ckpt_every=6", "deepspeed.zero_stage=2", "train.batch_size=2"]) + "]"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", "--config", str(recipe), "--out", str(out),
                             *args], cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    metrics_file = out / "stage2" / "metrics.jsonl"
    try:
        deadline = time.time() + 600
        while proc.poll() is None and not ((out / "stage2" / "checkpoints" / "step_00000006").exists()
                                           and len(_complete_lines(metrics_file)) >= 7):
            assert time.time() < deadline, "no step-6 checkpoint and step 7 of stage 2 within 600 s"
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        workers = [p for p in psutil.process_iter(["cmdline"]) if "ray::RayTrainWorker" in " ".join(
            p.info["cmdline"] or [])]
        assert workers, "no Ray Train worker process found"
        workers[-1].kill()
        # read right after the kill: what was logged before it (the restart takes seconds to rewind the log)
        before = {r["step"]: r["loss"] for r in map(json.loads, _complete_lines(metrics_file))}
        output, _ = proc.communicate(timeout=800)
    finally:
        proc.kill()
    assert proc.returncode == 0, output[-3000:]
    marker = json.loads((out / "steps" / "stage2.json").read_text())
    resumed = int(marker["resumed_from"].rsplit("_", 1)[1])
    assert resumed >= 6 and max(before) > resumed and marker["step"] == 16  # some steps were done twice
    after = {r["step"]: r["loss"] for r in map(json.loads, _complete_lines(metrics_file))}
    assert sorted(after) == list(range(1, 17))
    assert all(after[step] == loss for step, loss in before.items()), (before, after)
    # the same run, never interrupted: every step's loss is the killed run's
    plain = tmp_path / "uninterrupted"
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--config", str(recipe), "--out", str(plain),
                           *args], cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=800)
    assert done.returncode == 0, done.stdout[-3000:]
    uninterrupted = {r["step"]: r["loss"] for r in map(json.loads, _complete_lines(plain / "stage2" / "metrics.jsonl"))}
    assert uninterrupted == pytest.approx(after, rel=1e-6, abs=1e-6), (uninterrupted, after)


def _complete_lines(path: Path) -> list[str]:
    """The lines of a file being written that are complete (the last one may be cut)."""
    text = path.read_text() if path.exists() else ""
    return [line for line in text.split("\n")[:-1] if line.strip()]
