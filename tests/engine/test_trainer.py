"""The trainer on DeepSpeed (CPU, gloo, one process here): metrics, checkpoints, exact resume after SIGKILL, corrupt
checkpoints, the NaN/inf policy, accumulation and ZeRO stages."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import engine_toy as toy
from pipeline.config import ConfigError, DeepSpeedConfig
from pipeline.engine import DataExhausted, NonFiniteLoss, model_state_dict
from pipeline.engine import checkpoint as ckpt
from pipeline.engine.metrics import read_records
from pipeline.engine.schedule import lr_factor

TOY = os.path.join(os.path.dirname(__file__), "engine_toy.py")
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def step_dirs(run_dir):
    return sorted(os.listdir(ckpt.checkpoints_root(run_dir)))


def run_toy_process(run_dir, *args):
    """Starts engine_toy.py as its own process (the default run: 8 steps, a checkpoint every 3)."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=REPO)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # a lone process of its own
        env.pop(var, None)
    return subprocess.Popen([sys.executable, TOY, str(run_dir), *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of 8 steps (checkpoints at 3, 6, 8; the last 2 kept), with TensorBoard and the bar."""
    run_dir = str(tmp_path_factory.mktemp("reference"))
    trainer = toy.build(run_dir, tensorboard=True, progress=True)
    summary = trainer.fit(resume="auto")
    return run_dir, trainer, summary


def test_uninterrupted_run_writes_metrics_checkpoints_and_tensorboard(reference):
    run_dir, trainer, summary = reference
    records = read_records(os.path.join(run_dir, "metrics.jsonl"))
    assert [r["step"] for r in records] == list(range(1, 9))
    cfg = toy.train_config()
    assert [r["lr"] for r in records] == pytest.approx(
        [cfg.lr * lr_factor(s, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps) for s in range(8)])
    for r in records:
        assert {"loss", "mae", "clips_per_s", "grad_norm", "time", "skipped_steps"} <= set(r)
        assert r["data/odd_batches"] == r["step"]  # the data's own counters (2 batches per step)
        assert r["clips_per_s"] > 0 and r["grad_norm"] > 0
    assert min(r["loss"] for r in records[1:]) < records[0]["loss"] / 2  # it learns something
    assert step_dirs(run_dir) == ["step_00000006", "step_00000008"]  # keep_last=2
    assert summary.step == 8 and summary.start_step == 0 and summary.samples == 8 * 4 * 2
    assert [os.path.basename(p) for p in summary.checkpoints] == ["step_00000003", "step_00000006", "step_00000008"]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(run_dir, "tb")))


def test_model_state_dict_of_a_checkpoint_is_the_trained_module(reference):
    run_dir, trainer, _ = reference
    weights = model_state_dict(os.path.join(ckpt.checkpoints_root(run_dir), "step_00000008"))
    module = trainer.engine.module.state_dict()
    assert set(weights) == set(module)
    assert all(torch.equal(weights[k], module[k]) for k in module)


def test_sigkill_at_any_step_then_resume_auto_repeats_the_loss_sequence(tmp_path, reference):
    ref_dir = reference[0]
    run_dir = tmp_path / "run"
    proc = run_toy_process(run_dir, "--slow-s", "0.15")
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 600  # a fresh venv's first DeepSpeed start builds its CPU op under load: minutes
    while len(read_records(str(metrics))) < 4 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before step 4 was logged: {proc.communicate()[0][-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    out = proc.communicate()[0]
    assert proc.returncode == -signal.SIGKILL, out
    logged = len(read_records(str(metrics)))
    assert 4 <= logged < 8, f"killed after step {logged}, not mid-run"
    assert ckpt.newest_complete(ckpt.checkpoints_root(str(run_dir))).step in (3, 6)
    summary = toy.build(str(run_dir)).fit(resume="auto")
    assert summary.start_step in (3, 6) and summary.step == 8
    assert toy.losses(str(run_dir)) == toy.losses(ref_dir)  # exactly: CPU, fp32, same world size
    assert [r["step"] for r in read_records(str(metrics))] == list(range(1, 9))


def test_killed_while_publishing_a_checkpoint_resumes_from_the_one_before(tmp_path, reference):
    run_dir = tmp_path / "run"
    proc = run_toy_process(run_dir, "--die-publishing", "6")
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == -signal.SIGKILL, out
    assert step_dirs(str(run_dir)) == [".tmp-step_00000006", "step_00000003"]  # written aside, never published
    summary = toy.build(str(run_dir)).fit(resume="auto")
    assert summary.start_step == 3 and summary.resumed_from.endswith("step_00000003")
    assert toy.losses(str(run_dir)) == toy.losses(reference[0])
    assert step_dirs(str(run_dir)) == ["step_00000006", "step_00000008"]  # the leftover is gone


def test_corrupt_newest_checkpoint_is_refused_and_the_previous_one_used(tmp_path, reference, caplog):
    run_dir = str(tmp_path / "run")
    shutil.copytree(reference[0], run_dir)
    corrupt = os.path.join(ckpt.checkpoints_root(run_dir), "step_00000008")
    with open(os.path.join(corrupt, ckpt.rank_file_name(0)), "r+b") as f:
        f.seek(100)
        f.write(b"\x00garbage\x00")
    with pytest.raises(ConfigError, match="step_00000008.*sha256"):  # asked for by name: refused outright
        toy.build(run_dir).fit(resume=corrupt)
    with caplog.at_level("WARNING"):
        summary = toy.build(run_dir).fit(resume="auto")
    assert "step_00000008" in caplog.text and "refusing" in caplog.text
    assert summary.start_step == 6
    assert toy.losses(run_dir) == toy.losses(reference[0])
    ckpt.verify(corrupt)  # step 8 was written anew


def test_fresh_start_in_a_run_directory_with_checkpoints_is_refused(tmp_path, reference):
    run_dir = str(tmp_path / "run")
    shutil.copytree(reference[0], run_dir)
    with pytest.raises(ConfigError, match="--resume auto"):
        toy.build(run_dir).fit(resume=None)


@pytest.mark.parametrize("zero_stage,precision,grad_accum_dtype", [
    (0, "fp32", None), (1, "fp32", None), (2, "fp32", None), (3, "fp32", None), (0, "bf16", None), (1, "bf16", None),
    (2, "bf16", None), (1, "bf16", "fp32")])  # the last: DeepSpeed's BF16_Optimizer and its own checkpoint layout
def test_nan_loss_skip_policy_skips_the_update_and_goes_on(tmp_path, zero_stage, precision, grad_accum_dtype):
    run_dir = str(tmp_path)
    # global batch 4 is the first micro-batch of step 3 (2 micro-batches per step)
    trainer = toy.build(run_dir, nan_batches=(4,), nan_policy="skip", max_steps=4, ckpt_every=1, keep_last=0,
                        zero_stage=zero_stage, precision=precision, grad_accum_dtype=grad_accum_dtype)
    summary = trainer.fit()
    assert (type(trainer.engine.optimizer).__name__ == "BF16_Optimizer") == (grad_accum_dtype == "fp32")
    records = read_records(os.path.join(run_dir, "metrics.jsonl"))
    assert [r["skipped"] for r in records] == [False, False, True, False]
    assert records[2]["loss"] is None and records[3]["loss"] is not None
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1] and summary.skipped_steps == 1
    weights = [model_state_dict(os.path.join(ckpt.checkpoints_root(run_dir), d)) for d in step_dirs(run_dir)]
    assert all(torch.equal(weights[1][k], weights[2][k]) for k in weights[1])  # step 3 changed nothing
    unchanged = [k for k in weights[2] if torch.equal(weights[2][k], weights[3][k])]
    assert unchanged == []  # step 4 updated every parameter group again (no skip left over)


def test_evaluation_every_n_steps_is_logged_and_changes_no_loss_even_across_a_resume(tmp_path, reference):
    """The stage's evaluation runs in eval mode without gradients, draws from every RNG stream (as a DataLoader's
    workers do), and still the losses are the reference's (dropout draws from the RNG every step); resumed
    mid-way, too."""
    import random

    import numpy as np

    calls = []

    def evaluate(model, step):
        calls.append((step, model.training, torch.is_grad_enabled()))
        torch.randn(100), np.random.rand(), random.random()
        return {"eval/t2v_r1": float(step)}

    def losses(run_dir):
        return [r["loss"] for r in read_records(os.path.join(run_dir, "metrics.jsonl"))]

    straight = str(tmp_path / "straight")
    toy.build(straight, evaluate=evaluate, eval_every=2).fit()
    assert losses(straight) == losses(reference[0])
    assert calls == [(2, False, False), (4, False, False), (6, False, False), (8, False, False)]
    records = read_records(os.path.join(straight, "metrics.jsonl"))
    assert [r.get("eval/t2v_r1") for r in records] == [None, 2.0, None, 4.0, None, 6.0, None, 8.0]
    assert all(r["eval_s"] >= 0 for r in records if "eval/t2v_r1" in r)

    for name, kwargs in (("resumed", dict(evaluate=evaluate, eval_every=2)), ("plain", {})):  # 5 steps, then 3 more
        toy.build(str(tmp_path / name), max_steps=5, ckpt_every=3, **kwargs).fit()
        toy.build(str(tmp_path / name), max_steps=8, ckpt_every=3, **kwargs).fit(resume="auto")
    assert losses(str(tmp_path / "resumed")) == losses(str(tmp_path / "plain"))


def test_nan_loss_stop_policy_stops_with_a_clear_message(tmp_path):
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss at step 3 .*nan_policy=stop"):
        toy.build(str(tmp_path), nan_batches=(5,), nan_policy="stop", max_steps=4).fit()
    assert [r["step"] for r in read_records(str(tmp_path / "metrics.jsonl"))] == [1, 2]


def test_data_running_out_is_reported(tmp_path):
    with pytest.raises(DataExhausted, match="during step 2"):
        toy.build(str(tmp_path), limit=3, max_steps=4).fit()


def test_accumulation_and_zero_stages_match_one_big_batch(tmp_path):
    """Without dropout: 2 micro-batches of 4 = 1 batch of 8, under ZeRO 0 to 3 (fp32 rounding apart)."""
    def run(name, **kw):
        toy.build(str(tmp_path / name), dropout=0.0, max_steps=4, ckpt_every=0, **kw).fit()
        return toy.losses(str(tmp_path / name))

    big = run("big", batch_size=8, grad_accum=1)
    for stage in (0, 1, 2, 3):
        assert run(f"z{stage}", batch_size=4, grad_accum=2, zero_stage=stage) == pytest.approx(big, rel=1e-5), stage
    z3 = model_state_dict(os.path.join(ckpt.checkpoints_root(str(tmp_path / "z3")), "step_00000004"))
    z0 = model_state_dict(os.path.join(ckpt.checkpoints_root(str(tmp_path / "z0")), "step_00000004"))
    assert all(torch.allclose(z3[k], z0[k], atol=1e-5) for k in z0)


def test_bf16_trains(tmp_path):
    toy.build(str(tmp_path), precision="bf16", zero_stage=2, max_steps=6, ckpt_every=0).fit()
    records = read_records(str(tmp_path / "metrics.jsonl"))
    assert all(r["loss"] is not None for r in records)
    assert min(r["loss"] for r in records[1:]) < records[0]["loss"]
    assert json.load(open(os.path.join(ckpt.checkpoints_root(str(tmp_path)), "step_00000006", ckpt.MARKER)))


def test_bf16_optimizer_resumes_to_the_same_losses_and_weights(tmp_path):
    """bf16 + ZeRO-1 + fp32 gradient accumulation (DeepSpeed's BF16_Optimizer, its own checkpoint layout): stopped
    after step 3 and resumed, the run repeats the uninterrupted run's losses and ends on the same fp32 weights."""
    kwargs = dict(precision="bf16", zero_stage=1, grad_accum_dtype="fp32", ckpt_every=3, keep_last=0)
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    toy.build(straight, max_steps=6, **kwargs).fit()
    toy.build(resumed, max_steps=3, **kwargs).fit()
    toy.build(resumed, max_steps=6, **kwargs).fit(resume="auto")
    assert toy.losses(resumed) == toy.losses(straight)
    last = [model_state_dict(os.path.join(ckpt.checkpoints_root(d), "step_00000006")) for d in (straight, resumed)]
    assert last[0].keys() == last[1].keys() and all(torch.equal(last[0][k], last[1][k]) for k in last[0])
    assert all(v.dtype == torch.float32 for v in last[0].values())
    first = model_state_dict(os.path.join(ckpt.checkpoints_root(straight), "step_00000003"))
    assert not any(torch.equal(first[k], last[0][k]) for k in first)


def test_user_deepspeed_json_drives_the_engine(tmp_path, caplog):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 8, "zero_optimization": {"stage": 1}}))
    trainer = toy.build(str(tmp_path / "run"), max_steps=2, ckpt_every=0, grad_accum=4, batch_size=8)
    trainer.ds_cfg = DeepSpeedConfig(zero_stage=0, config=str(path))
    with caplog.at_level("INFO", logger="pipeline.engine"):
        summary = trainer.fit()
    assert "ZeRO stage 1, micro batch 8, accumulation 1, fp32" in caplog.text
    assert "step 2/2 loss" in caplog.text and "eta 0:00:00" in caplog.text  # progress=False: log lines instead
    assert trainer.engine.zero_optimization_stage() == 1  # the file's stage, not deepspeed.zero_stage
    assert trainer.engine.gradient_accumulation_steps() == 1 and summary.samples == 2 * 8  # its batch, not train.*


