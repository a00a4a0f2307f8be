"""Selective scan backends: our parallel PyTorch scan against a sequential oracle, mamba_ssm's
reference and CUDA kernel; backend resolution."""
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from m2r import dist
from m2r.config import ConfigError
from m2r.models import scan
from m2r.models.scan import parallel_linear_scan, resolve_scan_backend, selective_scan

INPUT_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def loop_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The oracle: the recurrence written out one time step at a time."""
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    state = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    outputs = []
    for t in range(u.shape[-1]):
        decay = torch.exp(delta[:, :, t, None] * A)
        drive = (delta[:, :, t] * u[:, :, t])[:, :, None] * B[:, None, :, t]
        state = decay * state + drive
        outputs.append((state * C[:, None, :, t]).sum(-1))
    y = torch.stack(outputs, dim=-1)
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return y


def make_inputs(batch=2, d_inner=3, d_state=4, length=37, dtype=torch.float64, device="cpu",
                with_D=True, with_z=True, with_delta_bias=True, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, offset=0.0):
        return (torch.randn(*shape, generator=generator, dtype=dtype) * scale + offset).to(device)

    # Positive time steps and negative A, as the Mamba block feeds them: the recurrence decays.
    inputs = dict(u=rand(batch, d_inner, length), delta=torch.exp(rand(batch, d_inner, length, scale=0.5, offset=-2)),
                  A=-torch.exp(rand(d_inner, d_state, scale=0.5)), B=rand(batch, d_state, length),
                  C=rand(batch, d_state, length), D=rand(d_inner) if with_D else None,
                  z=rand(batch, d_inner, length) if with_z else None,
                  delta_bias=torch.exp(rand(d_inner, scale=0.5, offset=-3)) if with_delta_bias else None)
    for tensor in inputs.values():
        if tensor is not None:
            tensor.requires_grad_(True)
    return inputs


def outputs_and_grads(scan_fn, inputs, delta_softplus, seed=1):
    """Output of scan_fn and the gradient of a random projection of it w.r.t. every given input."""
    fresh = {name: None if t is None else t.detach().clone().requires_grad_(True) for name, t in inputs.items()}
    out = scan_fn(**fresh, delta_softplus=delta_softplus)
    projection = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    (out * projection.to(out.device)).sum().backward()
    return out.detach(), {name: t.grad for name, t in fresh.items() if t is not None}


def assert_matches(actual, expected, atol, rtol):
    (out, grads), (ref_out, ref_grads) = actual, expected
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert grads[name] is not None, f"no gradient for {name}"
        torch.testing.assert_close(grads[name], ref_grads[name], atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


OPTIONAL_INPUTS = [  # (with_D, with_z, with_delta_bias, delta_softplus)
    (False, False, False, False),
    (True, True, True, True),
    (True, False, False, True),
    (False, True, True, False),
]


@pytest.mark.parametrize("with_D,with_z,with_delta_bias,delta_softplus", OPTIONAL_INPUTS)
def test_torch_scan_matches_loop_oracle_outputs_and_all_gradients(with_D, with_z, with_delta_bias, delta_softplus):
    inputs = make_inputs(with_D=with_D, with_z=with_z, with_delta_bias=with_delta_bias)
    assert_matches(outputs_and_grads(selective_scan, inputs, delta_softplus),
                   outputs_and_grads(loop_selective_scan, inputs, delta_softplus), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("length", [1, 2, 3, 16, 33])
def test_torch_scan_handles_lengths_around_powers_of_two(length):
    inputs = make_inputs(batch=1, d_inner=2, d_state=3, length=length)
    assert_matches(outputs_and_grads(selective_scan, inputs, True),
                   outputs_and_grads(loop_selective_scan, inputs, True), atol=1e-10, rtol=1e-10)


def test_torch_scan_passes_gradcheck():
    inputs = make_inputs(batch=1, d_inner=2, d_state=2, length=5)
    names = list(INPUT_NAMES)
    torch.autograd.gradcheck(
        lambda *tensors: selective_scan(**dict(zip(names, tensors)), delta_softplus=True),
        tuple(inputs[name] for name in names))


def test_reverse_linear_scan_runs_the_recurrence_backwards_in_time():
    a, b = torch.rand(2, 9, dtype=torch.float64), torch.randn(2, 9, dtype=torch.float64)
    forward_of_flipped = parallel_linear_scan(a.flip(-1), b.flip(-1)).flip(-1)
    torch.testing.assert_close(parallel_linear_scan(a, b, reverse=True), forward_of_flipped)


def test_fp32_scan_at_bottleneck_length_stays_close_to_fp64_oracle():
    inputs = make_inputs(batch=1, d_inner=4, d_state=16, length=784, seed=3)
    inputs_fp32 = {name: t.detach().float() for name, t in inputs.items()}
    expected = loop_selective_scan(**{n: t.detach() for n, t in inputs.items()}, delta_softplus=True)
    actual = selective_scan(**inputs_fp32, delta_softplus=True)
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual.double(), expected, atol=1e-4, rtol=1e-4)


def test_bf16_inputs_are_scanned_in_fp32_and_returned_as_bf16():
    inputs = {name: t.detach() for name, t in make_inputs(dtype=torch.float32).items()}
    low = {name: t.bfloat16() for name, t in inputs.items()}
    out = selective_scan(**low, delta_softplus=True)
    assert out.dtype == torch.bfloat16
    expected = selective_scan(**{name: t.float() for name, t in low.items()}, delta_softplus=True)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=1e-2)


def test_shape_mismatch_names_the_argument():
    inputs = {name: t.detach() for name, t in make_inputs().items()}
    inputs["C"] = inputs["C"][..., :-1]
    with pytest.raises(ValueError, match=r"C has shape \(2, 4, 36\), expected \(2, 4, 37\)"):
        selective_scan(**inputs)


def test_unresolved_backend_name_is_rejected():
    inputs = {name: t.detach() for name, t in make_inputs().items()}
    with pytest.raises(ValueError, match="resolve_scan_backend"):
        selective_scan(**inputs, backend="auto")


@pytest.fixture
def fresh_announcements(monkeypatch):
    monkeypatch.setattr(dist, "_announced", set())


def test_auto_on_cpu_picks_torch_and_says_why_once(fresh_announcements, capsys):
    assert resolve_scan_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_scan_backend("auto", "cpu") == "torch"
    printed = capsys.readouterr().out.splitlines()
    assert printed == ["scan backend: torch (device is cpu, mamba_ssm kernels need CUDA)"]


def test_forcing_torch_is_honoured(fresh_announcements, capsys):
    assert resolve_scan_backend("torch", torch.device("cpu")) == "torch"
    assert capsys.readouterr().out == "scan backend: torch (requested)\n"


def test_forcing_mamba_ssm_on_cpu_raises_naming_the_config_key():
    with pytest.raises(ConfigError, match=r"key 'model.scan_backend': 'mamba_ssm' cannot run: device is cpu"):
        resolve_scan_backend("mamba_ssm", torch.device("cpu"))


def test_unknown_backend_name_raises_naming_the_config_key():
    with pytest.raises(ValueError, match=r"model.scan_backend='triton' is not one of"):
        resolve_scan_backend("triton", torch.device("cpu"))


@pytest.fixture
def selective_scan_ref(monkeypatch):
    """mamba_ssm's pure-PyTorch reference. Without CUDA, its package import needs a stand-in for the
    compiled `selective_scan_cuda`; the package imported over the stand-in is forgotten afterwards."""
    stand_in = not torch.cuda.is_available()
    if stand_in:
        monkeypatch.setitem(sys.modules, "selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_ref as reference
    except Exception as error:
        pytest.skip(f"mamba_ssm's selective_scan_ref not importable: {type(error).__name__}: {error}")
    yield reference
    if stand_in:
        for name in [name for name in sys.modules if name.split(".")[0] == "mamba_ssm"]:
            del sys.modules[name]


@pytest.mark.parametrize("with_D,with_z,with_delta_bias,delta_softplus", OPTIONAL_INPUTS[:2])
def test_torch_scan_matches_mamba_ssm_selective_scan_ref(selective_scan_ref, with_D, with_z, with_delta_bias,
                                                         delta_softplus):
    # selective_scan_ref computes in fp32 whatever the input dtype (and fails on float64 A).
    inputs = make_inputs(dtype=torch.float32, with_D=with_D, with_z=with_z, with_delta_bias=with_delta_bias)
    assert_matches(outputs_and_grads(selective_scan, inputs, delta_softplus),
                   outputs_and_grads(selective_scan_ref, inputs, delta_softplus), atol=1e-5, rtol=1e-5)


def _cuda_kernel_reason():
    if not torch.cuda.is_available():
        return "needs CUDA"
    return scan.mamba_ssm_unavailable_reason(torch.device("cuda"))


needs_mamba_ssm_cuda = pytest.mark.skipif(_cuda_kernel_reason() is not None, reason=str(_cuda_kernel_reason()))


@pytest.mark.gpu
@needs_mamba_ssm_cuda
@pytest.mark.parametrize("with_D,with_z,with_delta_bias,delta_softplus", OPTIONAL_INPUTS)
def test_torch_scan_matches_mamba_ssm_cuda_kernel(with_D, with_z, with_delta_bias, delta_softplus):
    inputs = make_inputs(batch=2, d_inner=64, d_state=16, length=300, dtype=torch.float32, device="cuda",
                         with_D=with_D, with_z=with_z, with_delta_bias=with_delta_bias)

    def kernel(**kwargs):
        return selective_scan(**kwargs, backend="mamba_ssm")

    assert_matches(outputs_and_grads(selective_scan, inputs, delta_softplus),
                   outputs_and_grads(kernel, inputs, delta_softplus), atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
@needs_mamba_ssm_cuda
def test_auto_on_cuda_picks_mamba_ssm(fresh_announcements, capsys):
    assert resolve_scan_backend("auto", torch.device("cuda")) == "mamba_ssm"
    assert capsys.readouterr().out == "scan backend: mamba_ssm (CUDA device, mamba_ssm importable)\n"
