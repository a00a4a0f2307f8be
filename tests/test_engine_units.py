"""The engine's pieces in one process: launch discovery, the DeepSpeed config, random generators,
metrics, loss, validation and activation checkpointing. Checkpoints, ZeRO state, the optimizer, the
monitor and stop signals have files of their own; multi-rank behaviour: test_engine_dist.py."""
import math
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from m2r import dist
from m2r.config import ConfigError, load_config
from m2r.engine.config import PretrainConfig, validate_pretrain_config
from m2r.engine.deepspeed_config import build_deepspeed_config
from m2r.engine.loss import pixel_loss
from m2r.engine.optim import LRSchedule
from m2r.eval.metrics import batch_psnr as psnr
from m2r.eval.metrics import batch_ssim as ssim

TINY = "configs/pretrain/tiny-test.yaml"


def tiny_config(repo_root, *overrides):
    return load_config(PretrainConfig, Path(repo_root) / TINY, list(overrides))


# ----------------------------------------------------------------------------------- launchers
def test_torchrun_and_deepspeed_launchers_are_read_from_rank_variables():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"}
    assert dist.discover_dist_env(dict(env)) == dist.DistEnv(3, 8, 1, "RANK/WORLD_SIZE")
    # each launcher named by the variable only it sets, as the start-up line reports it
    assert dist.discover_dist_env({**env, "TORCHELASTIC_RUN_ID": "none"}).launcher == "torchrun"
    assert dist.discover_dist_env({**env, "CROSS_RANK": "0", "LOCAL_SIZE": "8"}).launcher == "deepspeed"


def test_srun_one_task_per_gpu_exports_torch_variables():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5", "SLURM_STEP_ID": "0",
           "SLURM_JOB_NODELIST": "gpu[07-08,12]", "SLURM_JOB_ID": "4242"}
    assert dist.discover_dist_env(env) == dist.DistEnv(5, 16, 5, "srun")
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("5", "16", "5")
    assert env["MASTER_ADDR"] == "gpu07" and env["MASTER_PORT"] == str(20000 + 4242)


def test_a_bare_python_process_is_a_world_of_one():
    env = {}
    assert dist.discover_dist_env(env) == dist.DistEnv(0, 1, 0, "single")
    assert env["MASTER_ADDR"] == "127.0.0.1" and int(env["MASTER_PORT"]) > 0
    # also in an sbatch script of a many-task job: only srun's tasks are ranks of that job
    batch_script = {"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_NODELIST": "gpu07", "SLURM_JOB_ID": "1"}
    assert dist.discover_dist_env(batch_script) == dist.DistEnv(0, 1, 0, "single")


@pytest.mark.parametrize("visible, local_rank, device", [(8, 5, 5), (1, 5, 0), (4, 5, None)])
def test_each_rank_takes_its_gpu_or_the_one_it_was_bound_to(monkeypatch, visible, local_rank, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    environ = {"SLURM_PROCID": str(local_rank), "SLURM_NTASKS": "16", "SLURM_LOCALID": str(local_rank),
               "SLURM_STEP_ID": "0", "SLURM_JOB_NODELIST": "gpu07", "SLURM_JOB_ID": "1"}
    monkeypatch.setattr(os, "environ", environ)
    env = dist.discover_dist_env(environ)
    if device is None:
        with pytest.raises(RuntimeError, match="local rank 5 has no GPU: 4 visible"):
            dist.device_for(env)
    else:
        assert dist.device_for(env) == torch.device("cuda", device)
        # the GPU DeepSpeed binds (LOCAL_RANK), while the rank stays the sixth of its node
        assert environ["LOCAL_RANK"] == str(device) and not dist.is_local_rank0()


def test_expert_groups_of_consecutive_ranks_that_span_hosts_are_named(monkeypatch):
    """8 ranks, 3 on host a, 5 on host b: groups of 2 are [0,1] [2,3] [4,5] [6,7], of which [2,3] spans both."""
    monkeypatch.setattr(dist, "all_gather_object", lambda host: ["a"] * 3 + ["b"] * 5)
    assert dist.groups_spanning_hosts(2) == [(2, ["a", "b"])]
    assert dist.groups_spanning_hosts(4) == [(0, ["a", "b"])]
    monkeypatch.setattr(dist, "all_gather_object", lambda host: ["a"] * 4 + ["b"] * 4)
    assert dist.groups_spanning_hosts(2) == dist.groups_spanning_hosts(4) == []


def test_the_problem_of_any_rank_is_the_lowest_ranks_naming_it_and_how_many_more_have_one(monkeypatch):
    """Every rank gets the same text: the first rank's problem, that rank, and how many others have one; a world of one
    (no process group) gets its own problem as it is, and no rank's problem means none."""
    monkeypatch.setattr(dist, "all_gather_object", lambda problem: [None, "lacks 2", None, "lacks 4", "lacks 1"])
    assert dist.problem_of_any_rank(None) == "lacks 2 (on rank 1 and 2 more of the 5 ranks)"
    monkeypatch.setattr(dist, "all_gather_object", lambda problem: [None, None, "lacks 4"])
    assert dist.problem_of_any_rank(None) == "lacks 4 (on rank 2)"
    monkeypatch.setattr(dist, "all_gather_object", lambda problem: [None, None])
    assert dist.problem_of_any_rank(None) is None
    monkeypatch.undo()
    assert not dist.is_initialized()
    assert dist.problem_of_any_rank("lacks 3") == "lacks 3" and dist.problem_of_any_rank(None) is None


def test_what_fails_on_any_rank_in_work_done_together_is_the_first_failing_ranks_error_on_every_rank(monkeypatch):
    """Rank 0 is told of rank 1's error as the same type (a user's error stays one), naming rank 1; a failing rank
    raises the first failing rank's error too, its own as the cause; an error that cannot cross the wire arrives as
    a RuntimeError saying what it was; no failure gives the work's result, and one process its own error as is."""
    from m2r.eval.datasets import DatasetLayoutError

    class Unpicklable(Exception):
        def __reduce__(self):
            raise TypeError("not picklable")

    def fail(error):
        raise error

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "world_size", lambda: 3)
    monkeypatch.setattr(dist, "rank", lambda: 0)
    for rank1_error, expected in ((DatasetLayoutError("lost.png"), DatasetLayoutError("lost.png (on rank 1)")),
                                  (Unpicklable("disk"), RuntimeError("on rank 1: Unpicklable: disk (on rank 1)"))):
        monkeypatch.setattr(dist, "all_gather_object", lambda mine: [mine, dist._Raised(rank1_error, 1), None])
        with pytest.raises(type(expected)) as raised:
            dist.failing_together(lambda: "read")
        assert str(raised.value) == str(expected)
    own = ValueError("mine")
    monkeypatch.setattr(dist, "rank", lambda: 2)
    monkeypatch.setattr(dist, "all_gather_object", lambda mine: [None, dist._Raised(KeyError("k"), 1), mine])
    with pytest.raises(KeyError, match=r"k'? \(on rank 1\)") as raised:
        dist.failing_together(lambda: fail(own))
    assert raised.value.__cause__ is own
    monkeypatch.setattr(dist, "all_gather_object", lambda mine: [None, None, mine])
    assert dist.failing_together(lambda: "read") == "read"
    monkeypatch.undo()
    with pytest.raises(ValueError) as raised:
        dist.failing_together(lambda: fail(own))
    assert raised.value is own