def test_user_deepspeed_json_whose_micro_batch_is_not_the_datas_is_refused(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16}))
    trainer = toy.build(str(tmp_path / "run"), max_steps=1, batch_size=4)
    trainer.ds_cfg = DeepSpeedConfig(config=str(path))
    with pytest.raises(ConfigError, match="micro batch 16 per process, but the data yields train.batch_size=4"):
        trainer.fit()
    assert trainer.engine is None  # refused before DeepSpeed started


def test_url_run_directory_is_refused():
    with pytest.raises(ConfigError, match="train.out: s3://bucket/run is a URL"):
        toy.build("s3://bucket/run")


def test_every_checkpoint_damaged_is_refused_listing_them_and_restart_must_be_asked_for(tmp_path, reference):
    run_dir = str(tmp_path / "run")
    shutil.copytree(reference[0], run_dir)
    root = ckpt.checkpoints_root(run_dir)
    for name in step_dirs(run_dir):
        with open(os.path.join(root, name, ckpt.TRAINER_STATE), "ab") as f:
            f.write(b"\x00")
    before = {name: os.path.getmtime(os.path.join(root, name, ckpt.MARKER)) for name in step_dirs(run_dir)}
    with pytest.raises(ConfigError) as e:
        toy.build(run_dir).fit(resume="auto")
    message = str(e.value)
    assert "every one is damaged" in message and "--resume restart" in message
    assert all(f"{name}: file trainer_state.pt has" in message for name in before)
    assert {n: os.path.getmtime(os.path.join(root, n, ckpt.MARKER)) for n in step_dirs(run_dir)} == before
    summary = toy.build(run_dir).fit(resume="restart")  # asked for: starts over, the damaged ones moved aside
    assert summary.start_step == 0 and toy.losses(run_dir) == toy.losses(reference[0])
    aside = [n for n in os.listdir(run_dir) if n.startswith("checkpoints.replaced-")]
    assert len(aside) == 1 and sorted(os.listdir(os.path.join(run_dir, aside[0]))) == sorted(before)


