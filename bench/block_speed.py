"""One full-resolution Restormer block, forward + backward: where the training step's time goes at 224.

    python bench/block_speed.py --json runs/bench/block_speed.json    # GPU (~1 min on an H100)
    python bench/block_speed.py --smoke                              # CPU: small block, eager only

The decoder level 1 and refinement stages (8 blocks of 96 channels at full resolution) are the
largest part of the network's time. This measures one such block (batch 4, 224x224) in the recipes
of `bench/train_speed.py`, the bf16 ones also with `model.depthwise=shifted`: its two 3x3 depthwise
convolutions written as nine shifted multiply-adds (accumulated in fp32), which torch.compile fuses
with the neighbouring element-wise work instead of calling cuDNN's depthwise kernels (a third of the
official step's time is convolution backward, mostly depthwise). The largest difference between the
two forms (fp32, outputs and input gradients) is reported first.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from m2r.atomic import write_json_atomically  # noqa: E402
from m2r.models.restormer import TransformerBlock, set_depthwise_mode  # noqa: E402

GPU_SHAPE, SMOKE_SHAPE = (4, 96, 224, 224), (2, 16, 32, 32)   # batch, channels, height, width


def make_block(channels: int, device, shifted: bool) -> TransformerBlock:
    torch.manual_seed(0)
    block = TransformerBlock(channels, num_heads=1, ffn_expansion_factor=2.66, bias=False).to(device)
    set_depthwise_mode(block, "shifted" if shifted else "conv")
    return block


def check_shifted_matches_conv(device) -> float:
    """Largest difference between the two formulations' outputs and input gradients (fp32, small block)."""
    x = torch.randn(2, 16, 20, 24, device=device, requires_grad=True)
    results = []
    # cuDNN's fp32 convolutions use TF32 by default (a 1e-3 difference); the shifted form is true fp32.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        for shifted in (False, True):
            block = make_block(16, device, shifted)
            out = block(x)
            (grad,) = torch.autograd.grad(out.square().sum(), x)
            results.append((out, grad))
    return max((a - b).abs().max().item() for a, b in zip(results[0], results[1]))


def time_block(shape, device, bf16: bool, channels_last: bool, compiled: bool, shifted: bool, steps: int):
    batch, channels, height, width = shape
    block = make_block(channels, device, shifted)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    block.to(memory_format=memory_format)
    run = torch.compile(block, dynamic=False) if compiled else block
    x = torch.randn(shape, device=device).contiguous(memory_format=memory_format).requires_grad_(True)

    def once():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = run(x)
        out.float().square().mean().backward()

    for _ in range(3):
        once()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        once()
    if device.type == "cuda":
        torch.cuda.synchronize()
    ms = 1e3 * (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None   # JSON null on a CPU
    return {"ms": ms, "peak_gb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="small block on CPU, eager only")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    shape = SMOKE_SHAPE if args.smoke else GPU_SHAPE
    recipes = {  # name: (bf16, channels_last, compiled, shifted)
        "fp32 eager": (False, False, False, False),
        "bf16 channels_last eager": (True, True, False, False),
        "bf16 channels_last eager, shifted depthwise": (True, True, False, True),
    }
    if device.type == "cuda":
        recipes.update({"bf16 channels_last compiled": (True, True, True, False),
                        "bf16 channels_last compiled, shifted depthwise": (True, True, True, True)})
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "shape": list(shape),
               "shifted_vs_conv_max_diff": check_shifted_matches_conv(device)}
    print(f"block_speed on {results['device']}, block {shape}; shifted vs conv max diff "
          f"{results['shifted_vs_conv_max_diff']:.2e}", flush=True)
    for name, (bf16, channels_last, compiled, shifted) in recipes.items():
        try:
            results[name] = time_block(shape, device, bf16, channels_last, compiled, shifted,
                                       2 if args.smoke else args.steps)
        except Exception as exc:  # one failing recipe must not hide the others
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
        print(f"  {name}: {results[name]}", flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomically(args.json, results)


if __name__ == "__main__":
    main()
