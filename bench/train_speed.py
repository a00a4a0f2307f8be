"""Training speed of M2Restore on one GPU: throughput, memory, MFU, evaluation latency.

    python bench/train_speed.py --json runs/bench/train_speed.json       # GPU: the full table (~6 min on an H100)
    python bench/train_speed.py --smoke                                  # CPU: tiny model, under a minute

Each variant trains with random weights on random images, batch 4 at 224x224 (the paper recipe), one
optimizer step per batch, L1 + weighted balance loss, and reports ms/step, img/s, peak allocated
memory and MFU. FLOPs are counted once per config with `torch.utils.flop_counter.FlopCounterMode` over
the forward pass (convolutions and matrix products, which is where the work is; the elementwise ops it
leaves out make the MFU a slight underestimate), as 3x the trainable network's forward plus the frozen
CLIP's forward. It is the model's work, the same for every variant of a config: the MoE adapters counted
as the official sparse dispatch (each token through its top_k experts; the dense dispatch computes
E / top_k times that and masks it), depthwise convolutions as convolutions, the recomputation of
activation checkpointing left out. MFU is that count times steps/s over the GPU's dense bf16 peak
(`mfu_pct`, comparable across rows); `mfu_pct_precision_peak` divides by the peak of the row's own
arithmetic instead (TF32 tensor cores for fp32 rows: cuDNN's fp32 convolutions use TF32 by default). Not
counted (each under 1% at 224): the selective scan, elementwise work, LayerNorms. The official recipe's
figures (8.54 img/s, 42.1 GB, H100, fp32 eager) were measured by running the official code; ratios
below are against them.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from m2r.atomic import atomic_path, write_json_atomically  # noqa: E402
from m2r.config import load_config  # noqa: E402
from m2r.models.config import ModelConfig  # noqa: E402
from m2r.models.m2restore import build_model  # noqa: E402
from m2r.models.mamba import Mamba  # noqa: E402
from m2r.models.scan import selective_scan  # noqa: E402

OFFICIAL_IMG_PER_S = 8.54
# H100 SXM5 dense (no 2:4 sparsity) bf16 tensor-core peak, TFLOP/s. TF32 tensor cores run at half that
# rate on the H100 (and A100, H200), so a --peak-tflops for another GPU gives both.
H100_BF16_DENSE_TFLOPS = 989.4
TF32_SHARE_OF_BF16_PEAK = 0.5
MAX_CROP = 1024
CROP_MEMORY_BUDGET = 0.9    # of the GPU's memory: cuDNN's workspaces come on top of the fitted peaks
# The crop question is asked of an 80 GB GPU (an H100 80GB HBM3 reports 81559 MiB). On a larger one (an
# H200 has 141 GB) the allocator is capped at that much, so that the answer is the 80 GB one there too.
CROP_DEVICE_MEMORY = 81559 * 2**20


@dataclass
class Variant:
    key: str                    # what --variants names it by
    name: str
    config: str                 # model yaml under configs/model
    bf16: bool = False          # bf16 autocast (the FFT stays fp32; Mamba too unless mamba.autocast)
    tf32_matmul: bool = False   # fp32 matmuls on tensor cores; fp32 convolutions use TF32 by torch's default
    channels_last: bool = False
    fused_adamw: bool = False
    cudnn_benchmark: bool = False  # cuDNN times its algorithms per shape (as training runs do by default)
    compile: str = ""           # torch.compile backend for the training forward ("" = eager)
    checkpointing: str = "none"
    overrides: tuple = ()       # model config overrides


# Every bf16 variant also lets cuDNN time its algorithms (train.cudnn_benchmark, on by default in runs).
FAST = dict(bf16=True, channels_last=True, fused_adamw=True, cudnn_benchmark=True)
# Caching the frozen prompts' text features changes no output: a speed setting, the network stays faithful.
FAST_FAITHFUL = ("mamba.autocast=true", "clip.cache_text_features=true")
# Without gate noise (one randn per adapter): inductor draws random numbers its own way, so loss
# trajectories compare noiseless runs. The compiled faithful variants are timed noiseless too, so that
# the trajectory and the profile find their compiled graphs in inductor's cache instead of compiling.
DETERMINISTIC = ("moe.noisy_gating=false",)
# `--variants` picks by key, in the order given (bench/gpu_checks.sh runs the most wanted first).
GPU_VARIANTS = [
    Variant("fp32-eager", "faithful fp32 eager (official recipe)", "m2restore"),
    Variant("bf16-eager", "faithful bf16 + channels_last + fused AdamW + cuDNN benchmark", "m2restore", **FAST),
    Variant("bf16-compiled", "faithful bf16 + compile + bf16 Mamba + cached text, no gate noise", "m2restore",
            **FAST, compile="inductor", overrides=FAST_FAITHFUL + DETERMINISTIC),
    Variant("bf16-compiled-shifted",
            "faithful bf16 + compile + bf16 Mamba + cached text + shifted depthwise, no gate noise", "m2restore",
            **FAST, compile="inductor", overrides=FAST_FAITHFUL + ("depthwise=shifted",) + DETERMINISTIC),
    Variant("bf16-compiled-ac-full-res",
            "faithful bf16 + compile + bf16 Mamba + cached text + AC(full_res), no gate noise", "m2restore", **FAST,
            compile="inductor", checkpointing="full_res", overrides=FAST_FAITHFUL + DETERMINISTIC),
    Variant("plus-bf16-ac-full-res", "plus bf16 + channels_last + fused AdamW + AC(full_res), eager",
            "m2restore-plus", **FAST, checkpointing="full_res"),
]
# Largest-crop search: eager, so that each new crop size does not trigger a recompilation.
CROP_VARIANT = Variant("plus-bf16-ac-all", "plus bf16 + AC(all), eager", "m2restore-plus", **FAST,
                       checkpointing="all")
SMOKE_VARIANTS = [Variant("tiny-fp32", "tiny fp32", "tiny"),
                  Variant("tiny-compiled",
                          "tiny fp32 + channels_last + AC(full_res) + compile(aot_eager) + shifted depthwise", "tiny",
                          channels_last=True, compile="aot_eager", checkpointing="full_res",
                          overrides=("depthwise=shifted",))]


def variant_named(key: str, variants) -> Variant:
    by_key = {variant.key: variant for variant in variants}
    if key not in by_key:
        raise SystemExit(f"--variants: no variant {key!r}; known: {', '.join(by_key)}")
    return by_key[key]


def deterministic(variant: Variant) -> Variant:
    return replace(variant, name=f"{variant.name}, no gate noise", overrides=variant.overrides + DETERMINISTIC)


# Loss trajectories: the official recipe against the compiled faithful variant, same data and init.
TRAJECTORY = (deterministic(variant_named("fp32-eager", GPU_VARIANTS)), variant_named("bf16-compiled", GPU_VARIANTS))
SMOKE_TRAJECTORY = tuple(map(deterministic, SMOKE_VARIANTS))
TRAJECTORY_STEPS, SMOKE_TRAJECTORY_STEPS = 30, 4
EVAL_SIZE, SMOKE_EVAL_SIZE = (480, 720), (64, 96)
SCAN_SHAPE, SMOKE_SCAN_SHAPE = (4, 768, 16, 784), (1, 32, 4, 64)  # batch, d_inner, d_state, L


def model_config(name: str, clip_weights: str | None, overrides=()) -> ModelConfig:
    extra = [f"clip.weights={clip_weights}"] if clip_weights else []
    return load_config(ModelConfig, REPO / "configs" / "model" / f"{name}.yaml", [*extra, *overrides])


def autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_pair(batch: int, crop: int, seed: int = 0):
    """A degraded/clean pair with image-like structure (smooth clean image, noisy and darkened input),
    so that the loss falls over a few steps instead of sitting at the noise floor of random targets."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, max(crop // 16, 2), max(crop // 16, 2), generator=generator)
    gt = F.interpolate(coarse, size=(crop, crop), mode="bilinear", align_corners=False)
    lq = (0.7 * gt + 0.1 * torch.randn(gt.shape, generator=generator)).clamp(0, 1)
    return lq, gt


