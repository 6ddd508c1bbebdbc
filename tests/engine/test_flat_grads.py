"""pipeline.engine.flat_grads on DeepSpeed's real BF16_Optimizer (bf16, ZeRO-1, fp32 gradient accumulation; gloo on
the CPU): the same training as DeepSpeed's per-parameter fold, with one flat bf16 gradient tensor per group."""
import json
import os

import pytest
import torch

import engine_toy as toy
from pipeline.engine import flat_grads, trainer as trainer_module

BF16 = dict(zero_stage=1, precision="bf16", grad_accum_dtype="fp32", dropout=0.0, max_steps=5, ckpt_every=0)


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def module_weights(trainer):
    return {k: v.detach().float().clone() for k, v in trainer.engine.module.state_dict().items()}


@pytest.mark.parametrize("clip_grad", [0.0, 1.0])
def test_training_with_flat_grads_matches_deepspeeds_own_fold(tmp_path, monkeypatch, clip_grad):
    flat = toy.build(str(tmp_path / "flat"), clip_grad=clip_grad, **BF16)
    flat.fit()
    assert isinstance(flat.engine.optimizer._flat_bf16_grads, list)
    monkeypatch.setattr(trainer_module, "flatten_bf16_grads", lambda optimizer: False)
    own = toy.build(str(tmp_path / "own"), clip_grad=clip_grad, **BF16)
    own.fit()
    assert not hasattr(own.engine.optimizer, "_flat_bf16_grads")
    flat_records, own_records = records(str(tmp_path / "flat")), records(str(tmp_path / "own"))
    assert [r["loss"] for r in flat_records] == pytest.approx([r["loss"] for r in own_records], rel=1e-6)
    # the norm is summed in another order (one norm per group, not per parameter): equal to a rounding
    assert [r["grad_norm"] for r in flat_records] == pytest.approx([r["grad_norm"] for r in own_records], rel=1e-5)
    flat_w, own_w = module_weights(flat), module_weights(own)
    if clip_grad == 0.0:  # the fold adds the same values: the same weights, bit for bit
        assert all(torch.equal(flat_w[k], own_w[k]) for k in own_w)
    else:
        assert all(torch.allclose(flat_w[k], own_w[k], atol=1e-6) for k in own_w)


def test_every_gradient_is_a_view_of_its_groups_flat_tensor_and_a_replaced_one_is_kept(tmp_path):
    trainer = toy.build(str(tmp_path / "run"), **BF16)
    trainer.fit()
    optimizer = trainer.engine.optimizer
    groups = list(zip(optimizer.bf16_groups, optimizer._flat_bf16_grads, optimizer.fp32_groups_gradients))
    assert len(groups) == 2  # AdamW's groups with and without weight decay
    for params, (flat, views), _ in groups:
        assert all(p.grad is v and p.grad.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
                   for p, v in zip(params, views))
    # something drops the gradients (module.zero_grad(set_to_none=True)) and another backward makes new ones: the
    # next fold copies them into the flat tensors, puts the views back and folds them with the rest
    optimizer.clear_lp_grads()
    optimizer.clear_hp_grads()
    trainer.engine.module.zero_grad(set_to_none=True)
    x = torch.randn(4, toy.DIM, dtype=torch.bfloat16, device=trainer.engine.device)
    trainer.engine.module(x).float().pow(2).mean().backward()
    expected = [[p.grad.float().clone() for p in params] for params, _, _ in groups]
    assert all(p.grad is not v for params, (_, views), _ in groups for p, v in zip(params, views))
    optimizer.update_hp_grads()
    for (params, (_, views), hp_grads), grads in zip(groups, expected):
        assert all(p.grad is v for p, v in zip(params, views))
        assert all(torch.equal(hp, grad.view(-1)) for hp, grad in zip(hp_grads, grads)), "a gradient was lost"
    norms, _ = optimizer.get_grads_for_norm()
    assert len(norms) == 2
    every = torch.cat([g.view(-1) for grads in expected for g in grads])
    assert torch.linalg.vector_norm(torch.cat(norms)).item() == pytest.approx(
        torch.linalg.vector_norm(every).item(), rel=1e-5)


def test_other_optimizers_are_left_alone(tmp_path):
    trainer = toy.build(str(tmp_path / "run"), zero_stage=1, precision="bf16", max_steps=1, ckpt_every=0)
    trainer.fit()
    assert type(trainer.engine.optimizer).__name__ != "BF16_Optimizer"
    assert flat_grads.flatten_bf16_grads(trainer.engine.optimizer) is False
