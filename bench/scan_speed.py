"""Speed of the selective scan backends, forward and forward+backward (a script, not a test).

Compares our log-depth PyTorch scan with a Python loop over time (the test oracle's algorithm) and,
on CUDA with mamba_ssm importable, with mamba_ssm's kernel. CPU runs a CPU-sized shape; CUDA runs
M2Restore's bottleneck (batch 4, d_inner 768, d_state 16, L = 28 * 28).

    python bench/scan_speed.py [--device cpu|cuda|all] [--repeats 5] [--json PATH]
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # this checkout's m2r, whatever is installed

from m2r.models.scan import resolve_scan_backend, selective_scan  # noqa: E402

SHAPES = {"cpu": (1, 64, 16, 784), "cuda": (4, 768, 16, 784)}  # (batch, d_inner, d_state, L)


def loop_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    state = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    outputs = []
    for t in range(u.shape[-1]):
        decay = torch.exp(delta[:, :, t, None] * A)
        state = decay * state + (delta[:, :, t] * u[:, :, t])[:, :, None] * B[:, None, :, t]
        outputs.append((state * C[:, None, :, t]).sum(-1))
    return (torch.stack(outputs, dim=-1) + D[:, None] * u) * F.silu(z)


def make_inputs(shape, device):
    """Inputs as the Mamba block feeds them: softplus time steps around 0.01-0.1, S4D-real A."""
    batch, d_inner, d_state, length = shape
    torch.manual_seed(0)
    inputs = dict(u=torch.randn(batch, d_inner, length), delta=torch.randn(batch, d_inner, length) * 0.1,
                  A=-torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1),
                  B=torch.randn(batch, d_state, length), C=torch.randn(batch, d_state, length),
                  D=torch.ones(d_inner), z=torch.randn(batch, d_inner, length), delta_bias=torch.full((d_inner,), -3.0))
    return {name: t.to(device).requires_grad_(True) for name, t in inputs.items()}


def median_seconds(fn, device, repeats):
    fn()  # warm-up: kernel selection, allocator
    timings = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        fn()
        _synchronize(device)
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(method, scan_fn, shape, device, repeats):
    inputs = make_inputs(shape, device)

    def forward():
        with torch.no_grad():
            scan_fn(**inputs, delta_softplus=True)

    def forward_backward():
        scan_fn(**inputs, delta_softplus=True).sum().backward()

    row = dict(device=device.type, shape=list(shape), method=method,
               forward_ms=1e3 * median_seconds(forward, device, repeats),
               forward_backward_ms=1e3 * median_seconds(forward_backward, device, repeats), peak_mib=None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        forward_backward()
        row["peak_mib"] = (torch.cuda.max_memory_allocated(device) - baseline) / 2**20
    return row


def methods_for(device):
    methods = {"python loop": loop_selective_scan,
               "torch parallel": lambda **kw: selective_scan(**kw, backend="torch")}
    if resolve_scan_backend("auto", device) == "mamba_ssm":
        methods["mamba_ssm kernel"] = lambda **kw: selective_scan(**kw, backend="mamba_ssm")
    return methods


def markdown_table(rows):
    loop_ms = {row["device"]: row["forward_backward_ms"] for row in rows if row["method"] == "python loop"}
    lines = ["| device | shape (B, D, N, L) | method | forward ms | fwd+bwd ms | fwd+bwd peak MiB | fwd+bwd vs loop |",
             "|---|---|---|---:|---:|---:|---:|"]
    for row in rows:
        peak = "-" if row["peak_mib"] is None else f"{row['peak_mib']:.0f}"
        speedup = loop_ms[row["device"]] / row["forward_backward_ms"]
        lines.append(f"| {row['device']} | {tuple(row['shape'])} | {row['method']} | {row['forward_ms']:.2f} "
                     f"| {row['forward_backward_ms']:.2f} | {peak} | {speedup:.1f}x |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                        help="'all' runs the CPU shape, and the CUDA shape when CUDA is available")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args()
    device_names = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in device_names and not torch.cuda.is_available():
        if args.device == "cuda":
            parser.error("--device cuda: CUDA is not available")
        device_names.remove("cuda")
    rows = []
    for name in device_names:
        device = torch.device(name)
        for method, scan_fn in methods_for(device).items():
            rows.append(measure(method, scan_fn, SHAPES[name], device, args.repeats))
    print(markdown_table(rows))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(dict(torch=torch.__version__, threads=torch.get_num_threads(), rows=rows), file, indent=2)


if __name__ == "__main__":
    main()