class VariantRunner:
    """One variant: model, optimizer and a timed training step on fixed data."""

    def __init__(self, variant: Variant, cfg: ModelConfig, device: torch.device, batch: int, crop: int,
                 cudnn_benchmark: bool | None = None):
        torch.backends.cuda.matmul.allow_tf32 = variant.tf32_matmul
        torch.backends.cudnn.benchmark = variant.cudnn_benchmark if cudnn_benchmark is None else cudnn_benchmark
        self.variant, self.device = variant, device
        self.model = build_model(cfg).to(device).train()
        self.model.set_activation_checkpointing(variant.checkpointing)
        if variant.channels_last:
            self.model.use_channels_last()   # as the engine does: weights stay contiguous for DeepSpeed
        if variant.compile:
            self.model.compile_training_forward(backend=variant.compile)
        fused = {"fused": True} if variant.fused_adamw else {}
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=2e-4, **fused)
        self.balance_weight = cfg.moe.balance_loss_weight
        self.lq, self.gt = (t.to(device) for t in random_pair(batch, crop))

    def step(self) -> torch.Tensor:
        """One optimizer step; returns the loss on the device (reading it would sync every step)."""
        with autocast(self.device, self.variant.bf16):
            out = self.model(self.lq)
        loss = F.l1_loss(out.restored.float(), self.gt) + self.balance_weight * out.balance_loss.float()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def time_steps(self, warmup: int, steps: int) -> float:
        for _ in range(warmup):
            self.step()
        sync(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync(self.device)
        return (time.perf_counter() - start) / steps


@contextlib.contextmanager
def flop_counter():
    """FlopCounterMode that sees every attention the same way on CPU and GPU: nn.MultiheadAttention's
    inference fast path (one fused op, invisible to the counter; CLIP's vision towers take it on the CPU,
    not under the faithful config's CUDA autocast) is switched off, and the CPU flash attention is counted."""
    from torch.utils import flop_counter as fc

    def cpu_flash_attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

    aten = torch.ops.aten
    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: cpu_flash_attention} if hasattr(
        aten, "_scaled_dot_product_flash_attention_for_cpu") else {}
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with fc.FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            yield counter
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def model_flops_overrides(overrides) -> tuple:
    """The overrides under which a variant's work is counted: the model's FLOPs, not the implementation's.
    Depthwise as convolutions (the counter sees no FLOPs in the shifted form) and the MoE as the official
    sparse dispatch (dense computes E / top_k times the expert FLOPs and masks the surplus away)."""
    kept = tuple(o for o in overrides if not o.startswith(("depthwise=", "moe.dispatch=")))
    return kept + ("depthwise=conv", "moe.dispatch=sparse")


