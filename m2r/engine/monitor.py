"""What the run reports, from rank 0 only: console lines, a progress bar, TensorBoard and metrics.jsonl.

Other ranks get a `NullMonitor` with the same methods, so the training loop has no rank checks.
TensorBoard tags (balance_loss before its weight model.moe.balance_loss_weight; loss = pixel + weight x
balance; data_wait_share of the rank that waited most; grad_norm before clipping, absent at ZeRO 0 in fp32):
train/{loss,loss_avg,pixel_loss,balance_loss,lr,grad_norm,img_per_s,img_per_s_per_gpu,data_wait_share,
gpu_mem_gib (CUDA only), loss_scale and skipped_steps (fp16 only: DeepSpeed's dynamic loss scale, and the optimizer
steps it skipped for inf/NaN gradients since the last log step; the console's log line says `skipped N (fp16
overflow, scale S)` when there were some; a run that stops between log steps reports those skipped since the last
one at its last step, in a record and a console line of their own)}, moe/level<L>/expert<E> (load fractions: the
share of the step's top-k token assignments, summed over ranks, that chose expert E of MoE adapter level L, before
any capacity drop), moe/level<L>/max_load (the largest of them: 1/num_experts is perfect balance, 1 all on one expert),
moe/level<L>/dropped (only with model.moe.capacity_factor > 0, absent without: the share of the step's
assignments, over all ranks, that the expert capacity dropped; the console's log line shows them as
`drop a/b/c%`, level 1 first), data/samples_<type> and data/corrupt_samples (pretraining: samples seen per
degradation type, damaged samples skipped), val/{psnr,ssim,psnr_<type>} (finetuning: psnr_<set name>),
images/val (pretraining: degraded | restored | clean). The moe/ tags come every run.log_every steps; max_load
and dropped are also in metrics.jsonl, in a record of their own at that step (keys as the tags). Every
metrics.jsonl record starts with its step and `time`, the wall clock (Unix seconds) when it was written; a
non-finite value is the string "NaN", "Infinity" or "-Infinity" (`standard_json`, read back by `metric_value`).
"""
from __future__ import annotations

import datetime
import json
import math
import os
import re
import sys
import time
from collections import deque
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch


class StepTimer:
    """Wall time per step, split into waiting for data and the rest."""

    def __init__(self):
        self.data_seconds = 0.0
        self.total_seconds = 0.0
        self.images = 0
        self._start = time.perf_counter()

    def add_data_wait(self, seconds: float) -> None:
        self.data_seconds += seconds

    def end_step(self, images: int) -> None:
        now = time.perf_counter()
        self.total_seconds += now - self._start
        self.images += images
        self._start = now

    def exclude_since(self, started: float) -> None:
        """Leave the time since `started` (a perf_counter reading) out of the step under way: validation,
        image grids and checkpoints are not training. What a step reports and agrees on stays in."""
        self._start += time.perf_counter() - started

    def take(self) -> Dict[str, float]:
        """Throughput since the last call, then reset."""
        total = max(self.total_seconds, 1e-9)
        report = {"img_per_s": self.images / total, "data_wait_share": self.data_seconds / total}
        self.data_seconds = self.total_seconds = 0.0
        self.images = 0
        return report


def gpu_memory_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30


class NullMonitor:
    def log_train(self, step: int, scalars: Dict[str, float], log_step: bool) -> None: ...
    def log_expert_load(self, step: int, loads: List[torch.Tensor], dropped: Optional[torch.Tensor] = None) -> None: ...
    def log_data_stats(self, step: int, counts: Dict[str, int], corrupt_samples: int) -> None: ...
    def log_loss_scaling(self, step: int, scaling: Dict[str, float]) -> None: ...
    def log_val(self, step: int, metrics: Dict[str, float]) -> None: ...
    def log_images(self, step: int, grid: torch.Tensor) -> None: ...
    def advance(self, step: int) -> None: ...
    def print(self, text: str) -> None: ...
    def close(self) -> None: ...


