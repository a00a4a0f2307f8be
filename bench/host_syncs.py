"""The operations of each training step that would make the host wait for a CUDA device, found on any machine.

    python bench/host_syncs.py --config configs/pretrain/tiny-test.yaml run.log_every=2 [key=value ...]
    python bench/host_syncs.py --finetune --config configs/finetune/tiny-test.yaml data.root=DIR model.moe.ep_size=1
    python bench/host_syncs.py --steps 4 --json out.json --config ...

Builds the run (one rank) and takes `--steps` steps through the loop's own `train_step` and `_report_step`,
counting per step, by call site (the innermost frame outside torch, and the m2r frame under it):
- aten ops that read device data on the host or size their output by it (`_local_scalar_dense`, which
  .item(), float(t), bool(t) and `if t` go through; nonzero, masked_select, boolean-mask indexing, bincount,
  unique, repeat_interleave without output_size, equal), seen by a TorchDispatchMode in forward, backward,
  DeepSpeed and the optimizer alike;
- calls that copy to the host or from pageable host memory: .tolist(), .cpu(), .numpy(), .to("cpu"),
  tensor printing, torch.tensor(..., device=...), torch.cuda.synchronize.
On a CPU every tensor lives on the host, so a site is a device sync only where its tensor would be on the
GPU (the batch's uint8 copy, the sampler's indices and the report once copied are host tensors): read
the sites, not the totals. Also counts every aten op a step dispatches (about one kernel each on a GPU).
On a GPU, `torch.cuda.set_sync_debug_mode("warn")` names the synchronising calls as well.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Counter, Dict, Iterator, List

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # this checkout's m2r, whatever is installed

HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "bincount", "_unique2", "unique_dim",
              "unique_consecutive", "equal"}
COPYING_METHODS = ("tolist", "cpu", "numpy", "__repr__", "__format__")


def call_site() -> str:
    """'file:line function' of the innermost frame outside torch (torch.optim counts as outside), followed by
    '<- file:line function' of the innermost m2r frame when that is another one."""
    frames = [frame for frame in traceback.extract_stack()[:-2] if frame.filename != __file__]
    outside = [frame for frame in frames if "/torch/" not in frame.filename or "/torch/optim/" in frame.filename]
    inner = outside[-1] if outside else frames[-1]
    ours = [frame for frame in frames if "/m2r/" in frame.filename]
    site = _short(inner)
    return site + (f"  <- {_short(ours[-1])}" if ours and ours[-1] is not inner else "")


def _short(frame: traceback.FrameSummary) -> str:
    path = frame.filename
    if "/m2r/" in path:
        path = "m2r/" + path.rsplit("/m2r/", 1)[1]
    elif "/site-packages/" in path:
        path = path.split("/site-packages/", 1)[1]
    return f"{path}:{frame.lineno} {frame.name}"


def _syncing_op(name: str, args, kwargs) -> bool:
    if name in HOST_READS:
        return True
    if name == "repeat_interleave":   # the repeats' sum sizes the output unless output_size says it
        return len(args) > 1 and isinstance(args[1], torch.Tensor) and kwargs.get("output_size") is None
    if name in ("index", "index_put", "index_put_"):   # a boolean mask is made indices by a nonzero
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()))
    return False


class HostSyncCounter(TorchDispatchMode):
    """Counts, while `counting`, the syncing calls by (what, call site) and every dispatched aten op by name."""

    def __init__(self):
        super().__init__()
        self.counting = False
        self.syncs: Counter = collections.Counter()
        self.ops: Counter = collections.Counter()
        self._in_method = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.counting:
            name = func._schema.name.split("::")[-1]
            self.ops[name] += 1
            if _syncing_op(name, args, kwargs):
                self.syncs[(f"aten.{name}", call_site())] += 1
        return func(*args, **kwargs)

    def note(self, what: str) -> None:
        if self.counting and not self._in_method:
            self.syncs[(what, call_site())] += 1

    def reset(self) -> None:
        self.syncs.clear()
        self.ops.clear()

    @contextlib.contextmanager
    def python_calls_patched(self) -> Iterator[None]:
        """Wrap, for the duration, the calls the dispatcher does not see on a host tensor (they copy nothing there)."""
        originals = [(torch.Tensor, name, getattr(torch.Tensor, name)) for name in (*COPYING_METHODS, "to")]
        originals += [(torch, "tensor", torch.tensor), (torch.cuda, "synchronize", torch.cuda.synchronize)]
        for owner, name, original in originals:
            setattr(owner, name, self._noting(name, original, owner is torch.Tensor))
        try:
            yield
        finally:
            for owner, name, original in originals:
                setattr(owner, name, original)

    def _noting(self, name: str, original, is_method: bool):
        counter = self

        def call(*args, **kwargs):
            what = _what_it_copies(name, args[1:] if is_method else args, kwargs, is_method)
            if what:
                counter.note(what)
            counter._in_method, outer = True, counter._in_method
            try:
                return original(*args, **kwargs) if name != "synchronize" or torch.cuda.is_available() else None
            finally:
                counter._in_method = outer
        return call


def _what_it_copies(name: str, args, kwargs, is_method: bool) -> str:
    """How a wrapped call would wait for a GPU ("" when this call does not)."""
    if name == "to":
        target = kwargs.get("device", args[0] if args else None)
        return "Tensor.to(cpu)" if isinstance(target, (str, torch.device)) and str(target).startswith("cpu") else ""
    if name == "tensor":   # a blocking copy from pageable memory onto a GPU
        return "torch.tensor(device=)" if kwargs.get("device") is not None else ""
    if name == "synchronize":
        return "torch.cuda.synchronize"
    return f"Tensor.{name}" if is_method else ""


def build_run(finetune: bool, config: str, overrides: List[str]):
    """The run and a function taking one step of its loop (`timer` -> StepResult)."""
    from m2r import dist
    from m2r.config import load_config

    env = dist.discover_dist_env()
    if not finetune:
        from m2r.engine.config import PretrainConfig
        from m2r.engine.trainer import Trainer

        run = Trainer(load_config(PretrainConfig, config, overrides), env)
        return run, run.train_step
    from m2r.engine.config import FinetuneConfig
    from m2r.engine.finetuner import Finetuner

    run = Finetuner(load_config(FinetuneConfig, config, overrides), env)
    run.sampler.set_epoch(run.epoch)
    run.train_set.set_epoch(run.epoch)
    batches = iter(run.loader)
    return run, lambda timer: run.train_step(batches, timer)


def count_steps(run, take_step, steps: int, counter: HostSyncCounter) -> List[Dict]:
    """`steps` steps of the loop (its step and report, the validation and checkpoints left out), counted."""
    from m2r.engine.monitor import StepTimer

    run.engine.train()
    timer, records = StepTimer(), []
    with counter:
        for _ in range(steps):
            counter.reset()
            counter.counting = True
            result = take_step(timer)
            run._report_step(result, timer)
            counter.counting = False
            records.append({
                "step": run.step, "log_step": run.step % run.cfg.run.log_every == 0 or run.step == run.total_steps,
                "losses": result.terms.tolist(), "aten_ops": sum(counter.ops.values()),
                "syncs": [{"what": what, "site": site, "count": count}
                          for (what, site), count in counter.syncs.most_common()]})
    return records


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--finetune", action="store_true", help="a finetune config (default: pretraining)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--json", help="write the per-step records here")
    args, overrides = parser.parse_known_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from m2r import dist

    counter = HostSyncCounter()
    run, take_step = build_run(args.finetune, args.config, overrides)
    with counter.python_calls_patched():
        records = count_steps(run, take_step, args.steps, counter)
    for record in records:
        print(f"step {record['step']} ({'log step' if record['log_step'] else 'not a log step'}): "
              f"{record['aten_ops']} aten ops")
        for sync in record["syncs"]:
            print(f"  {sync['count']:5d}  {sync['what']:26s} {sync['site']}")
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