def count_train_flops(cfg: ModelConfig, device: torch.device, batch: int, crop: int) -> float:
    """FLOPs of one training step: 3x the trainable network's forward (backward ~ 2x forward) plus
    the frozen CLIP prior's forward. Only forwards are counted: FlopCounterMode's rule for
    convolution_backward ignores `groups` and overcounts the depthwise convolutions about 20x.
    Build `cfg` with `model_flops_overrides` to count the model's work (as `variant_flops` does)."""
    model = build_model(cfg).to(device)
    lq = torch.rand(batch, 3, crop, crop, device=device)
    with torch.no_grad(), flop_counter() as whole:
        model(lq)
    with torch.no_grad(), flop_counter() as clip:
        model.clip_prior(2 * lq - 1 if cfg.input_range == "minus_one_one" else lq)
    network = whole.get_total_flops() - clip.get_total_flops()
    return float(3 * network + clip.get_total_flops())


@functools.lru_cache(maxsize=None)
def variant_flops(config: str, overrides: tuple, clip_weights, device: torch.device, batch: int, crop: int) -> float:
    """The model FLOPs of one training step of `config` with `overrides` (see `model_flops_overrides`)."""
    return count_train_flops(model_config(config, clip_weights, model_flops_overrides(overrides)), device, batch,
                             crop)