class TensorBoardOff:
    """Stands in for the SummaryWriter when run.tensorboard is false: metrics.jsonl and the console stay."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    add_image = flush = close = add_scalar


def first_step_logged(start_step: int) -> int:
    """A run resumed at step T logs from T + 1 (what steps <= T logged is in the checkpoint's past); a
    run starting afresh logs from 0 (its first validation), over what a run killed before its first
    checkpoint left."""
    return start_step + 1 if start_step > 0 else 0


def tensorboard_writer(run_dir: Path, enabled: bool, start_step: int):
    """Events from `first_step_logged` on, written by a run stopped after its last checkpoint, are
    purged: this run logs those steps again."""
    if not enabled:
        return TensorBoardOff()
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(run_dir / "tensorboard"), purge_step=first_step_logged(start_step))


LOSS_WINDOW = 100   # steps in the running loss average (loss_avg)
RECORD_STEP = re.compile(rb'^\{"step": (\d+)[,}]')   # how `Monitor._write` starts every line
LOSS_KEY = re.compile(rb'"loss": ?')
VAL_KEY = re.compile(rb'"val_psnr": ?')   # how `log_val` writes a validation record


def standard_json(value):
    """`value` with its non-finite floats as the strings "NaN", "Infinity" and "-Infinity": standard JSON has no
    such numbers, and Python's json would write the bare tokens, which jq and strict parsers refuse. Strings, not
    null, keep which one it was (a diverged loss: NaN or an overflow's Infinity); `float` reads them back."""
    if isinstance(value, dict):
        return {key: standard_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):   # a record's lists too: json.dumps(allow_nan=False) raises on any NaN left
        return [standard_json(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def metric_value(value):
    """A number of a metrics.jsonl record as it was logged: the strings `standard_json` wrote back to floats."""
    return float(value) if isinstance(value, str) else value


def cut_metrics(metrics_path: Path, step: int) -> Tuple[List[float], Optional[int]]:
    """Cut metrics.jsonl before its first record of `step` or later, or a line a crash cut off, and return
    the losses of the last LOSS_WINDOW records kept: a run stopped after its last checkpoint logged steps
    that the resumed run logs again, so a resumed run's file reads as an uninterrupted one's. Records are
    in step order (each run appends where the file was cut), so one streaming pass finds the cut, and the
    file is truncated in place, not rewritten (a 226k-step run's file is about 40 MB, read at every resume).
    Also returns the step of the last validation record kept (None: none), see `Monitor.log_val`."""
    if not metrics_path.exists():
        return [], None
    loss_lines: deque = deque(maxlen=LOSS_WINDOW)
    kept_bytes, last_val_step = 0, None
    with open(metrics_path, "rb") as handle:
        for line in handle:
            record_step = _record_step(line)
            if record_step is None or record_step >= step or not line.endswith(b"\n"):
                break
            if LOSS_KEY.search(line):
                loss_lines.append(line)
            if VAL_KEY.search(line):
                last_val_step = record_step
            kept_bytes += len(line)
    if kept_bytes < metrics_path.stat().st_size:
        os.truncate(metrics_path, kept_bytes)
    return [metric_value(json.loads(line)["loss"]) for line in loss_lines], last_val_step


def _record_step(line: bytes) -> Optional[int]:
    """The step of a metrics.jsonl line: read from its start when `Monitor._write` wrote it, else (a file
    rewritten by another tool, e.g. `jq -c`) from its JSON; None for a line that is no record (cut off by a
    crash, garbage), where the cut falls."""
    match = RECORD_STEP.match(line)
    if match:
        return int(match.group(1))
    try:
        record = json.loads(line)
    except ValueError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


class Monitor(NullMonitor):
    def __init__(self, run_dir: Path, total_steps: int, start_step: int, world_size: int, progress_bar: bool,
                 tensorboard: bool = True):
        self.total_steps = total_steps
        self.world_size = world_size
        self.writer = tensorboard_writer(run_dir, tensorboard, start_step)
        metrics_path = run_dir / "metrics.jsonl"
        # The running average continues where the checkpoint was taken.
        losses, last_val_step = cut_metrics(metrics_path, first_step_logged(start_step))
        self.recent_losses = deque(losses, maxlen=LOSS_WINDOW)
        # A run resumed at a step whose validation a stop signal skipped validates it first; a run before it
        # that did so too, and was killed before its next checkpoint, logged it already (kept: it is not
        # after the checkpoint's step).
        self._val_logged_at = last_val_step if start_step > 0 and last_val_step == start_step else None
        self.metrics_file = open(metrics_path, "a")
        self.bar = self._progress_bar(start_step) if progress_bar and sys.stdout.isatty() else None
        self._eta_clock = (time.perf_counter(), start_step)
        self._dropped_line: Tuple[int, str] = (-1, "")   # (step, console text) from `log_expert_load`

    def _progress_bar(self, start_step: int):
        from tqdm import tqdm

        return tqdm(total=self.total_steps, initial=start_step, unit="step", dynamic_ncols=True, leave=False)

    def _write(self, record: Dict) -> None:
        """One metrics.jsonl line: the step first (`RECORD_STEP`), then the time, for plots against time
        that show pauses and preemptions."""
        record = {"step": record["step"], "time": round(time.time(), 3), **record}
        self.metrics_file.write(json.dumps(standard_json(record), allow_nan=False) + "\n")
        self.metrics_file.flush()

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def print(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def _eta(self, step: int) -> str:
        start_time, start_step = self._eta_clock
        done = step - start_step
        if done <= 0:
            return "?"
        seconds = (time.perf_counter() - start_time) / done * (self.total_steps - step)
        return str(datetime.timedelta(seconds=int(seconds)))

    def log_train(self, step: int, scalars: Dict[str, float], log_step: bool) -> None:
        """Every step: the loss joins the running average and metrics.jsonl; a log step (whose scalars hold
        the throughput too) also reaches the console and TensorBoard."""
        self.recent_losses.append(scalars["loss"])
        scalars = dict(scalars, loss_avg=sum(self.recent_losses) / len(self.recent_losses))
        self._write({"step": step, **scalars})
        if not log_step:
            return
        scalars["img_per_s_per_gpu"] = scalars["img_per_s"] / self.world_size
        if torch.cuda.is_available():
            scalars["gpu_mem_gib"] = gpu_memory_gib()
        for name, value in scalars.items():
            self.writer.add_scalar(f"train/{name}", value, step)
        grad = f"{scalars['grad_norm']:.3f}" if "grad_norm" in scalars else "n/a"
        self.print(
            f"step {step}/{self.total_steps} | loss {scalars['loss']:.4f} (avg {scalars['loss_avg']:.4f}) "
            f"| balance {scalars['balance_loss']:.4f} (unweighted) | lr {scalars['lr']:.2e} | grad {grad} "
            f"| {scalars['img_per_s']:.1f} img/s ({scalars['img_per_s_per_gpu']:.1f}/GPU) "
            f"| data {100 * scalars['data_wait_share']:.0f}% "
            + (f"| mem {scalars['gpu_mem_gib']:.2f} GiB " if "gpu_mem_gib" in scalars else "")
            + (f"| {self._dropped_line[1]} " if self._dropped_line[0] == step else "")
            + (f"| {skipped_steps_text(scalars)} " if scalars.get("skipped_steps") else "")
            + f"| eta {self._eta(step)}")

    def log_expert_load(self, step: int, loads: List[torch.Tensor], dropped: Optional[torch.Tensor] = None) -> None:
        """A log step's expert loads (per level, (num_experts,) fractions) and, with a training capacity, the
        fraction of assignments dropped per level: TensorBoard, and max_load and dropped in metrics.jsonl;
        the dropped fractions also join this step's console line (`log_train` comes next)."""
        summary = {}
        for level, load in enumerate(loads, start=1):
            fractions = load.tolist()
            for expert, fraction in enumerate(fractions):
                self.writer.add_scalar(f"moe/level{level}/expert{expert}", fraction, step)
            summary[f"moe/level{level}/max_load"] = max(fractions)
        if dropped is not None:
            fractions = dropped.tolist()
            summary.update((f"moe/level{level}/dropped", value) for level, value in enumerate(fractions, start=1))
            self._dropped_line = (step, "drop " + "/".join(_percent(value) for value in fractions) + "%")
        for tag, value in summary.items():
            self.writer.add_scalar(tag, value, step)
        self._write({"step": step, **summary})

    def log_loss_scaling(self, step: int, scaling: Dict[str, float]) -> None:
        """fp16's `loss_scale` and `skipped_steps` at a run's last step when it was no log step (whose line and
        record would have them): TensorBoard, a metrics.jsonl record of their own and a console line."""
        for name, value in scaling.items():
            self.writer.add_scalar(f"train/{name}", value, step)
        self._write({"step": step, **scaling})
        self.print(f"step {step}: {skipped_steps_text(scaling, ' since the last log step')}")

    def log_data_stats(self, step: int, counts: Dict[str, int], corrupt_samples: int) -> None:
        """Training samples served per degradation type, and damaged samples skipped, summed over ranks, since
        the data stream started (a fresh stream after a topology or data change starts them again)."""
        for name, count in counts.items():
            self.writer.add_scalar(f"data/samples_{name}", count, step)
        self.writer.add_scalar("data/corrupt_samples", corrupt_samples, step)
        self._write({"step": step, "samples_by_type": counts, "corrupt_samples": corrupt_samples})

    def log_val(self, step: int, metrics: Dict[str, float]) -> None:
        """TensorBoard, metrics.jsonl and the console; a validation already logged at this step (see
        `__init__`: the same weights) reaches the console only, so that no step has two records."""
        if step == self._val_logged_at:
            self._val_logged_at = None
            self.print(f"val step {step}: PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f} (logged "
                       "already by an earlier run)")
            return
        for name, value in metrics.items():
            self.writer.add_scalar(f"val/{name}", value, step)
        self.writer.flush()
        self._write({"step": step, **{f"val_{name}": value for name, value in metrics.items()}})
        self.print(f"val step {step}: PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f}")

    def log_images(self, step: int, grid: torch.Tensor) -> None:
        self.writer.add_image("images/val", grid.clamp(0, 1), step)
        self.writer.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.writer.close()
        self.metrics_file.close()


def skipped_steps_text(scaling: Dict[str, float], since: str = "") -> str:
    """fp16's optimizer steps skipped for inf/NaN gradients, as both console lines say it (`Monitor.log_train`'s log
    step, `Monitor.log_loss_scaling`'s last step): `skipped N (fp16 overflow, scale S)`, with `since` after N."""
    return f"skipped {scaling['skipped_steps']}{since} (fp16 overflow, scale {scaling['loss_scale']:.0f})"


def _percent(fraction: float) -> str:
    """A share as a short percentage: 1 decimal, 2 significant digits below 1% (so that 0.04% is not 0.0)."""
    percent = 100 * fraction
    return f"{percent:.1f}" if percent == 0 or percent >= 1 else f"{percent:.2g}"
