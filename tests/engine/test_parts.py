"""Optimizer groups, LR schedule, DeepSpeed config and metrics files (no DeepSpeed engine)."""
import json

import pytest
import torch

from pipeline.config import ConfigError, DeepSpeedConfig
from pipeline.engine.ds_config import deepspeed_config
from pipeline.engine.metrics import MetricsLog, read_records
from pipeline.engine.optim import SkippableAdamW, build_optimizer, param_groups
from pipeline.engine.schedule import build_scheduler, lr_factor, move_to_step
from engine_toy import train_config


class Named(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, 4))
        self.temporal_pos_embedding = torch.nn.Parameter(torch.zeros(1, 2, 4))
        self.token_embedding = torch.nn.Embedding(10, 4)
        self.proj = torch.nn.Linear(4, 4)
        self.norm = torch.nn.LayerNorm(4)
        self.frozen = torch.nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_no_weight_decay_for_norms_biases_embeddings_and_tokens():
    m = Named()
    decay, no_decay = param_groups(m.named_parameters(), weight_decay=0.05)
    names = {id(p): n for n, p in m.named_parameters()}
    assert [names[id(p)] for p in decay["params"]] == ["proj.weight"]
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert sorted(names[id(p)] for p in no_decay["params"]) == sorted(
        ["cls_token", "temporal_pos_embedding", "token_embedding.weight", "proj.bias", "norm.weight", "norm.bias"])


def test_skippable_adamw_skips_every_step_inside_the_block_and_nothing_after():
    m = torch.nn.Linear(3, 1)
    opt = build_optimizer(m, lr=0.1, weight_decay=0.1, betas=[0.9, 0.99])
    assert isinstance(opt, SkippableAdamW) and opt.param_groups[0]["betas"] == (0.9, 0.99)
    m(torch.ones(2, 3)).sum().backward()
    before = m.weight.detach().clone()
    with opt.skipped(True):
        opt.step()
        opt.step()  # ZeRO 1/2 call step() once per parameter group
    assert torch.equal(m.weight, before) and not opt.state  # no update, no moments
    with pytest.raises(RuntimeError), opt.skipped(True):
        raise RuntimeError("a failed engine.step()")
    with opt.skipped(False):
        opt.step()
    assert not torch.equal(m.weight, before) and not opt.skipping
    with pytest.raises(ValueError, match="betas"):
        build_optimizer(m, 0.1, 0.0, [0.9])


def test_schedule_warmup_then_cosine_to_min_lr():
    peak, floor, warm, total = 1e-3, 1e-5, 4, 20
    f = [lr_factor(s, peak, floor, warm, total) for s in range(total + 3)]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f[4] == pytest.approx(1.0) and all(a >= b for a, b in zip(f[4:], f[5:]))
    assert f[12] == pytest.approx((1 + floor / peak) / 2)  # half way down the cosine
    assert f[20] * peak == pytest.approx(floor) and f[22] * peak == pytest.approx(floor)
    opt = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=peak)
    sched = build_scheduler(opt, peak, floor, warm, total)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([peak * x for x in f[:6]])
    move_to_step(sched, 12)
    assert opt.param_groups[0]["lr"] == pytest.approx(peak * f[12]) and sched.last_epoch == 12
    with pytest.raises(ValueError, match="min_lr"):
        build_scheduler(opt, 1e-5, 1e-3, 0, 10)


def test_deepspeed_config_from_train_section():
    cfg = deepspeed_config(train_config(precision="bf16", clip_grad=0.5, batch_size=3, grad_accum=4),
                           DeepSpeedConfig(zero_stage=2))
    assert cfg["zero_optimization"] == {"stage": 2}
    assert cfg["bf16"] == {"enabled": True} and "fp16" not in cfg
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (3, 4)
    assert cfg["gradient_clipping"] == 0.5
    assert deepspeed_config(train_config(precision="fp16"), None)["fp16"]["enabled"] is True
    with pytest.raises(ConfigError, match="batch_size"):
        deepspeed_config(train_config(batch_size=0), None)


def test_fp32_gradient_accumulation_is_asked_of_deepspeed_only_where_it_has_it():
    """train.grad_accum_dtype=fp32 selects DeepSpeed's BF16_Optimizer, which exists for bf16 with ZeRO-1 only."""
    cfg = deepspeed_config(train_config(precision="bf16", grad_accum_dtype="fp32"), DeepSpeedConfig(zero_stage=1))
    assert cfg["data_types"] == {"grad_accum_dtype": "fp32"}
    assert "data_types" not in deepspeed_config(train_config(precision="bf16"), DeepSpeedConfig(zero_stage=1))
    for precision, stage in (("bf16", 2), ("bf16", 0), ("fp32", 1)):
        with pytest.raises(ConfigError, match=rf"train.grad_accum_dtype=fp32 needs .*got {precision} and ZeRO-{stage}"):
            deepspeed_config(train_config(precision=precision, grad_accum_dtype="fp32"), DeepSpeedConfig(stage))


def test_user_deepspeed_json_passes_through_unchanged(tmp_path):
    user = {"train_batch_size": 32, "zero_optimization": {"stage": 3, "overlap_comm": True},
            "bf16": {"enabled": True}, "gradient_clipping": 2.0, "custom_key": [1, 2]}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    cfg = deepspeed_config(train_config(precision="fp32", clip_grad=1.0), DeepSpeedConfig(0, str(path)))
    assert {k: cfg[k] for k in user} == user  # every key as written; train.* does not override it
    assert "train_micro_batch_size_per_gpu" not in cfg  # the file sets a batch size: none is added
    assert cfg["zero_allow_untested_optimizer"] is True
    path.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match="optimizer"):
        deepspeed_config(train_config(), DeepSpeedConfig(0, str(path)))
    path.write_text("{oops")
    with pytest.raises(ConfigError, match="not valid JSON"):
        deepspeed_config(train_config(), DeepSpeedConfig(0, str(path)))
    with pytest.raises(ConfigError, match="not found"):
        deepspeed_config(train_config(), DeepSpeedConfig(0, str(tmp_path / "missing.json")))


def test_metrics_log_cuts_back_to_a_step_and_ignores_a_torn_line(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    with open(path, "w") as f:
        for step in range(1, 6):
            f.write(json.dumps({"step": step, "loss": step / 10}) + "\n")
        f.write('{"step": 6, "lo')  # the process died mid-write
    log = MetricsLog(path, keep_through_step=3)
    log.write({"step": 4, "loss": float("nan"), "x": [float("inf"), 1.0]})
    log.close()
    records = read_records(path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[3]["loss"] is None and records[3]["x"] == [None, 1.0]  # strict JSON: no NaN
    for line in open(path):
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))