def test_work_done_together_in_a_world_of_one_raises_its_own_error_naming_no_rank(monkeypatch):
    """A bare `python pretrain.py` (or finetune.py) starts a process group of one: a validation image it cannot read
    is its own error, as is, not a copy naming rank 0 (the entry points name a rank only when several run)."""
    own = FileNotFoundError("lost.png")

    def fail():
        raise own

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "world_size", lambda: 1)
    monkeypatch.setattr(dist, "rank", lambda: 0)
    monkeypatch.setattr(dist, "all_gather_object", lambda mine: [mine])
    with pytest.raises(FileNotFoundError) as raised:
        dist.failing_together(fail)
    assert raised.value is own and str(raised.value) == "lost.png"


def test_a_run_warns_when_its_expert_groups_span_hosts(monkeypatch, capsys):
    from m2r.engine.run import TrainingRun

    monkeypatch.setattr(dist, "groups_spanning_hosts", lambda size: [(2, ["a", "b"])])
    TrainingRun._warn_if_expert_groups_span_hosts(SimpleNamespace(topology=SimpleNamespace(ep_size=2)))
    assert "WARNING: 1 expert-parallel group(s) of 2 ranks span hosts (ranks 2-3 on a, b)" in capsys.readouterr().out


@pytest.mark.parametrize("nodelist, first", [("node1", "node1"), ("a[3-5]", "a3"), ("x[9,2],y1", "x9"),
                                             ("h1,h2", "h1"), ("rack[1-2]-n[3-4]", "rack1-n3"),
                                             ("a[01-02]b[7,9],c[1-3]", "a01b7")])
def test_first_slurm_host(nodelist, first):
    assert dist.first_slurm_host(nodelist) == first


def test_srun_master_port_stays_a_valid_port_for_large_job_ids():
    env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "SLURM_JOB_NODELIST": "n1",
           "SLURM_JOB_ID": "9876543"}
    dist.discover_dist_env(env)
    assert 20000 <= int(env["MASTER_PORT"]) < 40000


OPEN_FILES_SCRIPT = """
import resource, sys
from m2r import dist
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[2])))
dist.allow_open_files(dist.DistEnv(rank=0, world_size=512, local_rank=0, launcher="srun"))
print("soft", resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


@pytest.mark.parametrize("soft, hard, after, warned", [(256, 4096, 4096, False), (256, 1024, 1024, True)])
def test_the_open_files_limit_is_raised_for_the_store_s_host_or_named_when_too_low(repo_root, soft, hard, after,
                                                                                 warned):
    """Rank 0's process hosts the store: two connections per rank (the process's and its failure watch's)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", OPEN_FILES_SCRIPT, str(soft), str(hard)], cwd=repo_root,
                            capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=repo_root), check=True)
    assert f"soft {after}" in result.stdout
    assert ("WARNING: open files are limited to 1024 (ulimit -n), below the 1280" in result.stdout) == warned


# ----------------------------------------------------------------------------------- configs
def test_deepspeed_config_follows_the_train_section(repo_root):
    train = tiny_config(repo_root, "train.micro_batch=3", "train.grad_accum=2", "train.precision=bf16",
                        "train.zero_stage=2", "train.grad_clip=0.5").train
    ds = build_deepspeed_config(train, world_size=4)
    assert ds["train_batch_size"] == 24 and ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {"stage": 2} and ds["bf16"] == {"enabled": True}
    assert "optimizer" not in ds and "scheduler" not in ds


def test_bf16_gradients_are_summed_over_ranks_in_fp32_and_over_micro_batches_at_zero_2(repo_root):
    """What DeepSpeed does with these settings is checked against fp32 training in test_engine_dist."""
    zero1 = build_deepspeed_config(tiny_config(repo_root, "train.precision=bf16", "train.zero_stage=1").train, 2)
    zero2 = build_deepspeed_config(tiny_config(repo_root, "train.precision=bf16", "train.zero_stage=2").train, 2)
    assert zero1["communication_data_type"] == zero2["communication_data_type"] == "fp32"
    assert "data_types" not in zero1   # fp32 there would switch DeepSpeed to its BF16_Optimizer
    assert zero2["data_types"] == {"grad_accum_dtype": "fp32"}
    with pytest.raises(ConfigError, match="train.zero_stage.*bf16 without ZeRO"):
        validate_pretrain_config(tiny_config(repo_root, "train.precision=bf16", "train.zero_stage=0"), world_size=1)


def test_fp16_uses_dynamic_loss_scaling(repo_root):
    ds = build_deepspeed_config(tiny_config(repo_root, "train.precision=fp16").train, world_size=1)
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0


def test_zero_stage_3_is_refused_with_the_reason(repo_root):
    train = tiny_config(repo_root, "train.zero_stage=3").train
    with pytest.raises(ConfigError, match="train.zero_stage.*MoE"):
        build_deepspeed_config(train, world_size=2)
    with pytest.raises(ConfigError, match="train.zero_stage"):
        validate_pretrain_config(tiny_config(repo_root, "train.zero_stage=3"), world_size=2)


@pytest.mark.parametrize("override, world, key", [("run.keep_last=1", 2, "run.keep_last"),
                                                  ("model.moe.ep_size=2", 3, "model.moe.ep_size"),
                                                  ("train.precision=fp8", 1, "train.precision"),
                                                  ("train.crop=30", 1, "train.crop"),
                                                  ("train.crop=8", 1, "train.crop"),
                                                  ("train.lr=-1", 1, "train.lr"),
                                                  ("train.min_lr=1", 1, "train.lr/min_lr"),
                                                  ("train.betas=[0.9]", 1, "train.betas"),
                                                  ("train.warmup_steps=-5", 1, "train.warmup_steps"),
                                                  ("train.warmup_steps=6", 1, "train.warmup_steps"),
                                                  ("data.workers=-1", 1, "data.workers"),
                                                  ("data.val_batch_size=0", 1, "data.val_batch_size"),
                                                  ("data.val_samples_per_type=-1", 1, "val_samples_per_type"),
                                                  ("data.scale_range=[0.5]", 1, "data.scale_range"),
                                                  ("data.shuffle_buffer=0", 1, "data.shuffle_buffer"),
                                                  ("data.weights={fog:1}", 1, "data.weights"),
                                                  ("data.source=shards", 1, "data.shards")])
