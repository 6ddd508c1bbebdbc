"""The Triton bidirectional scan and mixer against naive fp64 recurrences, on the CPU through TRITON_INTERPRET=1.

The interpreter must be switched on before triton is first imported, so every check runs in a fresh subprocess
(this file run as a script) and reports relative errors as JSON; the pytest functions assert on them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from pipeline.models.ops.bimamba import (ScanConfig, autograd, bidirectional_selective_scan, bimamba_forward, launch,
                                         packed_params, primitives)
from pipeline.models.ops.bimamba.reference import TinyBiMixer, naive_bidirectional_scan, rel, scan_inputs

TOL_FP32 = 1e-5
TOL_BF16 = 1e-2


# ------------------------------------------------------------------------------------------------ checks (subprocess)
def check_scan(b, l, e, n, seed, dtype_name, block_t, block_e, segments) -> dict:
    """Output and every input gradient of bidirectional_selective_scan vs the naive fp64 recurrence."""
    dtype = getattr(torch, dtype_name)
    inputs = scan_inputs(b, l, e, n, 3, seed, dtype)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    ref_leaves = {k: v.detach().double().requires_grad_() for k, v in inputs.items()}
    cfg = ScanConfig(block_t=block_t, block_e=block_e, segments=segments)
    out = bidirectional_selective_scan(**leaves, cfg=cfg)
    ref = naive_bidirectional_scan(*(ref_leaves[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")))
    dout = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    out.backward(dout.to(out.dtype))
    ref.backward(dout)
    errors = {"out": rel(out, ref)}
    errors.update({f"d{k}": rel(leaves[k].grad, ref_leaves[k].grad) for k in leaves})
    errors["finite"] = bool(torch.isfinite(out).all())
    return errors


def check_mixer(b, l, d_model, n, seed, segments) -> dict:
    """bimamba_forward on a module with the official parameter names vs its plain fp64 forward: output, input and
    parameter gradients."""
    torch.manual_seed(seed)
    mixer = TinyBiMixer(d_model, n)
    ref_mixer = TinyBiMixer(d_model, n).double()
    ref_mixer.load_state_dict(mixer.state_dict())
    h = torch.randn(b, l, d_model, requires_grad=True)
    h_ref = h.detach().double().requires_grad_()
    out = bimamba_forward(mixer, h, ScanConfig(block_t=8, block_e=8, conv_block_t=16, conv_block_e=8,
                                               conv_dp_block_t=4, conv_dp_tiles=3, segments=segments))
    ref = ref_mixer(h_ref)
    dout = torch.randn(ref.shape, dtype=torch.float64)
    out.backward(dout.float())
    ref.backward(dout)
    errors = {"out": rel(out, ref), "dh": rel(h.grad, h_ref.grad)}
    ref_params = dict(ref_mixer.named_parameters())
    errors.update({f"d{name}": rel(p.grad, ref_params[name].grad) for name, p in mixer.named_parameters()})
    return errors


def check_backbone_mixer(b, l, d_model, seed) -> dict:
    """The backbone's BidirectionalMamba with backend "triton" vs the same module with backend "torch"."""
    from pipeline.models.mamba import BidirectionalMamba
    torch.manual_seed(seed)
    mixer = BidirectionalMamba(d_model, d_state=4, backend="torch")
    h = torch.randn(b, l, d_model, requires_grad=True)
    dout = torch.randn(b, l, d_model)
    results = {}
    for backend in ("torch", "triton"):
        mixer.backend = backend
        mixer.zero_grad()
        h.grad = None
        out = mixer(h)
        out.backward(dout)
        results[backend] = [out.detach(), h.grad.clone()] + [p.grad.clone() for p in mixer.parameters()]
    names = ["out", "dh"] + [f"d{n}" for n, _ in mixer.named_parameters()]
    return {n: rel(t, r) for n, t, r in zip(names, results["triton"], results["torch"])}