def precision_peak(variant: Variant, bf16_peak_tflops: float) -> tuple:
    """(peak TFLOP/s, name) of the arithmetic a variant's convolutions and matrix products run in."""
    if variant.bf16:
        return bf16_peak_tflops, "bf16 dense"
    # fp32: cuDNN's convolutions (most of the FLOPs) use TF32 by torch's default; matmuls only with tf32_matmul
    return (TF32_SHARE_OF_BF16_PEAK * bf16_peak_tflops,
            "TF32 dense" + ("" if variant.tf32_matmul else " (matmuls fp32)"))


def mfu_fields(variant: Variant, tflops: float, peak_tflops: float) -> dict:
    own_peak, basis = precision_peak(variant, peak_tflops)
    return {"mfu_pct": 100 * tflops / peak_tflops, "mfu_peak_tflops": peak_tflops, "mfu_peak_basis": "bf16 dense",
            "mfu_pct_precision_peak": 100 * tflops / own_peak, "precision_peak_tflops": own_peak,
            "precision_peak_basis": basis}


def peak_gb(device: torch.device) -> float | None:
    """Peak allocated GPU memory since `reset_peak`; None (JSON null, not the invalid NaN) on a CPU."""
    return torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None


def gb_text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def reset_peak(device: torch.device) -> None:
    # A compiled model refers to itself (its compiled forward is a bound method): only the cycle
    # collector frees the previous variant's weights, which would otherwise count in this peak.
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_variant(variant: Variant, args, device, clip_weights) -> dict:
    cfg = model_config(variant.config, clip_weights, variant.overrides)
    # The model's work in this variant (`model_flops_overrides`). Cached text features do remove work:
    # the prompts' re-encoding, about 1%.
    flops_per_step = variant_flops(variant.config, variant.overrides, clip_weights, device, args.batch, args.crop)
    reset_peak(device)
    runner = VariantRunner(variant, cfg, device, args.batch, args.crop)
    seconds = runner.time_steps(args.warmup + (2 if variant.compile else 0), args.steps)
    img_per_s = args.batch / seconds
    tflops = flops_per_step / seconds / 1e12
    row = {"variant": variant.name, "ms_per_step": 1e3 * seconds, "img_per_s": img_per_s,
           "x_official": img_per_s / OFFICIAL_IMG_PER_S, "peak_gb": peak_gb(device),
           "flops_per_step": flops_per_step, "tflops": tflops, **mfu_fields(variant, tflops, args.peak_tflops),
           "scan_path": scan_path(runner.model, device), **asdict(variant)}
    print(f"  {variant.name}: {row['ms_per_step']:.1f} ms/step, {img_per_s:.2f} img/s, "
          f"peak {gb_text(row['peak_gb'])} GB, MFU {row['mfu_pct']:.2f}% of the bf16 peak "
          f"({row['mfu_pct_precision_peak']:.2f}% of {row['precision_peak_basis']})", flush=True)
    del runner
    return row


def scan_path(model, device: torch.device) -> str:
    """The scan the model's Mamba layers run ("fused", "mamba_ssm" or "torch"): a silent fallback to
    our PyTorch scan on the GPU would otherwise explain a slow row only in the console."""
    return next(m.scan_path(device) for m in model.modules() if isinstance(m, Mamba))