def test_invalid_combinations_name_their_key(repo_root, override, world, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_pretrain_config(tiny_config(repo_root, override), world_size=world)


def test_the_collective_timeout_is_checked_before_the_process_group_starts(repo_root):
    import datetime

    from m2r.engine.config import collective_timeout

    assert collective_timeout(tiny_config(repo_root).run) == datetime.timedelta(minutes=30)
    with pytest.raises(ConfigError, match=r"run\.collective_timeout_minutes"):
        collective_timeout(tiny_config(repo_root, "run.collective_timeout_minutes=0").run)


def test_the_groups_deepspeed_creates_for_a_step_get_the_collective_timeout(repo_root):
    """Not only the default group: the step's all-to-all and gradient reductions run in DeepSpeed's own."""
    import subprocess
    import sys

    code = """
import datetime, torch
from m2r import dist
dist.init_distributed(dist.discover_dist_env(), datetime.timedelta(minutes=3))
from deepspeed.utils import groups
groups._create_expert_and_data_parallel(1)
for group in (groups._get_expert_parallel_group("ep_size_1"), groups._get_expert_data_parallel_group("ep_size_1"),
              groups._get_data_parallel_group()):
    print(group._get_backend(torch.device("cpu")).options._timeout)
"""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    result = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True,
                            timeout=120, env=dict(env, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["0:03:00"] * 3


@pytest.mark.parametrize("casts_whole_module", [False, True])
def test_a_bf16_engine_runs_the_clip_prior_in_fp32_whatever_deepspeed_casts(repo_root, tmp_path, casts_whole_module):
    """DeepSpeed 0.19.8 casts the module's parameters, which leaves the prior (outside them) in fp32; earlier
    releases cast the whole module, which M2Restore._apply extends to the prior (simulated here): training's
    routing, and what `m2r.evaluate --pretrain-val` recomputes, must not depend on the release."""
    import subprocess
    import sys

    code = f"""
import deepspeed, torch
from m2r import dist
from m2r.config import load_config
from m2r.engine.config import PretrainConfig
from m2r.engine.trainer import Trainer
if {casts_whole_module}:
    initialize = deepspeed.initialize
    deepspeed.initialize = lambda model, **kwargs: initialize(model=model.bfloat16(), **kwargs)
trainer = Trainer(load_config(PretrainConfig, "configs/pretrain/tiny-test.yaml",
                              ["train.precision=bf16", "train.zero_stage=1", "run.dir={tmp_path / 'run'}"]),
                  dist.discover_dist_env())
module = trainer.engine.module
print(module.output.weight.dtype, {{p.dtype for p in module.clip_prior.parameters()}})
dist.destroy_process_group()
"""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    result = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True,
                            timeout=300, env=dict(env, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1] == "torch.bfloat16 {torch.float32}"


# ----------------------------------------------------------------------------------- schedule


def test_bf16_micro_batch_sums_are_bf16_at_zero_1_and_fp32_at_zero_2():
    from m2r.engine.deepspeed_config import gradient_accumulation_dtype

    assert gradient_accumulation_dtype(SimpleNamespace(precision="bf16", zero_stage=1)) == "bf16"
    assert gradient_accumulation_dtype(SimpleNamespace(precision="bf16", zero_stage=2)) == "fp32"


def speed_settings(ema=None, device="cpu", **train):
    """The start-up summary's speed lines of a run with `train` settings (the rest defaults)."""
    from m2r.engine.run import TrainingRun

    train = dict(dict(precision="fp32", zero_stage=1, channels_last=False, compile=False, compile_backend="inductor",
                      ema_decay=0.0, activation_checkpointing="none"), **train)
    stub = SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(**train)), ema=ema, device=torch.device(device))
    stub.activation_checkpointing = TrainingRun._checkpointing_mode(stub)
    return "\n".join(TrainingRun._speed_settings(stub))


@pytest.mark.parametrize("mode, device, applied", [("auto", "cuda", "bottleneck (auto on cuda)"),
                                                    ("auto", "cpu", "none (auto on cpu)"),
                                                    ("full_res", "cuda", "full_res"), ("all", "cpu", "all")])
def test_auto_activation_checkpointing_says_what_it_chose_on_which_device(mode, device, applied):
    """auto recomputes the bottleneck on a GPU (memory bounds the batch) and nothing on a CPU; the summary says
    which, and that auto chose it. Pretraining and finetuning resolve and print it alike (`TrainingRun`)."""
    assert f"| activation checkpointing {applied} |" in speed_settings(device=device, activation_checkpointing=mode)


def test_pretraining_takes_auto_activation_checkpointing_as_finetuning_does_keeping_its_default():
    """Pretraining's default stays `none` (a resumed run's config would change under it), finetuning's `auto`."""
    from m2r.engine.config import FinetuneConfig

    assert load_config(PretrainConfig, None, ["train.activation_checkpointing=auto"]).train.activation_checkpointing \
        == "auto"
    assert load_config(PretrainConfig, None, []).train.activation_checkpointing == "none"
    assert load_config(FinetuneConfig, None, []).train.activation_checkpointing == "auto"


def test_bf16_micro_batch_sums_at_zero_1_are_printed_with_their_reason():
    assert "BF16_Optimizer" in speed_settings(precision="bf16", zero_stage=1)
    assert "BF16_Optimizer" not in speed_settings(precision="bf16", zero_stage=2)


def test_a_run_without_a_grad_norm_says_why_at_start_up():
    """fp32 at ZeRO 0: DeepSpeed keeps no norm, so the step lines show "grad n/a"."""
    assert "note: no grad norm in the step lines (grad n/a)" in speed_settings(precision="fp32", zero_stage=0)
    assert all("grad n/a" not in speed_settings(precision=precision, zero_stage=stage)
               for precision, stage in (("fp32", 1), ("bf16", 1), ("bf16", 2)))


def test_the_compile_setting_names_its_backend():
    assert "| compile True (aot_eager)" in speed_settings(compile=True, compile_backend="aot_eager")
    assert "| compile False" in speed_settings(compile=False, compile_backend="aot_eager")


def test_the_ema_setting_says_what_the_average_follows():
    ema = SimpleNamespace(follows=lambda: "the module weights (why)")
    assert "  EMA 0.999, following the module weights (why)" in speed_settings(ema=ema, ema_decay=0.999)
    assert speed_settings().endswith("\n  EMA off")


def test_cuda_backend_flags_are_shown_as_applied_on_a_gpu_and_not_on_a_cpu():
    applied = torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32
    try:   # torch's cuBLAS flags are not attributes monkeypatch can restore
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = True, False
        assert "  cudnn_benchmark True | tf32_matmul False | EMA off" in speed_settings(device="cuda")
        assert "cudnn_benchmark" not in speed_settings(device="cpu")
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = applied