def check_pack(e, k, r, n, conv_bias, xz_dtype, seed, param_dtype="float32") -> dict:
    """`packed_params` against the same layouts built with torch ops: each entry's relative error (a copy, a cast,
    -exp: 0, but for the rounding of a cast to bf16, which the interpreter may do differently from torch)."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for shape in ((e, 1, k), (e,), (r + 2 * n, e), (e, r), (e, n), (e,), (e,)):
        pairs += [torch.randn(shape, generator=g).to(getattr(torch, param_dtype)) for _ in range(2)]
    if not conv_bias:
        pairs[2] = pairs[3] = None
    xz = torch.zeros(1, 1, 2 * e, dtype=getattr(torch, xz_dtype))
    rp = r + (-r % 16)
    stack = lambda i: torch.stack([pairs[i], pairs[i + 1]])  # noqa: E731
    wx = torch.zeros(2, rp + 2 * n, e, dtype=pairs[4].dtype)
    wx[:, :r], wx[:, rp:] = stack(4)[:, :r], stack(4)[:, r:]
    expected = [stack(0)[:, :, 0], stack(2) if conv_bias else torch.zeros(2, e, dtype=pairs[0].dtype),
                wx.to(xz.dtype), F.pad(stack(6), (0, rp - r)).to(xz.dtype),
                -torch.exp(stack(8).float()).transpose(1, 2), stack(10).float(), stack(12).float()]
    got = packed_params(pairs, xz)
    names = ["conv_w", "conv_b", "wx", "wdt", "A", "D", "dt_bias"]
    errors = {name: float(((a.float() - b.float()).abs() / b.float().abs().clamp_min(1e-30)).max())
              for name, a, b in zip(names, got, expected)}
    errors["layouts"] = float(any(a.shape != b.shape or a.dtype != b.dtype for a, b in zip(got, expected)))
    return errors


@triton.jit
def _activations(x_ptr, softplus_ptr, sigmoid_ptr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    tl.store(softplus_ptr + offs, primitives._softplus(x))
    tl.store(sigmoid_ptr + offs, primitives._sigmoid(x))


def check_activations(lo, hi, count) -> dict:
    """The kernels' softplus and sigmoid on fp32 points in [lo, hi] against fp64 torch: their largest relative
    errors. In the interpreter the SFU's lg2 and rcp are exact, so this checks the formulas (the series below
    e^x = 1/16, the branch points); the GPU's error on top is bench/fused.py's fp32 check."""
    x = torch.linspace(lo, hi, count, dtype=torch.float32)
    softplus, sigmoid = torch.empty_like(x), torch.empty_like(x)
    _activations[(count // 64,)](x, softplus, sigmoid, BLOCK=64)
    worst = lambda a, b: float(((a.double() - b) / b).abs().max())  # noqa: E731
    return {"softplus": worst(softplus, F.softplus(x.double())), "sigmoid": worst(sigmoid, torch.sigmoid(x.double()))}


def check_state_pairs(seed) -> dict:
    """The scan in bf16 with its chunk states saved as bf16 pairs in 32-bit words (the default) and as plain bf16:
    the largest difference between the two runs' outputs and gradients (the same rounding: none expected), and
    whether the first run did pair them (each direction's)."""
    pairs, paired = launch._state_pairs, []

    def recorded(dtype, lay):
        paired.append(pairs(dtype, lay))
        return paired[-1]

    results = []
    for choice in (recorded, lambda dtype, lay: False):
        launch._state_pairs = choice
        leaves = {k: v.requires_grad_() for k, v in scan_inputs(2, 29, 40, 16, 3, seed, torch.bfloat16).items()}
        out = bidirectional_selective_scan(**leaves, cfg=ScanConfig(segments=3))
        out.backward(torch.ones_like(out))
        results.append([out] + [leaves[k].grad for k in sorted(leaves)])
    launch._state_pairs = pairs
    return {"max_difference": max(float((a.double() - b.double()).abs().max()) for a, b in zip(*results)),
            "paired": bool(paired) and all(paired)}


CHECKS = {"scan": check_scan, "mixer": check_mixer, "backbone": check_backbone_mixer, "pack": check_pack,
          "activations": check_activations, "pairs": check_state_pairs}


def run_checks(cases: list, script: str = __file__) -> list:
    """Runs [(check name, kwargs), ...] in one interpreter subprocess of `script` (a test module whose __main__ runs
    its checks); returns their error dicts."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.getcwd())
    proc = subprocess.run([sys.executable, script, json.dumps(cases)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_close(errors: dict, tol: float, case) -> None:
    assert errors.pop("finite", True), f"non-finite output in {case}"
    bad = {k: v for k, v in errors.items() if not v < tol}  # `not <` also catches NaN
    assert not bad, f"{case}: relative errors above {tol}: {bad}"


# ------------------------------------------------------------------------------------------------ tests
SCAN_CASES = [
    # b, l, e, n, seed, dtype, block_t, block_e, segments
    (2, 37, 12, 4, 0, "float32", 8, 8, 1),   # odd length, channels not a multiple of the block, several chunks
    (1, 67, 8, 6, 1, "float32", 16, 8, 3),   # states not a power of two; three segments carried by the summaries
    (2, 1, 8, 4, 2, "float32", 8, 8, 1),     # a single token
    (1, 45, 8, 8, 3, "float32", 8, 8, 4),    # last segment shorter than the others
    (2, 29, 40, 16, 8, "float32", 2, 32, 3),  # 16 states, 32 channels a block: dB, dC by the lane reduce-scatter
]


def test_scan_matches_naive_recurrence_fp32():
    results = run_checks([("scan", dict(zip(("b", "l", "e", "n", "seed", "dtype_name", "block_t", "block_e",
                                              "segments"), case))) for case in SCAN_CASES])
    for case, errors in zip(SCAN_CASES, results):
        assert_close(errors, TOL_FP32, case)


def test_scan_bf16_inputs_within_bf16_tolerance():
    case = (2, 29, 8, 4, 4, "bfloat16", 8, 8, 2)
    [errors] = run_checks([("scan", dict(zip(("b", "l", "e", "n", "seed", "dtype_name", "block_t", "block_e",
                                              "segments"), case)))])
    assert_close(errors, TOL_BF16, case)


def test_bf16_chunk_states_saved_in_pairs_change_nothing():
    [errors] = run_checks([("pairs", dict(seed=12))])
    assert errors == {"max_difference": 0.0, "paired": True}, errors


def test_mixer_matches_plain_bimamba_forward_and_gradients():
    cases = [dict(b=2, l=23, d_model=8, n=4, seed=5, segments=1), dict(b=1, l=41, d_model=8, n=4, seed=6, segments=2)]
    for case, errors in zip(cases, run_checks([("mixer", c) for c in cases])):
        assert_close(errors, TOL_FP32, case)


def test_backbone_triton_backend_matches_its_torch_backend():
    case = dict(b=2, l=33, d_model=16, seed=7)
    [errors] = run_checks([("backbone", case)])
    assert_close(errors, TOL_FP32, case)


def test_packed_params_equal_the_stacked_padded_and_cast_parameters():
    cases = [dict(e=40, k=4, r=3, n=16, conv_bias=True, xz_dtype="bfloat16", seed=9),  # R padded to 16, 2 blocks
             dict(e=24, k=3, r=16, n=5, conv_bias=False, xz_dtype="float32", seed=10),  # no padding, no conv bias
             dict(e=8, k=4, r=1, n=4, conv_bias=True, xz_dtype="bfloat16", seed=11, param_dtype="bfloat16")]  # DS bf16
    for case, errors in zip(cases, run_checks([("pack", c) for c in cases])):
        bf16 = ("wx", "wdt") if case["xz_dtype"] == "bfloat16" else ()
        assert all(v <= (2 ** -7 if name in bf16 else 1e-6) for name, v in errors.items()), (case, errors)


def test_softplus_and_sigmoid_within_fp32_accuracy():
    # VideoMamba's dt biases put softplus's inputs near -7 .. -2 (delta 1e-3 .. 0.1), where log(1 + e^x) in fp32
    # loses digits to the rounding of 1 + e^x: 1.3e-3 relative at x = -10 before the series replaced it. What is
    # left is e^x = 2^(x log2 e)'s: the product's last bit, 1.9e-6 relative at |x| = 40, 1.0e-6 at |x| = 20.
    [errors] = run_checks([("activations", dict(lo=-40.0, hi=40.0, count=64 * 1024))])
    assert errors["softplus"] < 2.5e-6 and errors["sigmoid"] < 2.5e-6, errors
    [errors] = run_checks([("activations", dict(lo=-20.0, hi=20.0, count=64 * 1024))])
    assert errors["softplus"] < 1.5e-6 and errors["sigmoid"] < 1.5e-6, errors


def test_weight_grads_per_direction_equal_the_batched_product(monkeypatch):
    a, b = torch.randn(2, 70, 12), torch.randn(2, 70, 20)
    expected = torch.einsum("dkm,dkn->dmn", a.double(), b.double())
    for threshold in (71, 70):  # the batched call, then one mm per direction
        monkeypatch.setattr(autograd, "PER_DIRECTION_TOKENS", threshold)
        got = autograd._weight_grad(a, b)
        assert got.shape == (2, 12, 20) and torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-5), threshold


def test_scan_rejects_mismatched_shapes():
    code = ("from pipeline.models.ops.bimamba import bidirectional_selective_scan as f; import torch\n"
            "u = torch.zeros(2, 1, 5, 4)\n"
            "try:\n    f(u, u, torch.zeros(2, 4, 3), torch.zeros(2, 1, 5, 2), torch.zeros(2, 1, 5, 2), "
            "torch.zeros(2, 4), u[0], torch.zeros(2, 4))\nexcept ValueError as e:\n    print(e)\n")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.getcwd())
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "B has shape (2, 1, 5, 2), expected (2, 1, 5, 3)" in proc.stdout, proc.stdout + proc.stderr[-2000:]


# ------------------------------------------------------------------------------------------------ compiled for sm_90
def sm90_kernel_stats() -> dict:
    """The forward's output pass and the backward compiled for an H100/H200 (sm_90) without a GPU, at
    VideoMamba-Ti's 64-frame shape: per kernel the shared memory it needs, the warp shuffles in its PTX, its SFU
    lg2 calls and IEEE divisions. Shared memory and shuffles show a layout with lanes along the states instead of
    the channels (Triton 3.6 chose that for an earlier version: 159 shuffles and 1 KB of shared memory for layout
    conversions in the backward, 1.7x its time on the H200)."""
    from pipeline.models.ops import sm90
    stats = {}
    for name in ("output", "backward"):
        compiled = sm90.compile_pass(name, 4, 12545, 384)
        sass = sm90.sass_stats(compiled)
        stats[name] = dict(sm90.ptx_stats(compiled), registers=sass["registers"], loop=sass["loop_instructions"],
                           loop_shuffles=sass["opcodes"]["SHFL"],
                           loop_spills=sass["opcodes"]["STL"] + sass["opcodes"]["LDL"])
    return stats


def test_scan_kernels_compile_for_sm90_with_one_channel_per_lane():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.getcwd()
    proc = subprocess.run([sys.executable, __file__, "--sm90"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stats["output"]["shared"] == 0 and stats["backward"]["shared"] == 0, stats
    assert stats["output"]["shuffles"] <= 8, stats  # none for the sums over states; a few to spread 64-wide rows
    assert stats["backward"]["shuffles"] == 31, stats  # the dB/dC reduce-scatter's, nothing else
    for kernel in stats.values():  # softplus and sigmoid on the SFU: no full-range logf, no IEEE division
        assert kernel["sfu_lg2"] >= 1 and kernel["divisions"] == 0, stats
    # the machine code (bench/sass.py reads it the same way): the token loop found, its shuffles all the
    # reduce-scatter's, no register spills inside it
    assert stats["backward"]["loop"] > 300 and stats["backward"]["loop_shuffles"] == 31, stats
    assert stats["backward"]["loop_spills"] == 0 and stats["backward"]["registers"] <= 255, stats


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "--sm90":
        print(json.dumps(sm90_kernel_stats()))
    else:
        print(json.dumps([CHECKS[name](**kwargs) for name, kwargs in json.loads(sys.argv[1])]))
