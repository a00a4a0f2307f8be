"""A training step keeps the GPU busy: outside log steps, m2r makes the host wait for the device once, for the
step's report (bench/host_syncs.py counts the synchronising calls on a CPU, by call site)."""
import importlib.util
import json
import os
import subprocess
import sys

from types import SimpleNamespace

import pytest
import torch

# Sites in m2r that a non-log step may show, and why none waits for the GPU but the report's copy.
ALLOWED_M2R_SITES = {
    ("m2r/dist.py", "all_reduce_sum"),          # the step's one device-to-host copy, after its all-reduce
    ("m2r/stop_signals.py", "agree"),           # reads that copy on the host
    ("m2r/engine/run.py", "_log_train_step"),   # reads that copy on the host
    ("m2r/eval/image_io.py", "to_unit_float"),  # the uint8 batch's copy to the device (non-blocking)
    ("m2r/data/stream.py", "__iter__"),         # the batch's counts, on the host before it is copied
}


def host_syncs_module(repo_root):
    spec = importlib.util.spec_from_file_location("host_syncs", os.path.join(repo_root, "bench/host_syncs.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def count_steps(repo_root, tmp_path, *overrides, steps=3):
    out = tmp_path / "syncs.json"
    command = [sys.executable, "bench/host_syncs.py", "--steps", str(steps), "--json", str(out), "--config",
               "configs/pretrain/tiny-test.yaml", f"run.dir={tmp_path / 'run'}", "run.log_every=2",
               "run.tensorboard=false", *overrides]
    result = subprocess.run(command, cwd=repo_root, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu"))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def m2r_site(site: str):
    """(file, function) of the m2r frame a call site names, or None when it has none."""
    for part in site.split("  <- "):
        if part.startswith("m2r/"):
            location, function = part.split(" ", 1)
            return location.rsplit(":", 1)[0], function
    return None


def test_a_non_log_step_waits_for_the_device_only_for_its_report(repo_root, tmp_path):
    steps = count_steps(repo_root, tmp_path, "model.moe.capacity_factor=1.0")   # dropped shares reported too
    quiet = [step for step in steps if not step["log_step"]]
    assert [step["step"] for step in quiet] == [1, 3]
    for step in quiet:
        ours = [(sync["what"], m2r_site(sync["site"])) for sync in step["syncs"] if sync["site"].startswith("m2r/")]
        assert {site for _, site in ours} <= ALLOWED_M2R_SITES, ours
        copies = [what for what, site in ours if site == ("m2r/dist.py", "all_reduce_sum") and what == "Tensor.cpu"]
        assert copies == ["Tensor.cpu"]


def test_bf16_steps_leave_deepspeeds_gradient_scan_to_its_grad_norm_check(repo_root, tmp_path):
    """The scan (a host sync and 13 kernels per parameter tensor) repeats what the grad-norm check decides."""
    steps = count_steps(repo_root, tmp_path, "train.precision=bf16", "train.zero_stage=2", steps=2)
    sites = [sync["site"] for step in steps for sync in step["syncs"]]
    assert not [site for site in sites if "has_overflow" in site or "has_inf_or_nan" in site]
    assert any("is_invalid_grad_norm" in site for site in sites)   # the check that skips a non-finite step


@pytest.mark.parametrize("call", [lambda t: t.sum().item(), lambda t: bool(t.max() > 0), lambda t: t[t > 0],
                                  lambda t: t.tolist(), lambda t: torch.nonzero(t)])
def test_the_counter_sees_what_would_wait_for_a_gpu(repo_root, call):
    module = host_syncs_module(repo_root)
    counter = module.HostSyncCounter()
    with counter.python_calls_patched(), counter:
        counter.counting = True
        call(torch.arange(-2.0, 3.0))
        counter.counting = False
    assert sum(counter.syncs.values()) >= 1
    assert not counter.syncs.keys() - {key for key in counter.syncs if "test_host_syncs.py" in key[1]}


@pytest.mark.parametrize("capacity_factor, forward_syncs", [(0.0, 2), (1.0, 3)])
def test_a_sparse_adapter_waits_for_the_host_only_to_split_its_rows(repo_root, capacity_factor, forward_syncs):
    """One nonzero per selection (and one for the capacity's), one copy of the counts; none in the backward."""
    from test_moe import make_dder, make_inputs

    module = host_syncs_module(repo_root)
    dder = make_dder(dispatch="sparse", capacity_factor=capacity_factor).train()
    x, prompt, probs = make_inputs(batch=2, height=4, width=6)
    counter = module.HostSyncCounter()
    with counter.python_calls_patched(), counter:
        counter.counting = True
        y, balance_loss, _, _ = dder(x.requires_grad_(True), prompt, probs)
        forward = sum(counter.syncs.values())
        (y.square().mean() + balance_loss).backward()
        counter.counting = False
    assert (forward, sum(counter.syncs.values()) - forward) == (forward_syncs, 0), counter.syncs


# Run on each rank by torchrun: one step whose gradients are poisoned on rank 1 only (expert weights, which no
# all-reduce shares with rank 0 at ep_size 2 of 2 ranks), then a clean step; each rank writes what it saw to
# rank<N>.json in the folder given (printed lines of two ranks can interleave).
NON_FINITE_STEP = """
import json, sys
from pathlib import Path
import torch
from m2r import dist
from m2r.config import load_config
from m2r.engine.config import PretrainConfig
from m2r.engine.experts import EXPERT_INFIX
from m2r.engine.monitor import StepTimer
from m2r.engine.trainer import Trainer

poison, results_dir = float(sys.argv[1]), Path(sys.argv[2])
cfg = load_config(PretrainConfig, "configs/pretrain/tiny-test.yaml", sys.argv[3:])
trainer = Trainer(cfg, dist.discover_dist_env())
engine = trainer.engine
params = dict(engine.module.named_parameters())
hooks = [param.register_hook(lambda grad: torch.full_like(grad, poison))
         for name, param in params.items() if EXPERT_INFIX in name and dist.rank() == 1]

def snapshot():
    masters = [p._hp_mapping.hp_fragment.detach().clone() for p in params.values() if getattr(p, "_hp_mapping", None)]
    return [p.detach().clone() for p in params.values()] + masters

before = snapshot()
trainer.train_step(StepTimer())
after_poisoned = snapshot()
for hook in hooks:
    hook.remove()
skipped, grad_norm = engine.skipped_steps, engine.get_global_grad_norm()
trainer.train_step(StepTimer())
after_clean = snapshot()
(results_dir / f"rank{dist.rank()}.json").write_text(json.dumps({
    "rank": dist.rank(), "scan_skipped": "check_overflow" in vars(engine.optimizer), "hooks": len(hooks),
    "poisoned_step_unchanged": all(torch.equal(a, b) for a, b in zip(before, after_poisoned)),
    "skipped": skipped, "grad_norm": float(grad_norm),
    "clean_step_applied": not all(torch.equal(a, b) for a, b in zip(after_poisoned, after_clean)),
    "skipped_after_clean": engine.skipped_steps}))
dist.destroy_process_group()
"""


@pytest.mark.parametrize("zero_stage, poison, grad_clip", [(1, "nan", 1.0), (2, "inf", 0.0)])
def test_a_bf16_step_with_a_non_finite_gradient_on_one_rank_is_skipped_on_every_rank(tmp_path, zero_stage, poison,
                                                                                     grad_clip):
    """Without DeepSpeed's gradient scan, the grad-norm check alone must skip the step, on both ranks alike (an
    expert gradient of rank 1 reaches rank 0 only through the norm's all-reduce), at ZeRO 1 and 2, with and without
    clipping, for inf and NaN; the next, finite step is applied."""
    from test_engine_dist import run_launch, torchrun_command

    script = tmp_path / "non_finite_step.py"
    script.write_text(NON_FINITE_STEP)
    out = run_launch(torchrun_command(2, str(script), poison, str(tmp_path), "train.precision=bf16",
                                      f"train.zero_stage={zero_stage}", f"train.grad_clip={grad_clip}",
                                      "model.moe.ep_size=2", "run.tensorboard=false", f"run.dir={tmp_path / 'run'}"))
    assert all((tmp_path / f"rank{rank}.json").exists() for rank in (0, 1)), out[-2000:]
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert "bf16: DeepSpeed's per-gradient inf/NaN scan skipped" in out   # the decision, said once at start-up
    assert results[1]["hooks"] > 0
    for result in results:
        assert result["scan_skipped"], result   # the path under test: DeepSpeed's own scan is off
        assert result["poisoned_step_unchanged"] and result["skipped"] == 1 and result["grad_norm"] == float("inf")
        assert result["clean_step_applied"] and result["skipped_after_clean"] == 1, result


BF16_ZERO_OPTIMIZER = dict(dtype=torch.bfloat16, check_grad_overflow=True, compute_grad_norm=True, cpu_offload=False)


@pytest.mark.parametrize("settings, version, skipped", [
    ({}, "0.19.8", True),
    ({}, "0.19.7", False),   # not seen to skip a step on an invalid grad norm: the scan is its only guard
    ({"dtype": torch.float16}, "0.19.8", False), ({"cpu_offload": True}, "0.19.8", False),
    ({"check_grad_overflow": False}, "0.19.8", False), ({"compute_grad_norm": False}, "0.19.8", False)])
def test_only_a_bf16_zero_step_whose_grad_norm_check_skips_a_non_finite_step_loses_the_scan(monkeypatch, settings,
                                                                                               version, skipped):
    import deepspeed

    from m2r.engine.run import skip_the_redundant_overflow_scan

    monkeypatch.setattr(deepspeed, "__version__", version)
    def scan(partition_gradients=True):   # DeepSpeed's check_overflow, as the optimizer holds it
        return None

    optimizer = SimpleNamespace(**{**BF16_ZERO_OPTIMIZER, **settings}, check_overflow=scan)
    assert skip_the_redundant_overflow_scan(optimizer) == skipped
    assert (optimizer.check_overflow is not scan) == skipped