# ----------------------------------------------------------------------------------- checkpoints


# ----------------------------------------------------------------------------------- random generators
def test_rng_state_round_trips_python_numpy_and_torch():
    import random

    import numpy as np

    from m2r.engine.rng import capture_rng_state, restore_rng_state

    state = capture_rng_state()
    first = (random.random(), float(np.random.rand()), float(torch.rand(())))
    random.random(), np.random.rand(), torch.rand(())
    restore_rng_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == first


def test_rank_seeds_differ_per_rank_and_per_counter():
    from m2r.engine.rng import rank_seed

    assert len({rank_seed(7, rank, counter) for rank in range(4) for counter in range(4)}) == 16


@pytest.mark.parametrize("step", [0, 7])
def test_a_reseeded_run_draws_other_gate_noise_on_each_rank(monkeypatch, step):
    """A fresh start or a topology change reseeds: the same noise on every rank would correlate the routers."""
    from m2r.engine import run

    draws = []
    for rank in (0, 1):
        monkeypatch.setattr(run.dist, "rank", lambda rank=rank: rank)
        run.TrainingRun._seed_rng(SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(seed=3)), step=step), None)
        draws.append(torch.rand(4))
    assert not torch.equal(draws[0], draws[1])


def test_a_run_reseeded_at_a_later_step_does_not_replay_the_noise_of_its_start():
    """A resume on another topology reseeds from (seed, rank, step): at step 500 the gate noise is not the
    noise the run drew from step 0, which it would then see twice."""
    from m2r.engine.rng import reseed

    draws = []
    for step in (0, 500):
        reseed(3, 0, step)
        draws.append(torch.rand(4))
    assert not torch.equal(draws[0], draws[1])


# ----------------------------------------------------------------------------------- metrics, loss
def test_psnr_and_ssim_on_known_images():
    clean = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    shifted = (clean + 0.1).clamp(0, 1)
    assert psnr(clean, clean).min() > 90
    mse = (shifted - clean).pow(2).flatten(1).mean(1)
    assert torch.allclose(psnr(shifted, clean), -10 * torch.log10(mse), atol=1e-4)
    assert torch.allclose(ssim(clean, clean), torch.ones(2), atol=1e-6)
    assert (ssim(shifted, clean) < 0.99).all()


def test_charbonnier_approaches_l1_for_large_errors():
    restored, target = torch.full((1, 3, 4, 4), 0.9), torch.zeros(1, 3, 4, 4)
    assert pixel_loss(restored, target, "l1", 1e-3) == pytest.approx(0.9)
    assert pixel_loss(restored, target, "charbonnier", 1e-3) == pytest.approx(math.sqrt(0.81 + 1e-6))
    assert pixel_loss(target, target, "charbonnier", 1e-3) == pytest.approx(1e-3)


def test_the_total_loss_adds_the_weighted_balance_loss_to_the_pixel_loss():
    from m2r.engine.loss import restoration_loss

    out = SimpleNamespace(restored=torch.zeros(1, 3, 4, 4), balance_loss=torch.tensor(2.0))
    terms = restoration_loss(out, torch.full((1, 3, 4, 4), 0.5), SimpleNamespace(loss="l1", charbonnier_eps=1e-3),
                             balance_weight=0.01)
    assert float(terms.total) == pytest.approx(0.5 + 0.01 * 2.0)


def test_the_logged_loss_terms_are_named_in_the_order_they_are_stacked():
    from m2r.engine.loss import LossTerms

    terms = LossTerms(total=torch.tensor(3.0), pixel=torch.tensor(1.0), balance=torch.tensor(2.0))
    assert dict(zip(LossTerms.NAMES, terms.stacked().tolist())) == {"loss": 3.0, "pixel_loss": 1.0,
                                                                     "balance_loss": 2.0}


def test_validation_psnr_per_type_averages_that_types_images_only():
    from m2r.engine.validate import validation_metrics

    class Identity(torch.nn.Module):
        def forward(self, x):
            return SimpleNamespace(restored=x)

    gt = torch.full((1, 3, 16, 16), 128, dtype=torch.uint8)
    batches = [dict(lq=gt + 1, gt=gt, type_id=torch.tensor([0])), dict(lq=gt + 4, gt=gt, type_id=torch.tensor([1])),
               dict(lq=gt + 4, gt=gt, type_id=torch.tensor([1]))]
    metrics = validation_metrics(Identity(), batches, torch.device("cpu"), torch.float32, ["a", "b"])
    assert metrics["psnr_a"] == pytest.approx(20 * math.log10(255), abs=1e-3)
    assert metrics["psnr_b"] == pytest.approx(20 * math.log10(255 / 4), abs=1e-3)


def test_validation_psnr_clamps_the_prediction_to_the_image_range():
    target = torch.ones(1, 3, 8, 8)
    assert float(psnr(target * 1.5, target)) == pytest.approx(100.0)


