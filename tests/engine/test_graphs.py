"""CUDA graphs for a chain of modules (pipeline.engine.graphs) and `train.cuda_graphs` in the trainer. On the CPU:
the fallback to each module's own forward, the trainer's refusal under ZeRO-3 and its warnings off CUDA and for a
chain the stage lacks. On a GPU (skipped elsewhere): replayed VideoMamba blocks against eager ones, gradient
accumulation, image and video batches with a capture each, a second forward before the backward, a DeepSpeed ZeRO-2
bf16 run with and without graphs, and stage 2's BERT text and fusion layers against eager ones."""
import copy
import logging
import os

import pytest
import torch

import engine_toy as toy
from pipeline.config import ConfigError
from pipeline.engine.graphs import graph_chain

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def toy_loss(model, x):
    return model(x).square().mean()


def test_off_cuda_each_module_runs_its_own_forward_with_the_same_results():
    torch.manual_seed(0)
    model = toy.ToyChain(depth=3)
    reference = copy.deepcopy(model)
    keys = list(model.state_dict())
    chain = graph_chain(model.blocks)
    x = torch.randn(5, toy.DIM)
    toy_loss(model, x).backward()
    toy_loss(reference, x).backward()
    assert chain.eager_calls == 3 and chain.replays == 0 and not chain.captures
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad), name
    assert list(model.state_dict()) == keys  # names, checkpoints and DeepSpeed see the same module


def test_a_chain_made_again_replaces_the_first_instead_of_wrapping_it():
    model = toy.ToyChain(depth=2)
    first = graph_chain(model.blocks)
    second = graph_chain(model.blocks)  # a second Trainer.fit() of the same model
    assert second.eager_forwards == first.eager_forwards
    toy_loss(model, torch.randn(3, toy.DIM)).backward()
    assert (first.eager_calls, second.eager_calls) == (0, 2)


def test_an_empty_chain_or_no_capture_is_refused():
    with pytest.raises(ValueError, match="no modules"):
        graph_chain([])
    with pytest.raises(ValueError, match="shapes=0"):
        graph_chain(toy.ToyChain(depth=2).blocks, shapes=0)


def test_a_replayed_link_passes_a_gradless_input_on_without_grad():
    """The replay node's autograd plumbing, on the CPU with a stand-in for the CUDA graphs (their replay is a GPU
    test): an output the capture computed without grad (an attention mask a BERT layer passes on) leaves the node
    without grad, so the next layer's inputs match its capture's signature (the H100 run of 2026-12-05 found every
    text layer but the first running eagerly); the differentiable output's gradient reaches the backward graph."""
    from pipeline.engine.graphs import GraphedChain, _Link, _Replay, _signature

    class Replayed:  # a captured graph whose kernels already ran: replay() has nothing left to do
        def replay(self):
            pass

    hidden, mask = torch.randn(2, 3, requires_grad=True), torch.zeros(2, 3)
    out_hidden, out_mask = (hidden * 2).detach().requires_grad_(), mask
    link = _Link((hidden.detach(), mask), (out_hidden, out_mask), (), Replayed(), Replayed(),
                 grad_outputs=(torch.zeros(2, 3), torch.zeros(2, 3)), grad_inputs=(torch.ones(2, 3), None),
                 signature=_signature((hidden, mask)))
    chain = GraphedChain([], [])
    got_hidden, got_mask = _Replay.apply(chain, link, hidden, mask)
    assert got_hidden.requires_grad and not got_mask.requires_grad
    assert _signature((got_hidden, got_mask)) == _signature((out_hidden.detach().requires_grad_(), mask))
    (got_hidden.sum() * 3).backward()
    assert torch.equal(link.grad_outputs[0], torch.full((2, 3), 3.0))  # what the backward graph reads
    assert torch.equal(link.grad_outputs[1], torch.zeros(2, 3)) and torch.equal(hidden.grad, torch.ones(2, 3))


def test_trainer_refuses_cuda_graphs_under_zero3(tmp_path):
    trainer = toy.build(str(tmp_path), chain=True, zero_stage=3, cuda_graphs=True, max_steps=1)
    with pytest.raises(ConfigError, match="ZeRO stage 0, 1 or 2"):
        trainer.fit()


def test_trainer_warns_of_a_named_chain_the_stage_lacks(tmp_path, caplog):
    trainer = toy.build(str(tmp_path), chain=True, cuda_graphs=True, cuda_graph_chains=["backbone", "fusion"],
                        max_steps=1, ckpt_every=0)
    with caplog.at_level(logging.WARNING, logger="pipeline.engine.trainer"):
        trainer.fit()
    assert "this stage's model has no chain fusion (its chains: backbone); nothing is replayed for it" in caplog.text


