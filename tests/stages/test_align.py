"""Stage 1 end to end on the CPU: `videomamba pretrain` on tiny real shards of synthetic mp4s, a tiny VideoMamba and
a tiny open_clip teacher loaded from a checkpoint file; the loss falls, the run directory has what the CLI contract
lists, and `--resume auto` continues from the last checkpoint exactly.

The runs read the shards in a DataLoader worker (data.num_workers=1): the loader starts its workers on the first
batch, after a resumed engine restored the global RNG, so this also checks that starting them leaves that RNG alone.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.cli import main
from pipeline.config import AlignStageConfig, load_config
from tests.conftest import tiny_clip
from tests.stages.stage_helpers import REPO, metrics, run_cli, stage_args


def test_pretrain_aligns_writes_the_run_directory_and_resumes(shards, teacher_file, tmp_path):
    out = tmp_path / "run"
    done = run_cli(stage_args(shards, teacher_file, out, steps=40))
    assert done.returncode == 0, done.stderr[-3000:]

    records = metrics(out)
    assert [r["step"] for r in records] == list(range(1, 41))
    losses = [r["align"] for r in records]
    assert all(r["loss"] == pytest.approx(r["align"]) for r in records)
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10]), losses

    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["stage"] == "align" and resolved["train"]["max_steps"] == 40
    assert resolved["teacher"]["pretrained"] == teacher_file and resolved["mask"]["kind"] == "attention"
    assert load_config(AlignStageConfig, str(out / "config.yaml")).model.depth == 2  # loads back as a config
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["step_00000020", "step_00000040"]
    assert all((out / "checkpoints" / c / "COMPLETE.json").exists() for c in checkpoints)

    # resume from step 20 in a copy of the run: steps 21-40 repeat exactly (masks come from the checkpointed RNG)
    copy = tmp_path / "resumed"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "checkpoints" / "step_00000040")
    again = run_cli(stage_args(shards, teacher_file, copy, steps=40) + ["--resume", "auto"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert '"start_step": 20' in again.stdout
    assert [r["loss"] for r in metrics(copy)] == [r["loss"] for r in records]


def test_a_stage1_run_guides_a_wider_student_by_self_distillation(shards, teacher_file, tmp_path):
    """The paper's self-distillation: a small trained run (its folder as distill.checkpoint) guides a wider student
    with tubelets of 2 frames, in bf16 (the guide follows the batch's dtype and the student's token grid)."""
    tubelets = ["model.tubelet_size=2"]
    guide = run_cli(stage_args(shards, teacher_file, tmp_path / "guide", steps=4,
                               extra=tubelets + ["model.embed_dim=32", "train.ckpt_every=4"]))
    assert guide.returncode == 0, guide.stderr[-3000:]
    student = tmp_path / "student"
    done = run_cli(stage_args(shards, teacher_file, student, steps=4, extra=tubelets + [
        "train.precision=bf16", "distill.enabled=true", f"distill.checkpoint={tmp_path / 'guide'}",
        "distill.depth=2", "distill.embed_dim=32", "distill.weight=0.5"]))
    assert done.returncode == 0, done.stderr[-3000:]
    records = metrics(student)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["distill"] > 0 and r["loss"] == pytest.approx(r["align"] + 0.5 * r["distill"], rel=2e-2)
               for r in records)
    not_a_run = run_cli(stage_args(shards, teacher_file, tmp_path / "x", steps=1, extra=[
        "distill.enabled=true", f"distill.checkpoint={tmp_path}", "distill.depth=2", "distill.embed_dim=32"]))
    assert not_a_run.returncode == 2 and "not a usable stage-1 run" in not_a_run.stderr


def test_a_run_that_stops_as_configured_exits_1_with_a_message(shards, teacher_file, tmp_path):
    done = run_cli(stage_args(shards, teacher_file, tmp_path / "run", steps=50, extra=["data.epochs=1"]))
    assert done.returncode == 1
    assert "videomamba pretrain: stage align stopped: the data ran out during step" in done.stderr
    assert "Traceback" not in done.stderr


def test_pretrain_help_lists_the_main_keys(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["pretrain", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for key in ("--config", "--resume", "model.size", "data.train", "data.num_frames", "data.img_size",
                "train.max_steps", "train.batch_size", "train.ckpt_every", "train.seed", "train.out",
                "deepspeed.zero_stage", "teacher.pretrained", "mask.kind"):
        assert key in text, key


@pytest.mark.parametrize("extra,message", [
    (["train.max_step=3"], "did you mean 'train.max_steps'"),
    (["mask.kind=diagonal"], "mask.kind"),
    (["teacher.img_size=224"], "set teacher.img_size=64"),
    (["mask.kind=clip_row", "mask.ratio=0.9"], "masks all 4 rows"),
    (["stage=captioning"], "stage 'captioning'"),
    (["data.train="], "data.train is empty"),
    (["deepspeed.config=/nonexistent/ds.json"], "deepspeed.config: file not found: /nonexistent/ds.json"),
])
def test_bad_configs_exit_2_naming_the_problem(shards, teacher_file, tmp_path, capsys, extra, message):
    assert main(stage_args(shards, teacher_file, tmp_path / "run", steps=2, extra=extra)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_teacher_patch_size_other_than_the_students_is_refused(shards, tmp_path, capsys):
    folder = tmp_path / "teacher32"
    torch.save(tiny_clip(folder, "vit-p32", image_size=64, patch_size=32).state_dict(), folder / "teacher.pt")
    args = stage_args(shards, str(folder / "teacher.pt"), tmp_path / "run", steps=2, extra=["teacher.model=vit-p32"])
    assert main(args) == 2
    assert "grid does not match" in capsys.readouterr().err


TWO_PROCESS_RUN = ["deepspeed.zero_stage=2", "train.ckpt_every=3"]


@pytest.fixture(scope="module")
def torchrun_run(shards, teacher_file, tmp_path_factory):
    """Stage 1 under torchrun with 2 CPU processes, ZeRO-2, 6 steps: its run directory and completed process."""
    out = tmp_path_factory.mktemp("torchrun") / "run"
    args = stage_args(shards, teacher_file, out, steps=6, extra=TWO_PROCESS_RUN)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", "-m", "pipeline.cli", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return out, done


@pytest.mark.slow
def test_pretrain_under_torchrun_with_two_processes(torchrun_run):
    out, done = torchrun_run
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["step"] for r in metrics(out)] == list(range(1, 7))
    for step in ("step_00000003", "step_00000006"):
        assert {"rank_00000.pt", "rank_00001.pt", "COMPLETE.json"} <= set(os.listdir(out / "checkpoints" / step))


@pytest.mark.slow
def test_pretrain_in_two_ray_train_workers_repeats_the_torchrun_run(shards, teacher_file, tmp_path, torchrun_run):
    """`--ray-workers 2`: a local Ray cluster, Ray Train's gloo process group, the same engine: the same losses as
    the torchrun run of the same config, and the same checkpoints."""
    out = tmp_path / "run"
    done = run_cli(stage_args(shards, teacher_file, out, steps=6, extra=TWO_PROCESS_RUN) + ["--ray-workers", "2"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert '"step": 6' in done.stdout and f'"run_dir": "{out}"' in done.stdout
    assert [r["loss"] for r in metrics(out)] == [r["loss"] for r in metrics(torchrun_run[0])]
    for step in ("step_00000003", "step_00000006"):
        assert {"rank_00000.pt", "rank_00001.pt", "COMPLETE.json"} <= set(os.listdir(out / "checkpoints" / step))


@pytest.mark.slow
def test_a_two_process_run_resumes_in_one_process(shards, teacher_file, tmp_path, torchrun_run):
    """A node lost: the 2-process run's step-3 checkpoint continues in 1 process (weights, step, and the data
    stream re-dealt over the new layout without repeating a sample of the epoch)."""
    copy = tmp_path / "resumed"
    shutil.copytree(torchrun_run[0], copy)
    shutil.rmtree(copy / "checkpoints" / "step_00000006")
    done = run_cli(stage_args(shards, teacher_file, copy, steps=6, extra=TWO_PROCESS_RUN) + ["--resume", "auto"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert '"start_step": 3' in done.stdout and "written by 2 processes, this run has 1" in done.stderr
    records = metrics(copy)
    assert [r["step"] for r in records] == list(range(1, 7)) and all(np.isfinite(r["loss"]) for r in records)


@pytest.mark.slow
def test_ray_restarts_a_killed_worker_and_the_run_goes_on_exactly(shards, teacher_file, tmp_path):
    """--ray-max-failures: one of 2 Ray Train workers is killed with SIGKILL after the step-10 checkpoint; Ray starts
    the workers again, they resume from the newest checkpoint, and the steps they repeat give the same losses."""
    import psutil

    out = tmp_path / "run"
    args = stage_args(shards, teacher_file, out, steps=30, extra=["deepspeed.zero_stage=2", "train.ckpt_every=5"])
    args += ["--ray-workers", "2", "--ray-max-failures", "1", "--resume", "auto"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while proc.poll() is None and not ((out / "checkpoints" / "step_00000010").exists()
                                           and len(_complete_lines(out / "metrics.jsonl")) >= 12):
            assert time.time() < deadline, "no step-10 checkpoint and step 12 within 300 s"
            time.sleep(0.1)
        before = {r["step"]: r["loss"] for r in map(json.loads, _complete_lines(out / "metrics.jsonl"))}
        workers = [p for p in psutil.process_iter(["cmdline"]) if "ray::RayTrainWorker" in " ".join(
            p.info["cmdline"] or [])]
        assert workers, "no Ray Train worker process found"
        workers[-1].kill()
        output, _ = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, output[-3000:]
    resumed = int(output.split('"resumed_from": "')[1].split('"')[0].rsplit("_", 1)[1])
    assert resumed >= 10 and max(before) > resumed and '"step": 30' in output  # some steps were done twice
    after = {r["step"]: r["loss"] for r in metrics(out)}
    assert sorted(after) == list(range(1, 31))
    assert all(after[step] == loss for step, loss in before.items()), (before, after)


def _complete_lines(path: Path) -> list[str]:
    """The lines of a file being written that are complete (the last one may be cut)."""
    text = path.read_text() if path.exists() else ""
    return [line for line in text.split("\n")[:-1] if line.strip()]


def test_ray_restarts_need_resume_auto(shards, teacher_file, tmp_path, capsys):
    args = stage_args(shards, teacher_file, tmp_path / "run", steps=2) + ["--ray-workers", "2",
                                                                         "--ray-max-failures", "2"]
    assert main(args) == 2
    assert "--ray-max-failures: restarted workers continue from the newest checkpoint; add --resume auto" in \
        capsys.readouterr().err