# ----------------------------------------------------------------------------------- activation checkpointing
def test_activation_checkpointing_gives_the_same_gradients(repo_root):
    from m2r.engine.loss import restoration_loss
    from m2r.models.m2restore import build_model

    cfg = tiny_config(repo_root)
    lq = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    gt = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))

    def gradients(mode):
        model = build_model(cfg.model)
        model.set_activation_checkpointing(mode)
        torch.manual_seed(3)  # the same gate noise in both runs
        restoration_loss(model(lq), gt, cfg.train, cfg.model.moe.balance_loss_weight).total.backward()
        return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = gradients("none"), gradients("all")
    assert plain.keys() == checkpointed.keys() and len(plain) > 100
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_a_recomputed_adapter_recomputes_its_experts_but_not_its_router(repo_root, monkeypatch):
    """The top-k routing runs once, in the forward: torch.compile's partitioner fails on a recomputed
    top-k routing inside the full network (torch 2.14), and keeping it costs a few values per token."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from m2r.models import moe
    from m2r.models.m2restore import build_model

    class CountTopk(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls += func is torch.ops.aten.topk.default
            return func(*args, **(kwargs or {}))

    expert_runs = []
    run_experts = moe.run_experts_densely
    monkeypatch.setattr(moe, "run_experts_densely", lambda *args: expert_runs.append(1) or run_experts(*args))
    model = build_model(tiny_config(repo_root).model)
    model.set_activation_checkpointing("full_res")   # recomputes dder1 of the three adapters
    output = model(torch.rand(1, 3, 32, 32))
    assert len(expert_runs) == 3
    with CountTopk() as in_backward:
        (output.restored.mean() + output.balance_loss).backward()
    assert in_backward.calls == 0 and len(expert_runs) == 4


# ----------------------------------------------------------------------------------- monitor


def test_a_lock_file_replaced_right_after_it_was_locked_is_locked_again(tmp_path, monkeypatch):
    """Another requeue of the job replacing a stale lock file: the lock this run holds must be on the
    file at run.dir/.lock, or two runs would each hold "the" lock."""
    import fcntl

    from m2r.engine import run_lock

    real_lockf, calls = fcntl.lockf, []

    def lock_then_see_it_replaced(handle, flags):
        real_lockf(handle, flags)
        if not calls:
            (tmp_path / ".lock").unlink()
            (tmp_path / ".lock").write_text("")
        calls.append(flags)

    monkeypatch.setattr(run_lock.fcntl, "lockf", lock_then_see_it_replaced)
    with run_lock.hold_run_dir_lock(tmp_path) as handle:
        assert len(calls) == 2 and run_lock._is_the_file_at(handle, tmp_path / ".lock")
        assert "pid " in (tmp_path / ".lock").read_text()


def test_the_lock_creates_no_directory_so_make_missing_dirs_knows_every_one_made_for_the_run(tmp_path):
    """A directory the lock made would be in no `make_missing_dirs` list, and a refused start would leave it."""
    from m2r.engine.run_lock import hold_run_dir_lock

    with pytest.raises(FileNotFoundError):
        hold_run_dir_lock(tmp_path / "missing" / "run")
    assert not (tmp_path / "missing").exists()


def test_a_refused_start_removes_only_directories_it_created_that_hold_nothing_but_its_lock(tmp_path):
    """What this process made for run.dir goes, parents too; a run.dir that was there before, or one (or a parent)
    that something else was written to, stays (`TrainingRun._lock_run_dir` and its subclasses' start-up)."""
    from m2r.engine.run_lock import hold_run_dir_lock, make_missing_dirs, remove_unused_run_dir

    def refused_start(run_dir, before_refusal=lambda: None):
        created = make_missing_dirs(run_dir)
        with hold_run_dir_lock(run_dir):
            before_refusal()
            remove_unused_run_dir(created)
        return created

    assert refused_start(tmp_path / "a" / "b" / "run") == [tmp_path / "a", tmp_path / "a/b", tmp_path / "a/b/run"]
    assert not (tmp_path / "a").exists()
    (tmp_path / "old").mkdir()
    assert refused_start(tmp_path / "old") == [] and (tmp_path / "old").is_dir()
    refused_start(tmp_path / "c" / "run", lambda: (tmp_path / "c/run/config.yaml").write_text(""))
    assert sorted(path.name for path in (tmp_path / "c/run").iterdir()) == [".lock", "config.yaml"]
    refused_start(tmp_path / "d" / "run", lambda: (tmp_path / "d/notes.txt").write_text(""))
    assert [path.name for path in (tmp_path / "d").iterdir()] == ["notes.txt"]


def test_a_directory_another_process_made_meanwhile_is_never_removed_by_a_refused_start(tmp_path, monkeypatch):
    """A parent that another run's start made between this one's look and its mkdir is that run's: not among the
    directories this start created, so its refusal removes run.dir alone."""
    from m2r.engine.run_lock import make_missing_dirs, remove_unused_run_dir

    made_meanwhile, mkdir = tmp_path / "shared", Path.mkdir

    def racing_mkdir(path, *args, **kwargs):
        if path == made_meanwhile:
            mkdir(path)   # the other process's
            raise FileExistsError(path)
        return mkdir(path, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", racing_mkdir)
    created = make_missing_dirs(made_meanwhile / "run")
    assert created == [made_meanwhile / "run"]
    remove_unused_run_dir(created)
    assert made_meanwhile.is_dir() and not (made_meanwhile / "run").exists()


def test_a_start_that_could_not_lock_run_dir_keeps_the_directories_it_made(tmp_path, monkeypatch):
    """On a filesystem without locks nothing keeps a second run out of run.dir, which may be using what this start
    created: a refusal leaves them. With the lock, they are the start's to remove."""
    from m2r.engine import run

    started = run.TrainingRun.__new__(run.TrainingRun)
    started.run_dir = tmp_path / "locked" / "run"
    run.TrainingRun._lock_run_dir(started)
    assert started._new_dirs == [tmp_path / "locked", tmp_path / "locked" / "run"]
    started._run_lock.close()
    monkeypatch.setattr(run, "hold_run_dir_lock", lambda run_dir: None)
    unlocked = run.TrainingRun.__new__(run.TrainingRun)
    unlocked.run_dir = tmp_path / "unlocked" / "run"
    run.TrainingRun._lock_run_dir(unlocked)
    assert unlocked._new_dirs == () and unlocked.run_dir.is_dir()


# ----------------------------------------------------------------------------------- stop signals


def test_a_step_reports_the_mean_of_its_micro_batches_loss_and_load(monkeypatch):
    """With grad_accum > 1 (every shipped finetune recipe) the logged loss, balance loss and
    expert loads must be per-micro-batch means, not sums that scale with grad_accum."""
    from m2r.engine import run

    values = iter([torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 4.0, 5.0])])
    loads = iter([[torch.tensor([1.0, 0.0])], [torch.tensor([0.0, 1.0])]])

    def fake_micro_step(*args):
        return SimpleNamespace(expert_load=next(loads)), next(values)
    monkeypatch.setattr(run, "micro_step", fake_micro_step)
    stub = SimpleNamespace(step=0, optimizer=torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.0),
                           engine=None, device=torch.device("cpu"), input_dtype=torch.float32, ema=None,
                           cfg=SimpleNamespace(train=None, model=SimpleNamespace(moe=SimpleNamespace(
                               balance_loss_weight=0.01, capacity_factor=0.0))))
    schedule = LRSchedule(lr=1.0, min_lr=0.0, warmup_steps=0, steps=10)
    result = run.TrainingRun._optimizer_step(stub, [{}, {}], schedule)
    assert result.terms.tolist() == [2.0, 3.0, 4.0]
    assert result.loads.tolist() == [[0.5, 0.5]] and stub.step == 1 and result.lr == 1.0
    assert result.dropped is None   # no capacity: nothing dropped, nothing more to report


def test_with_a_capacity_a_step_also_reports_the_mean_dropped_fraction_per_level(monkeypatch):
    from m2r.engine import run

    steps = iter([([torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5])], [torch.tensor(0.25), torch.tensor(0.0)]),
                  ([torch.tensor([0.0, 1.0]), torch.tensor([0.5, 0.5])], [torch.tensor(0.75), torch.tensor(0.5)])])

    def fake_micro_step(*args):
        loads, dropped = next(steps)
        return SimpleNamespace(expert_load=loads, dropped=dropped), torch.tensor([1.0, 2.0, 3.0])
    monkeypatch.setattr(run, "micro_step", fake_micro_step)
    stub = SimpleNamespace(step=0, optimizer=torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.0),
                           engine=None, device=torch.device("cpu"), input_dtype=torch.float32, ema=None,
                           cfg=SimpleNamespace(train=None, model=SimpleNamespace(moe=SimpleNamespace(
                               balance_loss_weight=0.01, capacity_factor=1.25))))
    result = run.TrainingRun._optimizer_step(stub, [{}, {}], LRSchedule(lr=1.0, min_lr=0.0, warmup_steps=0, steps=10))
    assert result.loads.tolist() == [[0.5, 0.5], [0.5, 0.5]]
    assert result.dropped.dtype == torch.float64 and result.dropped.tolist() == [0.5, 0.25]


