"""Selective scan of Mamba-1 (the S6 recurrence) with two interchangeable backends.

For every channel d and state n, over time t:
    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t,     y_t = <C_t, h_t> + D * u_t
and, when z is given, the output is y * silu(z). Shapes and semantics follow mamba_ssm's
`selective_scan_fn` with input-dependent B and C: u, delta, z (batch, d_inner, L); A (d_inner, d_state);
B, C (batch, d_state, L); D, delta_bias (d_inner,).

Backends:
- "torch": ours, pure PyTorch. The linear recurrence runs as a log-depth, work-efficient associative
  scan; its backward is the same scan run backwards in time (the adjoint recurrence), so autograd
  keeps only the decays and the states, never the intermediate levels of the scan.
- "mamba_ssm": the CUDA kernel of mamba_ssm, imported lazily (importing mamba_ssm fails without CUDA).
"""
import functools
import importlib
from typing import Optional

import torch
import torch.nn.functional as F

from m2r.config import config_error
from m2r.dist import announce_once
from m2r.models.config import SCAN_BACKENDS


def check_scan_backend_name(name: str) -> None:
    if name not in SCAN_BACKENDS:
        raise ValueError(f"model.scan_backend={name!r} is not one of {list(SCAN_BACKENDS)}")


def resolve_scan_backend(requested: str, device: torch.device) -> str:
    """Turn model.scan_backend into the backend to run on `device`; prints each decision once."""
    check_scan_backend_name(requested)
    device = torch.device(device)
    if requested == "torch":
        backend, reason = "torch", "requested"
    else:
        unavailable = mamba_ssm_unavailable_reason(device)
        if requested == "mamba_ssm" and unavailable:
            raise config_error("model.scan_backend", f"'mamba_ssm' cannot run: {unavailable}. "
                               "Use 'auto' (falls back to 'torch') or 'torch'.")
        if unavailable:
            backend, reason = "torch", unavailable
        else:
            backend = "mamba_ssm"
            reason = "requested" if requested == "mamba_ssm" else "CUDA device, mamba_ssm importable"
    announce_once(f"scan backend: {backend} ({reason})")
    return backend


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   backend: str = "torch") -> torch.Tensor:
    """Mamba-1 selective scan; returns (batch, d_inner, L) in u's dtype. See the module docstring."""
    if backend == "torch":
        return _torch_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if backend == "mamba_ssm":
        return _mamba_ssm_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    raise ValueError(f"selective_scan backend must be 'torch' or 'mamba_ssm', got {backend!r} "
                     "(resolve model.scan_backend with resolve_scan_backend first)")


@torch.compiler.disable  # a CUDA extension, opaque to torch.compile: keep it an eager island
def _mamba_ssm_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    return mamba_ssm_ops().selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def mamba_ssm_ops():
    """mamba_ssm.ops.selective_scan_interface, or a clear error when it cannot be imported."""
    module, error = _import_mamba_ssm_ops()
    if module is None:
        raise RuntimeError(f"model.scan_backend='mamba_ssm' cannot run: mamba_ssm not importable "
                           f"({type(error).__name__}: {error})")
    return module


@functools.lru_cache(maxsize=None)
def _import_mamba_ssm_ops():
    try:
        return importlib.import_module("mamba_ssm.ops.selective_scan_interface"), None
    except Exception as error:  # ImportError, or a CUDA extension built for another torch
        return None, error


