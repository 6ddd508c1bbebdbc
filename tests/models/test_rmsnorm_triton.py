"""The fused residual add + RMSNorm against the block's PyTorch path, and a whole VideoMamba on the Triton kernels
against the same model on the pure-PyTorch path, on the CPU through TRITON_INTERPRET=1 (one subprocess, as the
interpreter must be on before triton is imported)."""
from __future__ import annotations

import json
import sys

import torch

from tests.models.test_bimamba_triton import TOL_BF16, TOL_FP32, assert_close, rel, run_checks


def reference(hidden, residual, weight, eps, residual_in_fp32):
    """Block's unfused path (drop path off)."""
    from pipeline.models.videomamba import RMSNorm
    residual = hidden if residual is None else residual + hidden
    if residual_in_fp32:
        residual = residual.float()
    norm = RMSNorm(hidden.shape[-1], eps)
    norm.weight = torch.nn.Parameter(weight)
    return norm(residual.to(weight.dtype)), residual, norm.weight


def check_norm(with_residual: bool, residual_in_fp32: bool, weight_dtype: str, seed: int,
               hidden_dtype: str = "float32", max_programs: int = 0) -> dict:
    """max_programs > 0 caps the backward's grid, so that its programs loop over several blocks of rows."""
    from pipeline.models.ops import rmsnorm_triton
    from pipeline.models.ops.rmsnorm_triton import add_rms_norm
    if max_programs:
        rmsnorm_triton.MAX_BWD_PROGRAMS = max_programs
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 37, 24, generator=g).to(getattr(torch, hidden_dtype))
    residual = torch.randn(3, 37, 24, generator=g) * 2 if with_residual else None
    weight = (1 + 0.1 * torch.randn(24, generator=g)).to(getattr(torch, weight_dtype))
    grads_in = (torch.randn(3, 37, 24, generator=g), torch.randn(3, 37, 24, generator=g))
    results = []
    for fused in (True, False):
        h = hidden.clone().requires_grad_()
        r = residual.clone().requires_grad_() if residual is not None else None
        w = weight.clone().requires_grad_()
        if fused:
            out, res = add_rms_norm(h, r, w, 1e-5, residual_in_fp32)
        else:
            out, res, w = reference(h, r, w, 1e-5, residual_in_fp32)
        (out.float() * grads_in[0]).sum().add((res.float() * grads_in[1]).sum()).backward()
        assert h.grad.dtype == h.dtype and (r is None or r.grad.dtype == r.dtype)
        results.append([out, res, h.grad, w.grad] + ([r.grad] if r is not None else []))
        assert out.dtype == weight.dtype and (res.dtype == torch.float32 or not residual_in_fp32)
    names = ["out", "residual", "dhidden", "dweight", "dresidual"]
    return {n: rel(a, b) for n, a, b in zip(names, *results)}


def check_out_dtype(seed: int) -> dict:
    """The norm written in bf16 (out_dtype, as the block asks under autocast) against the norm in fp32 followed by
    the cast to bf16 that in_proj's autocast would do. Output: the largest distance from the fp32 norm in bf16 ulps
    (below 1: one of its two bf16 neighbours; the GPU rounds to nearest, below 0.5, the interpreter truncates).
    Gradients: the largest difference (none expected: the cast's backward only widens the bf16 gradient)."""
    from pipeline.models.ops.rmsnorm_triton import add_rms_norm
    g = torch.Generator().manual_seed(seed)
    hidden, residual = torch.randn(3, 37, 24, generator=g), torch.randn(3, 37, 24, generator=g)
    weight = 1 + 0.1 * torch.randn(24, generator=g)
    dout = torch.randn(3, 37, 24, generator=g).bfloat16()
    results = []
    for out_dtype in (torch.bfloat16, None):
        h, r, w = (t.clone().requires_grad_() for t in (hidden, residual, weight))
        out, res = add_rms_norm(h, r, w, 1e-5, True, out_dtype)
        assert out.dtype == (out_dtype or torch.float32)
        (out.to(torch.bfloat16) * dout).float().sum().add(res.sum()).backward()
        results.append([out.detach(), h.grad, r.grad, w.grad])
    (bf16, *grads), (fp32, *ref_grads) = results
    ulp = torch.ldexp(torch.ones_like(fp32), torch.frexp(fp32)[1] - 8)  # a bf16 ulp at each fp32 value
    errors = {"out_ulps": float(((bf16.double() - fp32.double()).abs() / ulp.double()).max())}
    errors.update({n: float((a.double() - b.double()).abs().max()) for n, a, b in zip(["dh", "dr", "dw"], grads,
                                                                                      ref_grads)})
    return errors


