"""Forward and forward+backward time of a model config on this machine's CPU (or a GPU).

    python bench/model_speed.py                                   # tiny model, batch 4, 64x64, CPU
    python bench/model_speed.py --config configs/model/tiny.yaml --batch 4 --size 64 --repeats 10 --threads 1

Reports the median over `--repeats` timed iterations after two warm-up iterations, in training mode
(noisy gating on), with the balance loss in the backward pass as in training.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # this checkout's m2r, whatever is installed

from m2r.config import load_config  # noqa: E402
from m2r.models.config import ModelConfig  # noqa: E402
from m2r.models.m2restore import build_model  # noqa: E402


def median_ms(fn, repeats: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/model/tiny.yaml")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("overrides", nargs="*", help="model config key=value overrides")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model = build_model(load_config(ModelConfig, args.config, args.overrides)).train()
    lq = torch.rand(args.batch, 3, args.size, args.size)
    params = sum(p.numel() for p in model.parameters())

    def forward():
        with torch.no_grad():
            model(lq)

    def forward_backward():
        out = model(lq)
        (out.restored.abs().mean() + out.balance_loss).backward()
        model.zero_grad(set_to_none=True)

    fwd, fwd_bwd = median_ms(forward, args.repeats), median_ms(forward_backward, args.repeats)
    print("| machine | config | params | batch x size | threads | forward ms | forward+backward ms | img/s (train) |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {platform.machine()} CPU, torch {torch.__version__} | {args.config} | {params:,} | "
          f"{args.batch} x {args.size}^2 | {args.threads} | {fwd:.1f} | {fwd_bwd:.1f} | "
          f"{1e3 * args.batch / fwd_bwd:.1f} |")


if __name__ == "__main__":
    main()