@pytest.fixture
def small_disk(tmp_path):
    """A real file system of 100 KiB (tmpfs, mounted here; needs root): room for two toy checkpoints, not three."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (not root?): {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "--lazy", str(mount)], check=True)


def test_a_full_disk_says_so_names_the_newest_intact_checkpoint_and_the_run_resumes(small_disk, reference):
    run_dir = str(small_disk / "run")
    with pytest.raises(Exception) as e:  # checkpoints at 3 and 6 fit, the one at step 8 does not
        toy.build(run_dir).fit(resume="auto")
    message = str(e.value)
    assert type(e.value).__name__ == "DiskFull", message
    assert f"the disk of train.out ({run_dir}) is full" in message and "checkpoint step 8" in message
    assert "newest intact checkpoint is " + os.path.join(ckpt.checkpoints_root(run_dir), "step_00000006") \
        in message and "--resume auto" in message
    assert "inline_container" not in message
    assert step_dirs(run_dir) == ["step_00000003", "step_00000006"]  # the partial one removed, the rest intact
    for name in step_dirs(run_dir):
        ckpt.verify(os.path.join(ckpt.checkpoints_root(run_dir), name))
    subprocess.run(["mount", "-o", "remount,size=1m", str(small_disk)], check=True)  # space freed: resume
    summary = toy.build(run_dir).fit(resume="auto")
    assert summary.start_step == 6 and toy.losses(run_dir) == toy.losses(reference[0])


def test_driven_steps_are_fits_steps(tmp_path):
    """build() + step() (what bench/train_step.py times) take the same optimizer steps as fit(), and write nothing."""
    fitted = toy.build(str(tmp_path / "fit"), dropout=0.0, max_steps=4, ckpt_every=0)
    fitted.fit()
    driven = toy.build(str(tmp_path / "driven"), dropout=0.0, max_steps=4, ckpt_every=0)
    driven.build()
    iterator = iter(driven.data)
    results = [driven.step(iterator, step) for step in range(1, 5)]
    assert [r.loss for r in results] == pytest.approx(toy.losses(str(tmp_path / "fit")), rel=1e-6)
    assert driven.scheduler.last_epoch == 4 and not (tmp_path / "driven").exists()


def test_a_cpu_run_trains_with_deterministic_algorithms_and_gives_the_setting_back(tmp_path):
    """Off CUDA the steps run under torch's deterministic algorithms (a CPU's index_put with accumulate, the backward
    of indexing with repeated indices as stage 2's hard negatives do, otherwise adds in parallel with atomics: the
    demo's stage 2 differed from its previous run within a dozen steps); the process's setting is restored after."""
    import torch.utils.deterministic as memory

    seen = []

    def loss_fn(model, batch):
        seen.append((torch.are_deterministic_algorithms_enabled(), memory.fill_uninitialized_memory))
        return toy.mse_loss(model, batch)

    trainer = toy.build(str(tmp_path), max_steps=2, ckpt_every=0)
    trainer.loss_fn = loss_fn
    assert not torch.are_deterministic_algorithms_enabled() and memory.fill_uninitialized_memory
    trainer.fit()
    assert seen == [(True, False)] * 4  # 2 steps of 2 micro-batches; no NaN fill of every new tensor (3x slower)
    assert not torch.are_deterministic_algorithms_enabled() and memory.fill_uninitialized_memory