def check_backbone(seed: int) -> dict:
    """VideoMamba (2 blocks) with scan_backend "triton" (fused mixer and norm) vs "torch": features and grads."""
    from pipeline.models import build_videomamba
    torch.manual_seed(seed)
    models = {b: build_videomamba("tiny", num_frames=2, img_size=32, depth=2, embed_dim=16, scan_backend=b)
              for b in ("triton", "torch")}
    models["torch"].load_state_dict(models["triton"].state_dict())
    x = torch.randn(2, 3, 2, 32, 32)
    dout = torch.randn(2, 8, 16)  # a random projection: the mean square of normed tokens is nearly constant
    out = {}
    for backend, model in models.items():
        feats = model.forward_features(x).tokens
        (feats * dout).sum().backward()
        out[backend] = [feats] + [p.grad for p in model.parameters()]
    names = ["tokens"] + [f"d{n}" for n, _ in models["triton"].named_parameters()]
    return {n: rel(a, b) for n, a, b in zip(names, out["triton"], out["torch"])}


def test_fused_add_rmsnorm_matches_the_block_path():
    cases = [("norm", dict(with_residual=True, residual_in_fp32=True, weight_dtype="float32", seed=0)),
             ("norm", dict(with_residual=False, residual_in_fp32=True, weight_dtype="float32", seed=1)),
             ("norm", dict(with_residual=True, residual_in_fp32=False, weight_dtype="float32", seed=2)),
             ("backbone", dict(seed=3))]
    for case, errors in zip(cases, run_checks(cases, __file__)):
        assert_close(errors, TOL_FP32, case)


def test_fused_add_rmsnorm_rounds_the_norm_input_to_a_bf16_weight():
    """Under DeepSpeed's bf16 the norm weight is bf16: the fp32 residual is rounded before the norm, as the
    unfused path's cast does; outputs then agree to bf16 precision."""
    case = ("norm", dict(with_residual=True, residual_in_fp32=True, weight_dtype="bfloat16", seed=4))
    [errors] = run_checks([case], __file__)
    assert errors["residual"] < TOL_FP32, errors  # the residual stream itself stays exact fp32
    assert_close(errors, TOL_BF16, case)


def test_fused_add_rmsnorm_gives_a_bf16_hidden_its_gradient_in_bf16():
    """Under autocast the mixer's output (hidden) is bf16 while the residual stream is fp32: the backward writes
    the gradient once per dtype from the same fp32 values, here with the grid capped at 3 programs so that each one
    loops over several blocks of rows (111 rows, 8 a block)."""
    case = ("norm", dict(with_residual=True, residual_in_fp32=True, weight_dtype="float32", seed=5,
                         hidden_dtype="bfloat16", max_programs=3))
    [errors] = run_checks([case], __file__)
    assert errors["dresidual"] < TOL_FP32 and errors["dweight"] < TOL_FP32, errors  # fp32 from fp32 sums
    assert_close(errors, TOL_BF16, case)


def test_fused_add_rmsnorm_written_in_the_autocast_dtype_equals_the_cast():
    [errors] = run_checks([("out_dtype", dict(seed=6))], __file__)
    assert errors.pop("out_ulps") < 1.0, errors
    assert errors == {"dh": 0.0, "dr": 0.0, "dw": 0.0}, errors


if __name__ == "__main__":
    torch.set_num_threads(1)
    checks = {"norm": check_norm, "backbone": check_backbone, "out_dtype": check_out_dtype}
    print(json.dumps([checks[name](**kwargs) for name, kwargs in json.loads(sys.argv[1])]))
