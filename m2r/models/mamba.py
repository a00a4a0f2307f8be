"""Mamba-1 block with mamba_ssm 1.x `Mamba` parameter names, shapes and initialisation.

M2Restore's bottleneck uses `mamba_ssm.Mamba(d_model=384, d_state=16, d_conv=4, expand=2)` on one
forward raster scan. This module reproduces it so that checkpoints load either way, and runs the scan
on our PyTorch backend or on mamba_ssm's CUDA kernels (see `m2r.models.scan`). Modules are created in
mamba_ssm's order, so one seed gives the same initial weights as mamba_ssm itself.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from m2r.models.scan import check_scan_backend_name, mamba_ssm_ops, resolve_scan_backend, selective_scan

# mamba_ssm defaults for the time-step projection init: softplus(dt_proj.bias) is log-uniform in
# [DT_MIN, DT_MAX] (floored at DT_INIT_FLOOR), dt_proj.weight is uniform within +-dt_rank**-0.5.
DT_MIN = 1e-3
DT_MAX = 0.1
DT_INIT_FLOOR = 1e-4


class Mamba(nn.Module):
    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 scan_backend: str = "auto"):
        super().__init__()
        check_scan_backend_name(scan_backend)
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16)
        self.scan_backend = scan_backend
        self._resolved_for: tuple = ()      # (scan_backend, device type) that `_scan_path` was resolved for
        self._scan_path = ""

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=True)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self._init_dt_proj()
        # S4D-real init: A = -(1, 2, ..., d_state) for every channel, stored as log(-A).
        states = torch.arange(1, d_state + 1, dtype=torch.float32)
        self.A_log = nn.Parameter(torch.log(states).repeat(self.d_inner, 1))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        # mamba_ssm's marker for optimisers that exempt these from weight decay.
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def _init_dt_proj(self) -> None:
        bound = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        log_dt = torch.rand(self.d_inner) * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN)
        dt = torch.exp(log_dt).clamp(min=DT_INIT_FLOOR)
        inverse_softplus_dt = dt + torch.log(-torch.expm1(-dt))
        with torch.no_grad():
            self.dt_proj.bias.copy_(inverse_softplus_dt)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(batch, L, d_model) -> (batch, L, d_model): one causal scan from t = 0 to L - 1."""
        path = self.scan_path(hidden_states.device)
        batch, length, _ = hidden_states.shape
        # Channels-first with time contiguous, the layout the conv and the scan kernels want.
        xz = (self.in_proj.weight @ hidden_states.reshape(batch * length, -1).t())
        xz = xz.view(2 * self.d_inner, batch, length).transpose(0, 1)
        decay_rates = -torch.exp(self.A_log.float())
        if path == "fused":
            return self._fused_forward(xz, decay_rates)
        return self._reference_forward(xz, decay_rates, path)

    def scan_path(self, device: torch.device) -> str:
        """"fused" (mamba_ssm's whole-layer kernel, with causal_conv1d), "mamba_ssm" (its scan kernel)
        or "torch", for `scan_backend` on `device`; resolved again only when either changes. Resolving
        imports mamba_ssm, which torch.compile cannot trace: M2Restore does it before a compiled forward."""
        if self._resolved_for != (self.scan_backend, device.type):
            backend = resolve_scan_backend(self.scan_backend, device)
            self._scan_path = "fused" if backend == "mamba_ssm" and _has_fused_kernels() else backend
            self._resolved_for = (self.scan_backend, device.type)
        return self._scan_path

    def _reference_forward(self, xz, decay_rates, backend: str) -> torch.Tensor:
        length = xz.shape[-1]
        x, z = xz.chunk(2, dim=1)
        x = F.silu(self.conv1d(x)[..., :length])  # crop the right padding: causal conv
        x_dbl = self.x_proj(x.transpose(1, 2))
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        # dt_proj's bias is added inside the scan (delta_bias), before the softplus.
        delta = self.dt_proj.weight @ dt.transpose(1, 2)     # (batch, d_inner, L), time contiguous
        y = selective_scan(x, delta, decay_rates, B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(),
                           self.D.float(), z=z, delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
                           backend=backend)
        return self.out_proj(y.transpose(1, 2))

    # The CUDA extensions are opaque to torch.compile: an eager island between compiled graphs.
    @torch.compiler.disable
    def _fused_forward(self, xz, decay_rates) -> torch.Tensor:
        """mamba_ssm's fused conv + projections + scan kernel (its default path with causal_conv1d)."""
        return mamba_ssm_ops().mamba_inner_fn(
            xz, self.conv1d.weight, self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight,
            self.out_proj.weight, self.out_proj.bias, decay_rates, None, None, self.D.float(),
            delta_bias=self.dt_proj.bias.float(), delta_softplus=True)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_state={self.d_state}, d_conv={self.d_conv}, "
                f"d_inner={self.d_inner}, dt_rank={self.dt_rank}, scan_backend={self.scan_backend!r}")


def _has_fused_kernels() -> bool:
    return getattr(mamba_ssm_ops(), "causal_conv1d_fn", None) is not None
