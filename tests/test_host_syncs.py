"""A training step keeps the GPU busy: outside log steps, m2r makes the host wait for the device once, for the
step's report (bench/host_syncs.py counts the synchronising calls on a CPU, by call site)."""
import importlib.util
import json
import os
import subprocess
import sys

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


def test_a_bf16_step_with_a_non_finite_gradient_is_still_skipped(repo_root, tmp_path):
    code = f"""
import torch
from m2r import dist
from m2r.config import load_config
from m2r.engine.config import PretrainConfig
from m2r.engine.monitor import StepTimer
from m2r.engine.trainer import Trainer
trainer = Trainer(load_config(PretrainConfig, "configs/pretrain/tiny-test.yaml",
                              ["train.precision=bf16", "train.zero_stage=1", "run.dir={tmp_path / 'run'}"]),
                  dist.discover_dist_env())
module = trainer.engine.module
module.output.weight.register_hook(lambda grad: grad * float("nan"))
before = {{name: p.detach().clone() for name, p in module.named_parameters()}}
trainer.train_step(StepTimer())
unchanged = all(torch.equal(before[name], p) for name, p in module.named_parameters())
print("skipped", unchanged, trainer.engine.skipped_steps, trainer.engine.get_global_grad_norm())
dist.destroy_process_group()
"""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    result = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True,
                            timeout=300, env=dict(env, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped True 1 inf" in result.stdout


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