def test_a_step_report_averages_over_ranks_and_agrees_on_stop_signals_in_one_collective(monkeypatch):
    """One all-reduce per step carries the loss terms, the expert loads and every rank's stop signal: on
    a GPU each collective costs a host synchronisation. Here the other rank received SIGTERM."""
    import signal

    from m2r import stop_signals
    from m2r.engine import run
    from m2r.engine.monitor import StepTimer

    other_rank = torch.tensor([3.0, 5.0, 7.0, 0.0, 1.0]
                              + [1.0 if sig == signal.SIGTERM else 0.0 for sig in stop_signals.STOP_SIGNALS])
    collectives = []

    def all_reduce_sum(values):   # on a GPU, the step's work is done when the collective's result is copied
        collectives.append(values)
        time.sleep(0.05)
        return values + other_rank

    monkeypatch.setattr(dist, "all_reduce_sum", all_reduce_sum)
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    logged = []
    cfg = SimpleNamespace(run=SimpleNamespace(log_every=5), train=SimpleNamespace(micro_batch=2, grad_accum=1))
    stub = SimpleNamespace(step=3, total_steps=10, cfg=cfg,
                           stop_request=SimpleNamespace(signal_name=None, agreed_signal=None),
                           _log_train_step=lambda terms, lr, timer, log_step: logged.append((terms.tolist(), log_step)))
    for method in ("received_flags", "agree"):
        setattr(stub.stop_request, method, getattr(stop_signals.StopRequest, method).__get__(stub.stop_request))
    result = run.StepResult(torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64),
                            torch.tensor([[1.0, 0.0]], dtype=torch.float64), lr=0.5)
    timer = StepTimer()
    assert run.TrainingRun._report_step(stub, result, timer) == "received SIGTERM (on another rank)"
    assert len(collectives) == 1 and logged == [([2.0, 3.0, 4.0], False)]
    assert timer.images == 4   # the report ends the step (after its synchronisation): 2 images x 2 ranks
    assert timer.total_seconds >= 0.05   # the synchronisation's wait is the step's
    # A log step also logs the expert loads, averaged over ranks like the loss terms, and the run's stats.
    loads, stats = [], []
    stub.step, stub._log_run_stats = 5, lambda: stats.append(stub.step)
    stub.monitor = SimpleNamespace(log_expert_load=lambda step, rows, dropped: loads.append(
        ([row.tolist() for row in rows], None if dropped is None else dropped.tolist())))
    run.TrainingRun._report_step(stub, result, timer)
    assert loads == [([[0.5, 0.5]], None)] and stats == [5] and logged[-1] == ([2.0, 3.0, 4.0], True)
    # With a capacity the dropped fractions ride in the same collective, averaged over ranks like the loads;
    # without, the collective carries what it did before (above: 5 values and the stop flags).
    # (a mean unlike every load's, so that a report read one place off cannot pass for it)
    other_rank = torch.cat([other_rank[:5], torch.tensor([0.125]), other_rank[5:]])
    result = result._replace(dropped=torch.tensor([0.25], dtype=torch.float64))
    run.TrainingRun._report_step(stub, result, timer)
    assert len(collectives[-1]) == len(collectives[0]) + 1 and len(collectives) == 3
    assert loads[-1] == ([[0.5, 0.5]], [0.1875]) and logged[-1] == ([2.0, 3.0, 4.0], True)


