"""Two processes on the CPU (torchrun, gloo): ZeRO-2 matches one process with the same global batch; the gather
with gradient used by contrastive losses; a checkpoint of 2 ranks resumed by 1."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import engine_toy as toy
from pipeline.engine import model_state_dict
from pipeline.engine import checkpoint as ckpt

TOY = os.path.join(os.path.dirname(__file__), "engine_toy.py")
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
STEPS = 5


def torchrun(run_dir, *args, nproc=2):
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", TOY,
           str(run_dir), *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("zero2_x2")
    proc = torchrun(run_dir, "--zero-stage", 2, "--batch-size", 2, "--grad-accum", 2, "--dropout", 0,
                    "--max-steps", STEPS, "--ckpt-every", 0, "--check-gather")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    gathers = [json.load(open(run_dir / f"gather_rank{r}.json")) for r in (0, 1)]
    return str(run_dir), gathers


def test_zero2_on_two_processes_matches_one_process_with_the_same_global_batch(two_ranks, tmp_path):
    run_dir, _ = two_ranks
    one = str(tmp_path / "one")
    toy.build(one, dropout=0.0, zero_stage=2, batch_size=4, grad_accum=2, max_steps=STEPS, ckpt_every=0).fit()
    assert toy.losses(run_dir) == pytest.approx(toy.losses(one), rel=1e-5)
    last = f"step_{STEPS:08d}"
    two_w = model_state_dict(os.path.join(ckpt.checkpoints_root(run_dir), last))
    one_w = model_state_dict(os.path.join(ckpt.checkpoints_root(one), last))
    assert all(torch.allclose(two_w[k], one_w[k], atol=1e-5) for k in one_w)


def test_bf16_optimizer_checkpoint_of_two_ranks_gives_the_weights_of_one_process(tmp_path):
    """bf16 + ZeRO-1 + fp32 gradient accumulation on 2 ranks: each rank's bf16_zero_pp_rank_R file holds half of every
    flat group; read back (pipeline.engine.checkpoint.bf16_optimizer_state_dict), they are the fp32 weights a single
    process reaches with the same global batch, and the checkpoint's bf16 copy of the weights is theirs rounded."""
    two, one = tmp_path / "two", str(tmp_path / "one")
    common = dict(zero_stage=1, batch_size=2, grad_accum=2, dropout=0, max_steps=3, ckpt_every=0)
    proc = torchrun(two, *[a for k, v in common.items() for a in (f"--{k.replace('_', '-')}", v)],
                    "--precision", "bf16", "--grad-accum-dtype", "fp32")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    path = os.path.join(ckpt.checkpoints_root(str(two)), "step_00000003")
    assert sorted(n for n in os.listdir(os.path.join(path, ckpt.DEEPSPEED_TAG)) if n.startswith("bf16_")) == [
        f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]
    toy.build(one, precision="bf16", grad_accum_dtype="fp32", **dict(common, batch_size=4)).fit()
    two_w = model_state_dict(path)
    one_w = model_state_dict(os.path.join(ckpt.checkpoints_root(one), "step_00000003"))
    bf16_copy = torch.load(os.path.join(path, ckpt.DEEPSPEED_TAG, "mp_rank_00_model_states.pt"))["module"]
    assert two_w.keys() == one_w.keys() == bf16_copy.keys()
    assert all(two_w[k].dtype == torch.float32 and torch.equal(two_w[k].bfloat16(), bf16_copy[k]) for k in two_w)
    # Adam's first steps move each weight by about lr whatever the gradient's size, so a near-zero gradient that the
    # two reductions round differently can land one lr (2e-2 here) apart
    assert all(torch.allclose(two_w[k], one_w[k], atol=2.5e-2) for k in one_w)
    assert sum(torch.allclose(two_w[k], one_w[k], atol=1e-3) for k in one_w) >= len(one_w) - 1
    os.remove(os.path.join(path, ckpt.DEEPSPEED_TAG, "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"))
    with pytest.raises(ValueError, match=r"ranks \[0\], but the run had 2"):
        ckpt.bf16_optimizer_state_dict(os.path.join(path, ckpt.DEEPSPEED_TAG))


def test_each_rank_saves_its_own_data_position(two_ranks):
    path = os.path.join(ckpt.checkpoints_root(two_ranks[0]), f"step_{STEPS:08d}")
    assert ckpt.verify(path)["world_size"] == 2
    for rank in (0, 1):
        state = torch.load(os.path.join(path, ckpt.rank_file_name(rank)), weights_only=False)
        assert state["data"] == {"index": STEPS * 2}  # 2 micro-batches per step on every rank
    assert any(name.startswith("zero_pp_rank_1") for name in os.listdir(os.path.join(path, ckpt.DEEPSPEED_TAG)))


def test_resume_by_another_world_size_carries_weights_step_and_data_position(two_ranks, tmp_path, caplog):
    """A 2-rank ZeRO-2 checkpoint resumed by 1 process (a node lost): the consolidated weights, the step and the data
    position carry over, with a warning that Adam's moments start again; then training goes on."""
    run_dir = str(tmp_path / "run")
    shutil.copytree(two_ranks[0], run_dir)
    path = os.path.join(ckpt.checkpoints_root(run_dir), f"step_{STEPS:08d}")
    saved = model_state_dict(path)
    trainer = toy.build(run_dir, dropout=0.0, zero_stage=2, batch_size=4, max_steps=STEPS)
    with caplog.at_level("WARNING", logger="pipeline.engine"):
        summary = trainer.fit(resume="auto")
    assert summary.start_step == STEPS and "written by 2 processes, this run has 1" in caplog.text
    assert all(torch.equal(trainer.engine.module.state_dict()[k], saved[k]) for k in saved)
    assert trainer.data.loaded_state == {"index": STEPS * 2}
    summary = toy.build(run_dir, dropout=0.0, zero_stage=2, batch_size=4, max_steps=STEPS + 2).fit(resume="auto")
    assert summary.step == STEPS + 2 and [r["step"] for r in map(json.loads, open(os.path.join(run_dir,
                                                                  "metrics.jsonl")))] == list(range(1, STEPS + 3))
    assert ckpt.verify(os.path.join(ckpt.checkpoints_root(run_dir), f"step_{STEPS + 2:08d}"))["world_size"] == 1


def test_all_gather_with_grad_concatenates_ranks_and_sums_gradients(two_ranks):
    gathers = two_ranks[1]
    assert [g["rank"] for g in gathers] == [0, 1]
    for g in gathers:
        assert g["rows"] == [1.0, 1.0, 2.0, 2.0] and g["no_grad_rows"] == [1.0, 1.0, 2.0, 2.0]
        assert g["grad_ok"]