def largest_crop(variant: Variant, args, device, clip_weights, report) -> dict:
    """Fit peak memory as a + b * pixels from two crops and predict the largest crop that fits in
    CROP_DEVICE_MEMORY (80 GB; a larger GPU's allocator is capped at that much meanwhile); then
    train one step at 768 px and at the prediction (at most MAX_CROP), smallest first, stopping at the
    first failure. `report(result)` receives the result after every try, so a timeout keeps them."""
    cfg = model_config(variant.config, clip_weights)
    total = torch.cuda.get_device_properties(device).total_memory
    capacity = min(total, CROP_DEVICE_MEMORY)
    torch.cuda.set_per_process_memory_fraction(capacity / total, device)   # beyond it: out of memory
    try:
        return _largest_crop(variant, args, device, cfg, capacity, report)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def _largest_crop(variant: Variant, args, device, cfg, capacity: int, report) -> dict:
    budget = capacity * CROP_MEMORY_BUDGET / 1e9
    peaks = {}
    for crop in (224, 320):   # cuDNN's algorithm timing at every new size would cost minutes: off
        reset_peak(device)
        VariantRunner(variant, cfg, device, args.batch, crop, cudnn_benchmark=False).time_steps(1, 1)
        peaks[crop] = peak_gb(device)
    slope = (peaks[320] - peaks[224]) / (320 ** 2 - 224 ** 2)
    predicted = int(math.sqrt(max(224 ** 2, (budget - peaks[224]) / slope + 224 ** 2)) // 8 * 8)
    result = {"variant": variant.name, "largest_crop": 320, "peak_gb_at": peaks, "predicted_by_memory": predicted,
              "budget_gb": budget, "memory_capacity_gb": capacity / 1e9, "failed": None}
    for crop in sorted({min(768, predicted), min(predicted, MAX_CROP)}):
        try:
            reset_peak(device)
            VariantRunner(variant, cfg, device, args.batch, crop, cudnn_benchmark=False).time_steps(1, 1)
            result["largest_crop"], result["peak_gb_at"][crop] = crop, peak_gb(device)
        except RuntimeError as exc:   # out of memory, or a library failing on huge shapes (cuBLAS did once)
            result["failed"] = {"crop": crop, "error": f"{type(exc).__name__}: {exc}"[:300]}
            break
        finally:
            report(result)
    return result


def eval_latency(args, device, clip_weights, bf16: bool) -> dict:
    """Milliseconds to restore one 480x720 image with the faithful network (tiny, small in smoke mode)."""
    cfg = model_config("tiny" if args.smoke else "m2restore", clip_weights)
    # torch's defaults, as the official evaluation ran; not whatever the previous measurement set.
    torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = False, False
    model = build_model(cfg).to(device).eval()
    image = torch.rand(1, 3, *(SMOKE_EVAL_SIZE if args.smoke else EVAL_SIZE), device=device)
    with torch.no_grad(), autocast(device, bf16):
        for _ in range(2):
            model(image)
        sync(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            model(image)
        sync(device)
    return {"eval_ms": 1e3 * (time.perf_counter() - start) / args.steps, "size": list(image.shape[-2:]),
            "bf16": bf16}


def scan_timing(device: torch.device, backend: str, repeats: int, shape=SCAN_SHAPE) -> float:
    """Milliseconds per forward+backward of one selective scan of `shape` (batch, d_inner, d_state, L)."""
    b, d, n, length = shape
    gen = torch.Generator().manual_seed(0)
    u, delta, z = (torch.randn(b, d, length, generator=gen).to(device).requires_grad_() for _ in range(3))
    A = (-torch.rand(d, n, generator=gen)).to(device).requires_grad_()
    B, C = (torch.randn(b, n, length, generator=gen).to(device).requires_grad_() for _ in range(2))
    D = torch.randn(d, generator=gen).to(device).requires_grad_()

    def once():
        y = selective_scan(u, delta, A, B, C, D, z, delta_softplus=True, backend=backend)
        y.sum().backward()

    once()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        once()
    sync(device)
    return 1e3 * (time.perf_counter() - start) / repeats


def clip_share(variant: Variant, args, device, clip_weights, step_ms: float) -> dict:
    """Time of the frozen CLIP prior's forward in `variant`'s setting, and its share of the step."""
    model = build_model(model_config(variant.config, clip_weights, variant.overrides)).to(device)
    image = torch.rand(args.batch, 3, args.crop, args.crop, device=device)
    with torch.no_grad(), autocast(device, variant.bf16):
        model.clip_prior(image)
        sync(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            model.clip_prior(image)
        sync(device)
    ms = 1e3 * (time.perf_counter() - start) / args.steps
    return {"variant": variant.name, "clip_ms": ms, "share_of_step_pct": 100 * ms / step_ms}


def loss_trajectories(variants, args, device, clip_weights, steps: int) -> dict:
    """Per-step losses of each variant from the same initial weights on the same batch; the largest
    relative difference of each against the first (the reference recipe)."""
    losses = {}
    for variant in variants:
        runner = VariantRunner(variant, model_config(variant.config, clip_weights, variant.overrides), device,
                          args.batch, args.crop)
        losses[variant.name] = torch.stack([runner.step() for _ in range(steps)]).float().cpu().tolist()
        del runner
    reference = torch.tensor(losses[variants[0].name])
    max_rel = {name: float(((torch.tensor(values) - reference).abs() / reference.abs()).max())
               for name, values in losses.items()}
    return {"steps": steps, "losses": losses, "max_rel_diff_vs_first": max_rel,
            "loss_drop": {name: values[0] - values[-1] for name, values in losses.items()}}


def profile_step(variant: Variant, args, device, clip_weights, out_dir: Path) -> dict:
    """torch.profiler over a few steps of `variant`: the top operators by device time, as text."""
    from torch.profiler import ProfilerActivity, profile

    runner = VariantRunner(variant, model_config(variant.config, clip_weights, variant.overrides), device,
                      args.batch, args.crop)
    runner.time_steps(args.warmup + (2 if variant.compile else 0), 1)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            runner.step()
        sync(device)
    sort_key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_key, row_limit=40)
    path = out_dir / "train_profile.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{variant.name}, 3 steps, batch {args.batch}, crop {args.crop}\n{table}\n")
    return {"variant": variant.name, "table": str(path)}


def write_random_clip(path: Path) -> str:
    """The benchmark needs DA-CLIP-sized weights; random ones cost the same time as released ones."""
    from m2r.models.clip_prior import build_daclip, clip_architecture
    from m2r.models.config import ClipConfig

    if not path.exists():   # written whole or not at all: a run killed mid-write leaves no stub
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(build_daclip(clip_architecture(ClipConfig())).state_dict(), tmp)
    return str(path)


def markdown(rows: list[dict]) -> str:
    peak = rows[0]["mfu_peak_tflops"] if rows else H100_BF16_DENSE_TFLOPS
    lines = [f"| variant | ms/step | img/s | x official | peak GB | TFLOP/s | MFU % (bf16 peak {peak:.0f} TFLOP/s) "
             "| MFU % of own precision's peak |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['ms_per_step']:.1f} | {r['img_per_s']:.2f} | {r['x_official']:.2f} "
                     f"| {gb_text(r['peak_gb'])} | {r['tflops']:.1f} | {r['mfu_pct']:.2f} "
                     f"| {r['mfu_pct_precision_peak']:.2f} ({r['precision_peak_basis']}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, seconds")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                        help="the GPU's dense bf16 peak, the denominator of every row's mfu_pct")
    parser.add_argument("--only", default="",
                        help="comma-separated parts: train,trajectory,profile,crop,eval,scan,clip,flops")
    parser.add_argument("--variants", default="",
                        help="comma-separated variant keys, run in that order (default: all): "
                             f"{', '.join(v.key for v in GPU_VARIANTS)}; --smoke: "
                             f"{', '.join(v.key for v in SMOKE_VARIANTS)}")
    parser.add_argument("--json", type=Path, help="write all results here")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cpu" and not args.smoke and args.only != "flops":
        # The full-size measurements on a CPU take hours and their numbers mean nothing: on the GPU machine
        # this is CUDA failing to initialise, which should cost seconds of the device window, not all of it.
        raise SystemExit("train_speed: no CUDA device; run with --smoke on a CPU (or --only flops)")
    if args.smoke:
        args.crop, args.batch, args.steps, args.warmup = 64, 2, 2, 1
    parts = set(args.only.split(",")) if args.only else {"train", "trajectory", "profile", "crop", "eval", "scan",
                                                         "clip"}
    if device.type == "cpu":
        parts -= {"crop"}
    clip_weights = None if args.smoke else write_random_clip(Path("/tmp/m2r-bench/daclip_random.pt"))
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "batch": args.batch, "crop": args.crop}
    print(f"train_speed on {results['device']}, torch {results['torch']}", flush=True)

    variants = SMOKE_VARIANTS if args.smoke else GPU_VARIANTS
    if args.variants:
        variants = [variant_named(key, variants) for key in args.variants.split(",")]

    def save():
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomically(args.json, results)

    def record(key, measure):
        """Run one measurement; keep going on failure, and save after each so a timeout loses little. A failed
        measurement keeps what it reported before it failed, beside the error (the crop search saves each try: an
        error after them, e.g. a sticky CUDA error raised again by a later CUDA call, must not erase them)."""
        try:
            results[key] = measure()
        except Exception as exc:  # a failed variant is reported, not fatal to the others
            if args.smoke:
                raise
            partial = results.get(key) if isinstance(results.get(key), dict) else {}
            results[key] = {**partial, "error": f"{type(exc).__name__}: {exc}"[:500]}
        print(f"{key}: {results[key]}", flush=True)
        save()

    if "flops" in parts:  # the analytic count alone (runs anywhere, e.g. to check MFU arithmetic on CPU)
        for config in sorted({v.config for v in variants}):
            record(f"flops_per_step/{config}",
                   lambda c=config: variant_flops(c, (), clip_weights, device, args.batch, args.crop))
    if "train" in parts:
        for v in variants:
            record(f"train/{v.name}", lambda v=v: run_variant(v, args, device, clip_weights))
        print(markdown([r for k, r in results.items() if k.startswith("train/") and "error" not in r]))
    if "trajectory" in parts:
        pair = SMOKE_TRAJECTORY if args.smoke else TRAJECTORY
        steps = SMOKE_TRAJECTORY_STEPS if args.smoke else TRAJECTORY_STEPS
        record("trajectory", lambda: loss_trajectories(pair, args, device, clip_weights, steps))
    trained = [r for k, r in results.items() if k.startswith("train/") and "error" not in r]
    fastest = min(trained, key=lambda r: r["ms_per_step"]) if trained else None
    fastest_variant = fastest and next(v for v in variants if v.name == fastest["variant"])
    if "profile" in parts and fastest:
        out_dir = args.json.parent if args.json else Path("/tmp/m2r-bench")
        record("profile", lambda: profile_step(fastest_variant, args, device, clip_weights, out_dir))
    if "scan" in parts:
        for backend in ["torch"] + (["mamba_ssm"] if device.type == "cuda" else []):
            shape = SMOKE_SCAN_SHAPE if args.smoke else SCAN_SHAPE
            record(f"scan_ms/{backend}", lambda b=backend: scan_timing(device, b, 3 if b == "torch" else 20, shape))
    if "eval" in parts:
        for bf16 in (False,) if args.smoke else (False, True):
            record(f"eval/{'bf16' if bf16 else 'fp32'}", lambda b=bf16: eval_latency(args, device, clip_weights, b))
    if "crop" in parts:   # after the quick ones: its tries at large crops take the longest, and may fail
        def report_crop(partial):
            results["largest_crop"] = partial
            save()
        record("largest_crop", lambda: largest_crop(CROP_VARIANT, args, device, clip_weights, report_crop))
    if "clip" in parts and fastest:
        record("clip", lambda: clip_share(fastest_variant, args, device, clip_weights, fastest["ms_per_step"]))


if __name__ == "__main__":
    main()
