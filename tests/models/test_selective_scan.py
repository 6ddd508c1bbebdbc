"""The selective-scan backends against the naive sequential recurrence (outputs and gradients, fp32)."""
import subprocess
import sys

import pytest
import torch

from pipeline.models import selective_scan as ss


def scan_args(b, d, l, n, with_d=True, with_z=True, with_bias=True, dtype=torch.float32, device="cpu"):
    """Random leaves (u, delta, A, B, C, D, z, delta_bias) with grad; optional ones None when switched off."""
    args = [torch.randn(b, d, l), torch.randn(b, d, l) * 0.5, -torch.rand(d, n) * 4 - 0.1,
            torch.randn(b, n, l), torch.randn(b, n, l), torch.randn(d) if with_d else None,
            torch.randn(b, d, l) if with_z else None, torch.randn(d) if with_bias else None]
    return [a.to(device=device, dtype=dtype if a.dim() == 3 else torch.float32).requires_grad_()
            if a is not None else None for a in args]


def rel(x, y):
    return ((x.float() - y.float()).norm() / y.float().norm().clamp_min(1e-30)).item()


def assert_matches_reference(args, softplus, backend, tol=1e-5):
    out = ss.selective_scan(*args, delta_softplus=softplus, backend=backend)
    ref = ss.selective_scan_ref(*args, delta_softplus=softplus)
    assert out.shape == ref.shape and out.dtype == args[0].dtype
    assert rel(out, ref) < tol
    leaves = [a for a in args if a is not None]
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad_out)
    want = torch.autograd.grad(ref, leaves, grad_out)
    for g, w in zip(got, want):
        if w.abs().max() > 0:
            assert rel(g, w) < tol


# lengths: a single token, short sequences run as one chunk (states kept for backward), several chunks exactly,
# several chunks with a ragged tail (states recomputed in backward)
@pytest.mark.parametrize("shape", [(2, 5, 1, 3), (2, 6, 7, 4), (1, 8, 2 * ss.CHUNK, 16), (2, 4, 3 * ss.CHUNK, 8),
                                   (1, 3, 4 * ss.CHUNK + 5, 16)])
def test_torch_backend_matches_sequential_recurrence(shape):
    assert_matches_reference(scan_args(*shape), softplus=True, backend="torch")


@pytest.mark.parametrize("with_d,with_z,with_bias,softplus", [(False, False, False, False), (True, False, True, True),
                                                              (False, True, False, True)])
def test_torch_backend_optional_terms(with_d, with_z, with_bias, softplus):
    args = scan_args(2, 4, 90, 6, with_d=with_d, with_z=with_z, with_bias=with_bias)
    if not softplus:
        args[1] = args[1].detach().abs().requires_grad_()  # dt must stay positive without softplus
    assert_matches_reference(args, softplus=softplus, backend="torch")


def test_torch_backend_strong_decay_stays_finite_and_exact():
    """Decays far below fp32's range inside one chunk (|dt A| ~ 1e3 per token) must not overflow or lose accuracy."""
    args = scan_args(1, 4, 150, 8)
    with torch.no_grad():
        args[2].mul_(300.0)
    assert_matches_reference(args, softplus=True, backend="torch")


def test_bf16_inputs_keep_fp32_state():
    args = scan_args(1, 8, 100, 16, dtype=torch.bfloat16)
    out = ss.selective_scan(*args, delta_softplus=True, backend="torch")
    ref = ss.selective_scan_ref(*[a.detach().float() if a is not None else None for a in args], delta_softplus=True)
    assert out.dtype == torch.bfloat16
    assert rel(out, ref) < 1e-2  # only the bf16 rounding of the output


def test_shape_errors_name_the_argument():
    args = scan_args(1, 4, 10, 3)
    args[3] = torch.randn(1, 3, 9)
    with pytest.raises(ValueError, match="B has shape"):
        ss.selective_scan(*args, backend="torch")


def test_backend_resolution_on_cpu():
    assert ss.resolve_scan_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(RuntimeError, match="mamba_ssm"):
        ss.resolve_scan_backend("mamba_ssm", torch.device("cpu"))
    with pytest.raises(ValueError, match="not one of"):
        ss.resolve_scan_backend("cuda", torch.device("cpu"))


def test_cpu_path_never_imports_mamba_ssm():
    code = ("import sys, torch; from pipeline.models import build_videomamba; "
            "m = build_videomamba('tiny', num_frames=2, img_size=32, depth=1, embed_dim=32); "
            "m(torch.randn(1, 3, 2, 32, 32)).sum().backward(); "
            "print(sorted(k for k in sys.modules if k.split('.')[0] in ('mamba_ssm', 'causal_conv1d')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


cuda_mamba = pytest.mark.skipif(not (torch.cuda.is_available() and ss.mamba_ssm_importable()),
                                reason="mamba-ssm's kernels need CUDA and an installed mamba-ssm")


@cuda_mamba
@pytest.mark.parametrize("shape", [(2, 16, 100, 16), (1, 64, 1000, 16)])
def test_mamba_ssm_backend_matches_sequential_recurrence(shape):
    assert_matches_reference(scan_args(*shape, device="cuda"), softplus=True, backend="mamba_ssm")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_backend_on_cuda_matches_reference():
    assert_matches_reference(scan_args(2, 16, 150, 16, device="cuda"), softplus=True, backend="torch")


def test_backward_keeps_chunk_boundary_states_not_every_state():
    """Memory: for a long sequence the saved tensors are the inputs, the ungated output and one state per chunk,
    not the (b, d, l, n) states of every token."""
    b, d, l, n = 1, 64, 20 * ss.CHUNK, 16
    args = scan_args(b, d, l, n)
    out = ss.selective_scan(*args, delta_softplus=True, backend="torch")
    saved = sum(t.numel() for t in out.grad_fn.saved_tensors if t is not None)
    inputs = sum(a.numel() for a in args if a is not None)
    assert saved <= inputs + b * d * l + 20 * b * d * n
    assert saved < b * d * l * n / 2