def mamba_ssm_unavailable_reason(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return f"device is {device.type}, mamba_ssm kernels need CUDA"
    _, error = _import_mamba_ssm_ops()
    if error is not None:
        return f"mamba_ssm not importable: {type(error).__name__}: {error}"
    return None


def _torch_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    out_dtype = u.dtype
    dtype = torch.promote_types(u.dtype, torch.float32)  # at least fp32, like the CUDA kernel
    u, delta, A, B, C = (t.to(dtype) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    # State layout (batch, d_inner, d_state, L): time last, so the scan shifts along contiguous memory.
    decay = torch.exp(delta[:, :, None, :] * A[None, :, :, None])
    drive = (delta * u)[:, :, None, :] * B[:, None, :, :]
    states = LinearRecurrence.apply(decay, drive)
    y = torch.einsum("bdnl,bnl->bdl", states, C)
    if D is not None:
        y = y + u * D.to(dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y.to(out_dtype)


def _check_shapes(u, delta, A, B, C, D, z, delta_bias) -> None:
    if u.dim() != 3 or A.dim() != 2:
        raise ValueError(f"selective_scan: u must be (batch, d_inner, L) and A (d_inner, d_state), "
                         f"got u {tuple(u.shape)}, A {tuple(A.shape)}")
    batch, d_inner, length = u.shape
    d_state = A.shape[1]
    expected = {"delta": (delta, (batch, d_inner, length)), "A": (A, (d_inner, d_state)),
                "B": (B, (batch, d_state, length)), "C": (C, (batch, d_state, length)),
                "D": (D, (d_inner,)), "z": (z, (batch, d_inner, length)),
                "delta_bias": (delta_bias, (d_inner,))}
    for name, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"selective_scan: {name} has shape {tuple(tensor.shape)}, expected {shape} "
                             f"from u {tuple(u.shape)} and A {tuple(A.shape)}")


class LinearRecurrence(torch.autograd.Function):
    """h_t = a_t * h_{t-1} + b_t along the last dim, with h_{-1} = 0.

    Backward is the adjoint recurrence g_t = dh_t + a_{t+1} * g_{t+1}, a scan run backwards in time;
    then db_t = g_t and da_t = g_t * h_{t-1}. Only a and h are saved.
    """

    @staticmethod
    def forward(ctx, a, b):
        states = parallel_linear_scan(a, b)
        ctx.save_for_backward(a, states)
        return states

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_states):
        a, states = ctx.saved_tensors
        next_decay = F.pad(a[..., 1:], (0, 1))  # a_{t+1}; nothing follows the last step
        grad_b = parallel_linear_scan(next_decay, grad_states, reverse=True)
        previous_states = F.pad(states[..., :-1], (1, 0))  # h_{t-1}, zero before the start
        return grad_b * previous_states, grad_b


def parallel_linear_scan(a, b, reverse: bool = False) -> torch.Tensor:
    """Inclusive scan of h_t = a_t * h_{t-1} + b_t over the last dim (h_{-1} = 0), in log2(L) levels.

    Work-efficient odd-even recursion on the associative combine of an earlier step (a1, b1) with a
    later one (a2, b2): (a1 * a2, a2 * b1 + b2). Each pair of neighbouring steps is merged into one,
    the half-length problem is solved recursively, and the other member of each pair follows in one
    step. No division by cumulative products: long products of decays underflow to 0, the right limit.
    `reverse` runs the recurrence from the end backwards: h_t = a_t * h_{t+1} + b_t.
    """
    length = a.shape[-1]
    if length == 1:
        return b
    if length % 2:  # append a step with b = 0: it changes nothing before it, nor after it in reverse
        a, b = F.pad(a, (0, 1)), F.pad(b, (0, 1))
    a_even, a_odd, b_even, b_odd = a[..., 0::2], a[..., 1::2], b[..., 0::2], b[..., 1::2]
    if reverse:
        h_even = parallel_linear_scan(a_even * a_odd, a_even * b_odd + b_even, reverse=True)
        h_odd = a_odd * F.pad(h_even[..., 1:], (0, 1)) + b_odd
    else:
        h_odd = parallel_linear_scan(a_odd * a_even, a_odd * b_even + b_odd)
        h_even = a_even * F.pad(h_odd[..., :-1], (1, 0)) + b_even
    return torch.stack([h_even, h_odd], dim=-1).flatten(-2)[..., :length]