def test_a_local_rank_equal_to_the_gpu_count_is_refused_with_the_reason(monkeypatch):
    """Ranks 0-3 on a node showing 4 GPUs are fine; a fifth rank (local rank 4) has none."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    monkeypatch.setattr(os, "environ", {})
    assert dist.device_for(dist.DistEnv(3, 8, 3, "srun")) == torch.device("cuda", 3)
    with pytest.raises(RuntimeError, match="local rank 4 has no GPU: 4 visible"):
        dist.device_for(dist.DistEnv(4, 8, 4, "srun"))




def test_a_checkpoint_without_the_latest_validation_has_it_redone_at_its_step():
    """Saved before the latest validation was kept: a finished demo run again had no PSNR to report."""
    from m2r.engine.trainer import Trainer

    stub = SimpleNamespace()
    Trainer._restore_validation_record(stub, {"step": 300, "first_val_psnr": 13.5})
    assert (stub.first_val_psnr, stub.last_val, stub.last_val_step) == (13.5, {}, None)
    Trainer._restore_validation_record(stub, {"first_val_psnr": 13.5, "last_val": {"psnr": 22.0}, "last_val_step": 290})
    assert (stub.last_val, stub.last_val_step) == ({"psnr": 22.0}, 290)


def test_validation_means_are_over_images_overall_and_per_type():
    from m2r.engine.validate import validation_metrics

    class Identity(torch.nn.Module):
        def forward(self, x):
            return SimpleNamespace(restored=x)

    gt = torch.full((1, 3, 16, 16), 128, dtype=torch.uint8)
    batches = [dict(lq=gt + 1, gt=gt, type_id=torch.tensor([0])),
               dict(lq=torch.cat([gt + 4, gt + 16]), gt=torch.cat([gt, gt]), type_id=torch.tensor([1, 1]))]
    metrics = validation_metrics(Identity(), batches, torch.device("cpu"), torch.float32, ["a", "b"])
    psnr = [20 * math.log10(255 / d) for d in (1, 4, 16)]
    c1 = 0.01 ** 2          # constant images: SSIM is the luminance term alone
    ssim = [(2 * (128 / 255) * ((128 + d) / 255) + c1) / ((128 / 255) ** 2 + ((128 + d) / 255) ** 2 + c1)
            for d in (1, 4, 16)]
    assert metrics["psnr"] == pytest.approx(sum(psnr) / 3, abs=1e-3)
    assert metrics["ssim"] == pytest.approx(sum(ssim) / 3, abs=1e-5)
    assert metrics["psnr_a"] == pytest.approx(psnr[0], abs=1e-3)
    assert metrics["psnr_b"] == pytest.approx((psnr[1] + psnr[2]) / 2, abs=1e-3)



def test_a_step_trains_at_the_learning_rate_it_reports(monkeypatch):
    from m2r.engine import run
    from m2r.engine.optim import learning_rate

    monkeypatch.setattr(run, "micro_step", lambda *args: (SimpleNamespace(expert_load=[torch.tensor([1.0, 0.0])]),
                                                          torch.tensor([1.0, 2.0, 3.0])))
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.0)
    stub = SimpleNamespace(step=3, optimizer=optimizer, engine=None, device=torch.device("cpu"),
                           input_dtype=torch.float32, ema=None,
                           cfg=SimpleNamespace(train=None, model=SimpleNamespace(moe=SimpleNamespace(
                               balance_loss_weight=0.01, capacity_factor=0.0))))
    schedule = LRSchedule(lr=1.0, min_lr=0.0, warmup_steps=2, steps=10)
    result = run.TrainingRun._optimizer_step(stub, [{}], schedule)
    assert optimizer.param_groups[0]["lr"] == result.lr == learning_rate(3, schedule)


def test_the_pretraining_summary_shows_its_learning_rate_schedule_as_finetuning_does(repo_root):
    """finetune.py's start-up says `warmup N, cosine to min_lr after step M`; pretrain.py's said nothing of its
    schedule (a warmup as long as the run, or a cosine cut short, went unseen until the lr curve)."""
    from m2r.engine.checkpoint import Topology
    from m2r.engine.trainer import Trainer

    cfg = tiny_config(repo_root, "train.steps=6", "train.warmup_steps=2")
    stub = SimpleNamespace(cfg=cfg, topology=Topology(1, 1, "fp32", 1), step=0, launcher="single",
                           schedule=LRSchedule.of_steps(cfg.train), _speed_settings=lambda: [],
                           _network_lines=lambda: ["  experts: ..."])
    assert "| steps 0->6 | warmup 2, cosine to min_lr after step 6\n" in Trainer.startup_summary(stub)


def test_the_experts_and_rank_parameters_lines_say_how_the_experts_are_split_and_what_it_costs(repo_root):
    """4 experts over ep_size 2 of 4 ranks: 2 per rank, each pair of ranks holding the same ones, and the
    all-to-all traffic that split costs; this rank's parameters. At ep_size 1 there is no all-to-all."""
    from m2r.engine.checkpoint import Topology
    from m2r.engine.run import TrainingRun

    def network_lines(ep_size):
        cfg = tiny_config(repo_root, f"model.moe.ep_size={ep_size}")
        stub = SimpleNamespace(cfg=cfg, topology=Topology(4, ep_size, "fp32", 1), input_dtype=torch.float32,
                               engine=SimpleNamespace(module=torch.nn.Linear(1000, 2)))
        stub.all_to_all_bytes_per_step = lambda: TrainingRun.all_to_all_bytes_per_step(stub)
        return TrainingRun._network_lines(stub)

    experts, params = network_lines(2)
    assert experts.startswith("  experts: 4 per adapter, top-2 | ep_size 2: 2 per rank, expert data parallel 2 | "
                              "all-to-all per step ~") and experts.endswith(" MiB per rank")
    assert params == "  rank params 2,002"
    assert network_lines(1)[0] == "  experts: 4 per adapter, top-2 | ep_size 1: 4 per rank, expert data parallel 4"


def test_pretraining_and_finetuning_summaries_both_show_the_experts_and_rank_parameters(repo_root):
    """Finetuning's start-up said nothing of the experts per rank, their all-to-all or the rank's parameters;
    both entry points print the same lines (`TrainingRun._network_lines`)."""
    from m2r.engine.checkpoint import Topology
    from m2r.engine.config import FinetuneConfig
    from m2r.engine.finetuner import Finetuner
    from m2r.engine.trainer import Trainer

    lines = ["  experts: (the shared line)", "  rank params (the shared line)"]
    common = dict(topology=Topology(1, 1, "fp32", 1), step=0, launcher="single", _speed_settings=lambda: [],
                  _network_lines=lambda: lines)
    pretrain_cfg = tiny_config(repo_root)
    pretrain = SimpleNamespace(cfg=pretrain_cfg, schedule=LRSchedule.of_steps(pretrain_cfg.train), **common)
    finetune = SimpleNamespace(cfg=load_config(FinetuneConfig, Path(repo_root) / "configs/finetune/tiny-test.yaml"),
                               schedule=LRSchedule(1.0, 0.0, 0, 4), steps_per_epoch=2, train_set=[None] * 4,
                               _training_folder=lambda: "train/input", _schedule_length=lambda: 4, val_names=["a"],
                               val_counts=[1], **common)
    for summary in (Trainer.startup_summary(pretrain), Finetuner.startup_summary(finetune)):
        assert "\n".join(lines) in summary


@pytest.mark.parametrize("step, last_val_step, image_every, expected", [
    (0, None, 2, ["validate", "images"]),   # the first run: both, before any step
    (4, 2, 2, ["validate", "images"]),      # a stop signal skipped both at step 4
    (4, 2, 3, ["validate"]),                # no grid due at step 4
    (4, 4, 2, []),                          # step 4 saved after its validation and grid
    (5, 4, 1, []),                          # a mid-interval checkpoint: nothing was due
])
def test_a_resumed_pretraining_redoes_the_validation_and_grid_a_stop_signal_skipped(step, last_val_step, image_every,
                                                                                      expected):
    from m2r.engine.trainer import Trainer

    done = []
    stub = SimpleNamespace(step=step, last_val_step=last_val_step,
                           cfg=SimpleNamespace(run=SimpleNamespace(image_every=image_every, val_every=4),
                                               train=SimpleNamespace(steps=100)),
                           validate=lambda: done.append("validate"), log_images=lambda: done.append("images"))
    stub._validation_due = lambda: Trainer._validation_due(stub)
    assert Trainer._start_of_run_work(stub) == (step > 0 and "validate" in expected)
    assert done == expected


def test_trainable_weights_load_whole_or_not_at_all_naming_what_the_source_lacks():
    """A state missing a trainable weight stops before any weight is set (not a bare KeyError half-way), with an
    error the entry points print as one line (a user's: another checkpoint is needed); frozen weights need not
    be in it (an EMA holds none)."""
    from m2r.engine.optim import load_trainable_weights
    from m2r.models.convert import CheckpointMismatch

    module = torch.nn.Linear(3, 2)
    module.bias.requires_grad_(False)
    engine = SimpleNamespace(module=module, optimizer=SimpleNamespace())
    with pytest.raises(CheckpointMismatch, match=r"the EMA of ckpt lacks 1 trainable weights, e\.g\. \['weight'\]"):
        load_trainable_weights(engine, {"bias": torch.zeros(2)}, "the EMA of ckpt")
    bias = module.bias.detach().clone()
    load_trainable_weights(engine, {"weight": torch.ones(2, 3)}, "the EMA of ckpt")
    assert torch.equal(module.weight, torch.ones(2, 3)) and torch.equal(module.bias, bias)


