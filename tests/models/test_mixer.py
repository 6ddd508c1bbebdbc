"""The bidirectional Mamba mixer: official parameter layout, bidirectionality, and its forward against a naive one."""
import pytest
import torch
import torch.nn.functional as F

from pipeline.models.mamba import BidirectionalMamba, choose_backend
from pipeline.models.selective_scan import selective_scan_ref
from tests.models.official_layout import official_mixer_shapes


def naive_mixer(m: BidirectionalMamba, h: torch.Tensor) -> torch.Tensor:
    """out_proj(y_forward + flip(y_backward)), each direction with its own parameters and the sequential scan."""
    xz = m.in_proj(h).transpose(1, 2)

    def direction(xz, conv, x_proj, dt_proj, A_log, D):
        x, z = xz.chunk(2, dim=1)
        x = F.silu(F.conv1d(x, conv.weight, conv.bias, padding=m.d_conv - 1, groups=m.d_inner)[..., :xz.shape[-1]])
        dt, B, C = x_proj(x.transpose(1, 2)).split([m.dt_rank, m.d_state, m.d_state], dim=-1)
        delta = (dt @ dt_proj.weight.t()).transpose(1, 2)
        return selective_scan_ref(x, delta, -torch.exp(A_log), B.transpose(1, 2), C.transpose(1, 2), D, z,
                                  dt_proj.bias, delta_softplus=True)

    y = direction(xz, m.conv1d, m.x_proj, m.dt_proj, m.A_log, m.D)
    y_b = direction(xz.flip(-1), m.conv1d_b, m.x_proj_b, m.dt_proj_b, m.A_b_log, m.D_b).flip(-1)
    return m.out_proj((y + y_b).transpose(1, 2))


def test_parameters_are_the_official_ones():
    m = BidirectionalMamba(48)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == official_mixer_shapes(48)


def test_torch_backend_matches_naive_mixer():
    m = BidirectionalMamba(32, backend="torch")
    with torch.no_grad():  # make the backward direction differ from the forward one
        m.A_b_log.add_(torch.rand_like(m.A_b_log))
        m.D_b.mul_(-0.5)
    h = torch.randn(2, 77, 32, requires_grad=True)
    out, ref = m(h), naive_mixer(m, h)
    assert ((out - ref).norm() / ref.norm()) < 1e-5
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [h, m.A_b_log, m.conv1d.weight], g)
    want = torch.autograd.grad(ref, [h, m.A_b_log, m.conv1d.weight], g)
    for a, b in zip(got, want):
        assert ((a - b).norm() / b.norm()) < 1e-5


def test_output_at_a_position_depends_on_tokens_before_and_after_it():
    m = BidirectionalMamba(16, backend="torch")
    h = torch.randn(1, 30, 16, requires_grad=True)
    (grad,) = torch.autograd.grad(m(h)[0, 10].sum(), h)
    per_token = grad[0].abs().sum(-1)
    assert per_token[11:].sum() > 0 and per_token[:10].sum() > 0
    assert per_token[25:].sum() > 0  # far beyond the conv window: through the backward SSM


def test_backward_direction_has_its_own_parameters():
    """Zeroing the backward branch's input path removes the dependence on later tokens (so it is that branch)."""
    m = BidirectionalMamba(16, backend="torch")
    with torch.no_grad():
        m.x_proj_b.weight.zero_()  # dt, B, C of the backward SSM -> B = 0: no state input
    h = torch.randn(1, 30, 16, requires_grad=True)
    (grad,) = torch.autograd.grad(m(h)[0, 10].sum(), h)
    assert grad[0, 14:].abs().max() == 0  # only the causal conv window (3 tokens) of the flipped branch remains


def test_backend_choice_on_cpu():
    assert choose_backend(torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="not one of"):
        BidirectionalMamba(16, backend="cuda")
    with pytest.raises(RuntimeError, match="mamba_ssm"):
        BidirectionalMamba(16, backend="mamba_ssm")(torch.randn(1, 5, 16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_backend_on_cuda_matches_torch_backend():
    m = BidirectionalMamba(64).cuda()
    h = torch.randn(2, 300, 64, device="cuda")
    with torch.no_grad():
        auto = m(h)
        m.backend = "torch"
        ref = m(h)
    assert ((auto - ref).norm() / ref.norm()) < 1e-4
