"""Mamba-1 block: mamba_ssm-compatible parameters and init, determinism, causality, backends."""
import math

import pytest
import torch
import torch.nn.functional as F

from m2r.config import ConfigError
from m2r.models import scan
from m2r.models.mamba import DT_MAX, DT_MIN, Mamba


def expected_parameter_shapes(d_model, d_state=16, d_conv=4, expand=2):
    d_inner, dt_rank = expand * d_model, math.ceil(d_model / 16)
    return {
        "A_log": (d_inner, d_state),
        "D": (d_inner,),
        "in_proj.weight": (2 * d_inner, d_model),
        "conv1d.weight": (d_inner, 1, d_conv),
        "conv1d.bias": (d_inner,),
        "x_proj.weight": (dt_rank + 2 * d_state, d_inner),
        "dt_proj.weight": (d_inner, dt_rank),
        "dt_proj.bias": (d_inner,),
        "out_proj.weight": (d_model, d_inner),
    }


def test_parameter_names_shapes_and_count_match_mamba_ssm_at_the_bottleneck_width():
    module = Mamba(384, d_state=16, d_conv=4, expand=2, scan_backend="torch")
    shapes = {name: tuple(p.shape) for name, p in module.named_parameters()}
    assert shapes == expected_parameter_shapes(384)
    by_formula = (384 * 1536 + 768 * 4 + 768 + 768 * (24 + 32) + 24 * 768 + 768 + 768 * 16 + 768 + 768 * 384)
    assert sum(p.numel() for p in module.parameters()) == by_formula == 963_840


def test_initialisation_follows_mamba_ssm():
    torch.manual_seed(0)
    module = Mamba(64, d_state=8, scan_backend="torch")
    log_states = torch.log(torch.arange(1, 9, dtype=torch.float32))
    torch.testing.assert_close(module.A_log, log_states.expand(128, 8))
    torch.testing.assert_close(module.D, torch.ones(128))
    dt = F.softplus(module.dt_proj.bias)
    assert DT_MIN * 0.999 <= dt.min() and dt.max() <= DT_MAX * 1.001
    assert dt.max() / dt.min() > 10, "dt should spread log-uniformly over [dt_min, dt_max]"
    assert module.dt_proj.weight.abs().max() <= module.dt_rank ** -0.5
    assert module.A_log._no_weight_decay and module.D._no_weight_decay


def test_same_seed_gives_same_weights_and_outputs():
    def build(seed):
        torch.manual_seed(seed)
        return Mamba(32, scan_backend="torch")

    first, second, other = build(7), build(7), build(8)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name
    assert not torch.equal(first.in_proj.weight, other.in_proj.weight)
    tokens = torch.randn(2, 10, 32)
    assert torch.equal(first(tokens), second(tokens))


def test_output_at_t_does_not_depend_on_later_inputs():
    torch.manual_seed(0)
    module = Mamba(32, scan_backend="torch")
    tokens = torch.randn(2, 20, 32)
    changed = tokens.clone()
    changed[:, 12:] = torch.randn(2, 8, 32)
    before, after = module(tokens), module(changed)
    torch.testing.assert_close(before[:, :12], after[:, :12], atol=0, rtol=0)
    assert not torch.allclose(before[:, 12:], after[:, 12:])


def test_forward_keeps_shape_and_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    module = Mamba(32, scan_backend="auto")
    tokens = torch.randn(2, 49, 32, requires_grad=True)
    out = module(tokens)
    assert out.shape == tokens.shape
    out.square().mean().backward()
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert torch.isfinite(tokens.grad).all()


def test_scan_path_is_resolved_once_and_again_when_the_backend_changes(monkeypatch):
    module = Mamba(16, scan_backend="torch")
    calls = []
    resolve = scan.resolve_scan_backend
    monkeypatch.setattr("m2r.models.mamba.resolve_scan_backend", lambda *a: calls.append(a) or resolve(*a))
    assert [module.scan_path(torch.device("cpu")) for _ in range(3)] == ["torch"] * 3
    assert len(calls) == 1
    module.scan_backend = "mamba_ssm"
    with pytest.raises(ConfigError, match="cannot run: device is cpu"):
        module.scan_path(torch.device("cpu"))


def test_unknown_scan_backend_is_rejected_at_construction():
    with pytest.raises(ValueError, match="model.scan_backend='cuda'"):
        Mamba(32, scan_backend="cuda")


def _mamba_ssm_cuda_reason():
    if not torch.cuda.is_available():
        return "needs CUDA"
    return scan.mamba_ssm_unavailable_reason(torch.device("cuda"))


needs_mamba_ssm_cuda = pytest.mark.skipif(_mamba_ssm_cuda_reason() is not None, reason=str(_mamba_ssm_cuda_reason()))


def _outputs_and_grads(module, tokens):
    tokens = tokens.detach().clone().requires_grad_(True)
    out = module(tokens)
    projection = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    (out * projection).sum().backward()
    grads = {name: p.grad.detach().clone() for name, p in module.named_parameters()}
    module.zero_grad(set_to_none=True)
    return out.detach(), tokens.grad, grads


@pytest.mark.gpu
@needs_mamba_ssm_cuda
def test_mamba_ssm_backend_matches_torch_backend_on_cuda():
    torch.manual_seed(0)
    module = Mamba(96, scan_backend="torch").cuda()
    tokens = torch.randn(2, 196, 96, device="cuda")
    out, tokens_grad, grads = _outputs_and_grads(module, tokens)
    module.scan_backend = "mamba_ssm"
    kernel_out, kernel_tokens_grad, kernel_grads = _outputs_and_grads(module, tokens)
    torch.testing.assert_close(kernel_out, out, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(kernel_tokens_grad, tokens_grad, atol=1e-4, rtol=1e-3)
    for name in grads:
        torch.testing.assert_close(kernel_grads[name], grads[name], atol=1e-3, rtol=1e-3, msg=lambda m: f"{name}: {m}")


@pytest.mark.gpu
@needs_mamba_ssm_cuda
def test_same_seed_builds_the_same_weights_as_mamba_ssm_and_computes_the_same_output():
    from mamba_ssm import Mamba as ReferenceMamba

    torch.manual_seed(3)
    reference = ReferenceMamba(d_model=96, d_state=16, d_conv=4, expand=2)
    torch.manual_seed(3)
    ours = Mamba(96, d_state=16, d_conv=4, expand=2, scan_backend="torch")
    assert ours.state_dict().keys() == reference.state_dict().keys()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name
    tokens = torch.randn(2, 196, 96, device="cuda")
    torch.testing.assert_close(ours.cuda()(tokens), reference.cuda()(tokens), atol=1e-4, rtol=1e-3)