def test_a_resumed_fp16_run_reports_only_the_steps_skipped_since_it_started(repo_root, tmp_path):
    """An exact resume brings back DeepSpeed's count of skipped steps (5 here): the first log step after it
    reports the 1 skipped since, not 6."""
    from m2r.engine.checkpoint import Topology
    from m2r.engine.run import TrainingRun

    cfg = tiny_config(repo_root, f"run.dir={tmp_path}", "run.tensorboard=false", "train.precision=fp16")
    engine = SimpleNamespace(skipped_steps=5, optimizer=SimpleNamespace(loss_scale=2.0**15))
    stub = SimpleNamespace(cfg=cfg, run_dir=tmp_path, step=6, topology=Topology(1, 1, "fp16", 1), engine=engine)
    TrainingRun._open_monitor(stub, total_steps=10)
    stub.monitor.close()
    engine.skipped_steps = 6
    assert TrainingRun._loss_scaling(stub) == {"loss_scale": 2.0**15, "skipped_steps": 1}


def test_weights_no_longer_finite_stop_a_save_naming_a_few_of_them_and_the_newest_good_checkpoint(tmp_path):
    """One process: the trainable tensors that hold inf/NaN, counted and named (a frozen one is not the run's to
    mend), and the newest complete checkpoint to resume (not an older one, nor one cut short)."""
    from m2r.engine.run import TrainingRun

    network = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    with torch.no_grad():
        network[0].weight.requires_grad_(False).fill_(float("nan"))
        network[1].bias[0] = float("inf")
        network[2].weight[0, 0] = float("nan")
    for tag, complete in (("step00000010", True), ("step00000020", True), ("step00000030", False)):
        (tmp_path / tag).mkdir()
        if complete:
            (tmp_path / tag / "meta.json").write_text("{}")
    stub = SimpleNamespace(engine=SimpleNamespace(module=network), step=31, checkpoints=SimpleNamespace(root=tmp_path),
                           cfg=SimpleNamespace(train=SimpleNamespace(precision="fp16", zero_stage=0)))
    with pytest.raises(FloatingPointError) as refused:
        TrainingRun._refuse_non_finite_weights(stub)
    # no ZeRO 1/2 hint: fp16's loss scaler skips non-finite steps at ZeRO 0 too
    assert str(refused.value) == (f"step 31: 2 weight tensors are no longer finite (1.bias, 2.weight); no checkpoint "
                                  f"is saved; resume the newest with run.resume={tmp_path / 'step00000020'}")
    stub.cfg.train.precision = "fp32"
    with pytest.raises(FloatingPointError, match=r"step00000020 \(train.zero_stage=1 or 2 skip non-finite steps\)$"):
        TrainingRun._refuse_non_finite_weights(stub)
    with torch.no_grad():
        network[1].bias[0] = network[2].weight[0, 0] = 0.0
    TrainingRun._refuse_non_finite_weights(stub)   # only the frozen weight is not finite: saved


def test_the_ranks_whose_weights_are_no_longer_finite_are_counted_each_once():
    """Dense weights are on every rank: a NaN one on 4 ranks is 1 tensor 4 times, not 4 tensors."""
    from m2r.engine.run import describe_non_finite_weights

    assert describe_non_finite_weights([5, 5, 5, 6], ["a", "b", "c", "d", "e"]) == (
        "weight tensors are no longer finite on 4 of the 4 ranks (5 on rank 0, 5 on rank 1, 5 on rank 2, ...); "
        "this rank's: a, b, c, ...")
    assert describe_non_finite_weights([0, 1], []) == ("weight tensors are no longer finite on 1 of the 2 ranks (1 on "
                                                       "rank 1)")


def test_a_resume_restores_the_ema_as_rank_0s_read_of_the_checkpoint_says(monkeypatch):
    """Loading a saved EMA is a collective (every rank agrees whether any lacks weights): a rank whose own read of
    meta.json fails or is stale must take the path rank 0's read decides, as the others do."""
    from m2r.engine import run

    def stale_read():
        raise FileNotFoundError("meta.json: stale NFS handle")
    loaded = []
    monkeypatch.setattr(run.dist, "on_rank0", lambda work: True)   # rank 0's read: the checkpoint holds an EMA
    monkeypatch.setattr(run, "load_ema_states", lambda ref: {"weight": torch.ones(1)})
    stub = SimpleNamespace(ema=SimpleNamespace(load_state_dict=lambda state, source: loaded.append((state, source))))
    run.TrainingRun._restore_ema(stub, SimpleNamespace(meta=stale_read, path="ckpt/step00000005"))
    assert loaded == [({"weight": torch.ones(1)}, "the EMA of ckpt/step00000005")]   # named in a "lacks" error


def test_a_saved_cuda_rng_state_is_restored_where_cuda_is(monkeypatch):
    """Gate noise and dropout on the GPU draw from the CUDA generator: an exact resume restores it too."""
    from m2r.engine.rng import capture_rng_state, restore_rng_state

    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.tensor([7, 8, 9], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", restored.append)
    state = capture_rng_state()
    restore_rng_state(state)
    assert len(restored) == 1 and restored[0].tolist() == [7, 8, 9]


def test_rank_seeds_are_distinct_for_every_rank_of_a_64_gpu_job_and_every_step_of_a_long_run():
    """A reseed at step s on one rank must not replay the noise another rank drew from another step."""
    from m2r.engine.rng import rank_seed

    ranks, steps = 64, 20000
    assert len({rank_seed(7, rank, step) for rank in range(ranks) for step in range(steps)}) == ranks * steps


def test_an_exact_resume_gives_each_rank_its_own_saved_rng_state(monkeypatch):
    """Rank 1 continues from rank 1's generators: another rank's would repeat that rank's gate noise on both."""
    from m2r.engine import run
    from m2r.engine.checkpoint import Topology

    client = {"step": 30, "rng_states": [{"saved by": 0}, {"saved by": 1}]}
    topology = Topology(2, 1, "fp32", 1)
    stub = SimpleNamespace(topology=topology, cfg=SimpleNamespace(train=None), optimizer=None,
                           engine=SimpleNamespace(load_checkpoint=lambda root, tag: (None, client),
                                                  module=torch.nn.Module(),   # no experts, no ZeRO
                                                  zero_optimization=lambda: False),
                           _global_batch_change=lambda ref, saved: "")
    ref = SimpleNamespace(root="/ck", tag="step00000030", topology=lambda: topology)
    monkeypatch.setattr(run, "apply_optimizer_settings", lambda optimizer, train: None)
    monkeypatch.setattr(run.dist, "rank", lambda: 1)
    assert run.TrainingRun._load_checkpoint(stub, ref) == (client, {"saved by": 1}) and stub.step == 30