@pytest.mark.skipif(os.environ.get("DS_ACCELERATOR") != "cpu", reason="the trainer runs on the GPU here")
def test_trainer_off_cuda_warns_and_trains_as_without_graphs(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.engine.trainer"):
        toy.build(str(tmp_path / "graphs"), chain=True, cuda_graphs=True, max_steps=3, ckpt_every=0).fit()
    assert "train.cuda_graphs=true is ignored on cpu" in caplog.text
    toy.build(str(tmp_path / "plain"), chain=True, max_steps=3, ckpt_every=0).fit()
    assert toy.losses(str(tmp_path / "graphs")) == toy.losses(str(tmp_path / "plain"))


# ------------------------------------------------------------------------------------------------ on a GPU
def videomamba_pair(depth=4, drop_path_rate=0.0):
    from pipeline.models import build_videomamba

    torch.manual_seed(0)
    model = build_videomamba("tiny", num_frames=2, img_size=64, scan_backend="triton", depth=depth,
                             drop_path_rate=drop_path_rate).cuda().train()
    return model, copy.deepcopy(model)


def features_loss(model, x):
    """A loss whose value and gradients depend on every token's direction (the tokens come out of a norm, so their
    plain mean square would be about 1 whatever the input)."""
    tokens = model.forward_features(x).tokens.float()
    probe = torch.randn(tokens.shape[-1], generator=torch.Generator().manual_seed(5)).to(tokens.device)
    return (tokens @ probe).square().mean()


def close(a, b, rel=1e-4) -> bool:
    """Equal up to the order of fp32 atomic sums (the scan's dB, dC): a relative difference of the whole tensor."""
    return float((a - b).norm()) <= rel * float(b.norm()) + 1e-8


def micro_step(model, x) -> float:
    loss = features_loss(model, x)
    loss.backward()
    return float(loss)


@cuda
def test_replayed_videomamba_blocks_match_eager_over_steps_with_accumulation():
    graphed, eager = videomamba_pair()
    chain = graph_chain(graphed.chained_blocks())
    optimizers = [torch.optim.SGD(m.parameters(), lr=1e-4) for m in (graphed, eager)]
    for step in range(3):
        xs = [torch.randn(2, 3, 2, 64, 64, device="cuda") for _ in range(2)]  # two micro-batches, one update
        losses = []
        for model, opt in zip((graphed, eager), optimizers):
            opt.zero_grad(set_to_none=True)
            losses.append([micro_step(model, x) for x in xs])
        assert losses[0] == pytest.approx(losses[1], rel=1e-4), step
        assert sum(float(q.grad.abs().sum()) for q in eager.parameters()) > 1e-2  # a loss with real gradients
        for (name, p), q in zip(graphed.named_parameters(), eager.parameters()):
            assert close(p.grad, q.grad), (step, name)
        for opt in optimizers:
            opt.step()  # in place: the graphs read the updated weights
    assert chain.replays > 0 and chain.eager_calls == 0


@cuda
@pytest.mark.parametrize("shapes", [1, 2])
def test_image_and_video_batches_replay_their_own_captures_up_to_the_shapes_kept(shapes):
    """data.mix=batch: steps alternate 1-frame images (no temporal embedding) and 2-frame clips; with two shapes
    kept each kind replays its own graphs, with one the kind captured second runs eagerly; gradients match eager."""
    graphed, eager = videomamba_pair()
    chain = graph_chain(graphed.chained_blocks(), shapes=shapes)
    optimizers = [torch.optim.SGD(m.parameters(), lr=1e-4) for m in (graphed, eager)]
    depth = len(graphed.chained_blocks())
    for step, frames in enumerate([2, 1, 2, 1]):
        x = torch.randn(2, 3, frames, 64, 64, device="cuda")
        losses = []
        for model, opt in zip((graphed, eager), optimizers):
            opt.zero_grad(set_to_none=True)
            losses.append(micro_step(model, x))
        assert losses[0] == pytest.approx(losses[1], rel=1e-4), step
        for (name, p), q in zip(graphed.named_parameters(), eager.parameters()):
            assert (p.grad is None) == (q.grad is None), (step, frames, name)  # images: no temporal embedding
            assert q.grad is None or close(p.grad, q.grad, rel=1e-3), (step, frames, name)  # 4 updates' drift
        for opt in optimizers:
            opt.step()
    assert len(chain.captures) == shapes
    assert chain.eager_calls == (0 if shapes == 2 else 2 * depth)  # shapes=1: the two image steps
    assert chain.replays == (4 if shapes == 2 else 2) * depth


@cuda
def test_a_second_forward_before_the_backward_runs_eagerly_and_gradients_stay_right():
    graphed, eager = videomamba_pair()
    chain = graph_chain(graphed.chained_blocks())
    x1, x2 = (torch.randn(2, 3, 2, 64, 64, device="cuda") for _ in range(2))
    features_loss(graphed, x1).backward()  # captures, replays once
    graphed.zero_grad(set_to_none=True)
    (features_loss(graphed, x1) + features_loss(graphed, x2)).backward()
    (features_loss(eager, x1) + features_loss(eager, x2)).backward()
    assert chain.eager_calls == len(graphed.chained_blocks())  # the second pass, before the first's backward
    for (name, p), q in zip(graphed.named_parameters(), eager.parameters()):
        assert close(p.grad, q.grad), name


@cuda
def test_deepspeed_zero2_bf16_run_with_graphs_matches_the_run_without(tmp_path):
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cuda":
        pytest.skip("DeepSpeed's accelerator is not CUDA here (DS_ACCELERATOR)")
    runs = {}
    for graphs in (False, True):
        run_dir = str(tmp_path / f"graphs_{graphs}")
        trainer = toy.build(run_dir, chain=True, zero_stage=2, precision="bf16", cuda_graphs=graphs, max_steps=6,
                            ckpt_every=0)
        trainer.fit()
        runs[graphs] = (toy.losses(run_dir), trainer.graphs)
    assert runs[True][0] == pytest.approx(runs[False][0], rel=2e-2)
    assert runs[False][1] == {}
    chain = runs[True][1]["backbone"]
    assert chain.replays == 6 * 2 * 3 and chain.eager_calls == 0  # steps x micro-batches x blocks


@cuda
def test_drop_path_draws_anew_at_each_replay_and_the_capture_leaves_the_generator_alone():
    first, second = videomamba_pair(drop_path_rate=0.5)
    x = torch.randn(2, 3, 2, 64, 64, device="cuda")
    graph_chain(first.chained_blocks())
    torch.cuda.manual_seed(1)
    a = [micro_step(first, x) for _ in range(2)]  # captures in the first step
    graph_chain(second.chained_blocks())
    torch.cuda.manual_seed(99)
    micro_step(second, x)  # captures here, under another generator state
    torch.cuda.manual_seed(1)
    b = [micro_step(second, x) for _ in range(2)]
    assert a[0] != a[1]  # same input and weights: only the drop-path draws differ
    assert b == pytest.approx(a, rel=1e-5)  # as a run resumed with the RNG state of an uninterrupted one


@cuda
def test_replayed_bert_text_and_fusion_layers_match_eager_with_two_video_shapes(tmp_path):
    """Stage 2's "text" and "fusion" chains (train.cuda_graph_chains): BERT's text-only layers and its fusion layers
    replayed from graphs give the eager states' loss and gradients (the video tokens' too, which every fusion layer
    passes on to the next), over updates in place, with image-like and clip-like video memories each replaying a
    capture of their own."""
    from pipeline.models.text import build_tiny_bert, load_bert_text_encoder

    directory = build_tiny_bert(["a red ball rolls left", "two squares move up", "a blue triangle"] * 4,
                                str(tmp_path / "bert"), hidden=64, layers=4, heads=4, dropout=0.0)
    torch.manual_seed(0)
    graphed = load_bert_text_encoder(directory, fusion_layer=2, cross_width=48)[0].cuda().train()
    eager = copy.deepcopy(graphed)
    chains = [graph_chain(graphed.text_layers(), shapes=2), graph_chain(graphed.fusion_layers(), shapes=2)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=1e-3) for m in (graphed, eager)]
    ids = torch.randint(5, 30, (6, 16), device="cuda")
    attention_mask = torch.ones(6, 16, dtype=torch.long, device="cuda")
    attention_mask[1, 9:] = 0
    for step, tokens in enumerate([40, 9, 40, 9]):
        video = torch.randn(6, tokens, 48, device="cuda")
        results = []
        for model, opt in zip((graphed, eager), optimizers):
            opt.zero_grad(set_to_none=True)
            v = video.clone().requires_grad_()
            fused = model.fuse(model.encode(ids, attention_mask), attention_mask, v)
            loss = model.mlm_logits(fused).logsumexp(-1).mean() + fused[:, 0].square().mean()
            loss.backward()
            results.append((float(loss.detach()), v.grad))
        assert results[0][0] == pytest.approx(results[1][0], rel=1e-4), step
        assert close(results[0][1], results[1][1]) and float(results[1][1].abs().sum()) > 0, step
        for (name, p), q in zip(graphed.named_parameters(), eager.parameters()):
            assert (p.grad is None) == (q.grad is None), (step, name)
            assert q.grad is None or close(p.grad, q.grad, rel=1e-3), (step, name)
        for opt in optimizers:
            opt.step()
    assert [len(c.captures) for c in chains] == [1, 2]  # the text's shape never changes; the video's does
    assert [c.eager_calls for c in chains] == [0, 0]
    assert [c.replays for c in chains] == [4 * 2, 4 * 2]
