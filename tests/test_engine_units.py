"""The engine's pieces in one process: launch discovery, DeepSpeed config, schedule, checkpoint
bookkeeping, metrics, loss, EMA and activation checkpointing. Multi-rank behaviour: test_engine_dist.py."""
import json
import math
import os
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from m2r import dist, stop_signals
from m2r.config import ConfigError, load_config
from m2r.engine.checkpoint import CheckpointManager, CheckpointRef, Topology, checkpoint_at, resolve_resume, tag_for
from m2r.engine.config import PretrainConfig, validate_pretrain_config
from m2r.engine.deepspeed_config import build_deepspeed_config
from m2r.engine.loss import pixel_loss
from m2r.engine.monitor import Monitor, NullMonitor, build_monitor
from m2r.engine.optim import EMA, LRSchedule, learning_rate
from m2r.eval.metrics import batch_psnr as psnr
from m2r.eval.metrics import batch_ssim as ssim

TINY = "configs/pretrain/tiny-test.yaml"


def tiny_config(repo_root, *overrides):
    return load_config(PretrainConfig, Path(repo_root) / TINY, list(overrides))


# ----------------------------------------------------------------------------------- launchers
def test_torchrun_and_deepspeed_launchers_are_read_from_rank_variables():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"}
    assert dist.discover_dist_env(env) == dist.DistEnv(3, 8, 1, "torchrun/deepspeed")


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
    env = dist.DistEnv(local_rank, 16, local_rank, "srun")
    if device is None:
        with pytest.raises(RuntimeError, match="local rank 5 has no GPU: 4 visible"):
            dist.device_for(env)
    else:
        assert dist.device_for(env) == torch.device("cuda", device)


@pytest.mark.parametrize("nodelist, first", [("node1", "node1"), ("a[3-5]", "a3"), ("x[9,2],y1", "x9"),
                                             ("h1,h2", "h1")])
def test_first_slurm_host(nodelist, first):
    assert dist.first_slurm_host(nodelist) == first


def test_srun_master_port_stays_a_valid_port_for_large_job_ids():
    env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "SLURM_JOB_NODELIST": "n1",
           "SLURM_JOB_ID": "9876543"}
    dist.discover_dist_env(env)
    assert 20000 <= int(env["MASTER_PORT"]) < 40000


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


# ----------------------------------------------------------------------------------- schedule
def test_learning_rate_warms_up_linearly_then_follows_a_cosine_to_the_floor():
    train = LRSchedule(lr=1e-3, min_lr=1e-5, warmup_steps=4, steps=104)
    assert [learning_rate(s, train) for s in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert learning_rate(54, train) == pytest.approx((1e-3 + 1e-5) / 2)
    assert learning_rate(103, train) == pytest.approx(1e-5, abs=1e-6)
    lrs = [learning_rate(s, train) for s in range(4, 104)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_ema_moves_a_decay_share_toward_the_weights():
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, decay=0.75)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(4.0)
    ema.update()
    assert torch.allclose(ema.shadow["weight"], start + 1.0)
    restored = EMA(model, decay=0.75)
    restored.load_state_dict(ema.state_dict())
    assert torch.equal(restored.shadow["weight"], ema.shadow["weight"])


def test_ema_parts_split_the_dense_weights_from_this_ranks_experts(repo_root):
    """Rank 0 saves the dense part, the first replica of each expert shard its experts (TrainingRun._ema_state)."""
    from m2r.engine.experts import EXPERT_INFIX
    from m2r.models.m2restore import build_model

    ema = EMA(build_model(tiny_config(repo_root).model), decay=0.9)
    experts, dense = ema.state_dict(dense=False), ema.state_dict(experts=False)
    assert experts and all(EXPERT_INFIX in name for name in experts)
    assert dense and not any(EXPERT_INFIX in name for name in dense)
    assert {**experts, **dense}.keys() == ema.state_dict().keys()


def test_after_its_schedule_the_learning_rate_stays_at_the_floor():
    """Finetuning's cosine may end before the last epoch (train.schedule_epochs)."""
    train = LRSchedule(lr=1e-3, min_lr=1e-5, warmup_steps=4, steps=104)
    assert [learning_rate(step, train) for step in (104, 150, 204)] == pytest.approx([1e-5] * 3)


def test_bf16_micro_batch_sums_are_bf16_at_zero_1_and_fp32_at_zero_2():
    from m2r.engine.deepspeed_config import gradient_accumulation_dtype

    assert gradient_accumulation_dtype(SimpleNamespace(precision="bf16", zero_stage=1)) == "bf16"
    assert gradient_accumulation_dtype(SimpleNamespace(precision="bf16", zero_stage=2)) == "fp32"


# ----------------------------------------------------------------------------------- checkpoints
class FakeEngine:
    """Writes one file per tag, as DeepSpeed's collective save would (world of one); `crash` stops
    it half-way, as a preemption or a full disk would."""

    def __init__(self, crash: bool = False):
        self.crash = crash

    def save_checkpoint(self, root, tag, client_state, save_latest):
        assert save_latest is False  # `latest` is ours, written atomically after every rank finished
        (Path(root) / tag).mkdir(parents=True)
        torch.save(client_state, Path(root) / tag / "mp_rank_00_model_states.pt")
        if self.crash:
            (Path(root) / tag / "zero_pp_rank_7_mp_rank_00_optim_states.pt").write_bytes(b"half")
            raise OSError("killed while saving")


def saved_step(tag_dir: Path) -> int:
    return torch.load(tag_dir / "mp_rank_00_model_states.pt")["step"]


def test_checkpoints_keep_the_last_k_and_point_latest_at_the_newest(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    config = load_config(PretrainConfig, None, ["train.lr=0.125"])
    for step in (10, 20, 30):
        manager.save(FakeEngine(), step, Topology(2, 2, "bf16", 1), {"step": step}, config)
    assert manager.tags() == [tag_for(20), tag_for(30)]
    assert (tmp_path / "latest").read_text() == "step00000030"
    meta = json.loads((tmp_path / "step00000030" / "meta.json").read_text())
    assert meta == {"step": 30, "world_size": 2, "ep_size": 2, "precision": "bf16", "zero_stage": 1, "ema": False}
    assert load_config(PretrainConfig, tmp_path / "step00000030" / "config.yaml") == config  # resolved, beside it
    assert not list(tmp_path.rglob("*.tmp"))


def test_resuming_an_older_checkpoint_sets_the_newer_ones_aside(tmp_path, capsys):
    """Else pruning would keep the abandoned branch's newest tag, and the `latest` fallback take it."""
    from m2r.engine.checkpoint import CheckpointRef, set_aside_newer_tags

    manager, config = CheckpointManager(tmp_path, keep_last=2), load_config(PretrainConfig)
    for step in (20, 40, 60):
        manager.save(FakeEngine(), step, Topology(1, 1, "fp32", 1), {"step": step}, config)
    assert set_aside_newer_tags(CheckpointRef(tmp_path, tag_for(40)), tmp_path) == [tag_for(60)]
    manager.save(FakeEngine(), 50, Topology(1, 1, "fp32", 1), {"step": 50}, config)
    (tmp_path / "latest").unlink()
    assert manager.tags() == [tag_for(40), tag_for(50)]
    assert resolve_resume("latest", tmp_path).tag == tag_for(50)
    assert "resuming from the newest complete checkpoint, step00000050" in capsys.readouterr().out
    assert saved_step(tmp_path / "abandoned" / tag_for(60)) == 60
    assert set_aside_newer_tags(CheckpointRef(tmp_path, tag_for(50)), tmp_path / "elsewhere") == []


@pytest.mark.parametrize("settings", [["train.precision=fp32"], ["train.precision=bf16", "train.zero_stage=2"]])
def test_a_checkpoint_saved_before_meta_recorded_precision_reads_it_from_its_config(tmp_path, settings):
    """So a run requeued across that change still resumes exactly."""
    config = load_config(PretrainConfig, None, settings)
    ref = CheckpointManager(tmp_path, keep_last=2).save(FakeEngine(), 10, Topology.of_run(2, config), {}, config)
    meta_path = ref.path / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["precision"], meta["zero_stage"]
    meta_path.write_text(json.dumps(meta))
    assert ref.topology() == Topology.of_run(2, config) == Topology(2, 1, config.train.precision,
                                                                    config.train.zero_stage)


def test_a_checkpoint_is_on_disk_before_it_counts_as_complete(tmp_path, monkeypatch):
    """Every file of the tag is fsync'd before meta.json is written (a power loss must not leave a
    'complete' tag with truncated shards)."""
    import m2r.atomic

    events = []
    real_fsync = os.fsync
    monkeypatch.setattr(m2r.atomic.os, "fsync", lambda fd: events.append(os.readlink(f"/proc/self/fd/{fd}"))
                        or real_fsync(fd))
    CheckpointManager(tmp_path, keep_last=2).save(FakeEngine(), 10, Topology(1, 1, "fp32", 1), {"step": 10},
                                                  load_config(PretrainConfig))
    partial = str(tmp_path / (tag_for(10) + ".partial"))
    shard = events.index(f"{partial}/mp_rank_00_model_states.pt")
    assert shard < events.index(f"{partial}/meta.json.tmp")


def test_a_save_cut_short_leaves_the_last_complete_checkpoint_in_use(tmp_path):
    manager, config = CheckpointManager(tmp_path, keep_last=2), load_config(PretrainConfig)
    manager.save(FakeEngine(), 10, Topology(1, 1, "fp32", 1), {"step": 10}, config)
    with pytest.raises(OSError, match="killed"):
        manager.save(FakeEngine(crash=True), 20, Topology(1, 1, "fp32", 1), {"step": 20}, config)
    assert manager.tags() == [tag_for(10)] and resolve_resume("latest", tmp_path).tag == tag_for(10)
    manager.save(FakeEngine(), 20, Topology(1, 1, "fp32", 1), {"step": 20}, config)
    assert sorted(p.name for p in (tmp_path / tag_for(20)).iterdir()) == [
        "config.yaml", "meta.json", "mp_rank_00_model_states.pt"]   # nothing left from the cut save
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", tag_for(10), tag_for(20)]


def test_a_failure_while_publishing_is_raised_and_the_last_checkpoint_stays(tmp_path, monkeypatch):
    """Rank 0 publishes alone; its error is broadcast, so that no rank waits for it at a barrier."""
    from m2r.engine import checkpoint

    manager, config = CheckpointManager(tmp_path, keep_last=2), load_config(PretrainConfig)
    manager.save(FakeEngine(), 10, Topology(1, 1, "fp32", 1), {"step": 10}, config)
    monkeypatch.setattr(checkpoint, "fsync_directory", lambda path: (_ for _ in ()).throw(OSError(28, "No space")))
    with pytest.raises(OSError, match="No space"):
        manager.save(FakeEngine(), 20, Topology(1, 1, "fp32", 1), {"step": 20}, config)
    assert resolve_resume("latest", tmp_path).tag == tag_for(10)


def test_saving_a_step_again_replaces_its_tag_only_once_the_new_one_is_complete(tmp_path):
    """A finetune stopped on the last step of an epoch saves that step again after resuming."""
    manager, config = CheckpointManager(tmp_path, keep_last=2), load_config(PretrainConfig)
    manager.save(FakeEngine(), 10, Topology(1, 1, "fp32", 1), {"step": 10}, config)
    manager.save(FakeEngine(), 20, Topology(1, 1, "fp32", 1), {"step": 20, "epoch": 0}, config)
    with pytest.raises(OSError, match="killed"):
        manager.save(FakeEngine(crash=True), 20, Topology(1, 1, "fp32", 1), {"step": 20, "epoch": 1}, config)
    latest = resolve_resume("latest", tmp_path)
    assert latest.tag == tag_for(20) and torch.load(latest.path / "mp_rank_00_model_states.pt")["epoch"] == 0
    manager.save(FakeEngine(), 20, Topology(1, 1, "fp32", 1), {"step": 20, "epoch": 1}, config)
    assert torch.load(latest.path / "mp_rank_00_model_states.pt")["epoch"] == 1
    assert manager.tags() == [tag_for(10), tag_for(20)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", tag_for(10), tag_for(20)]


def test_resume_falls_back_to_the_newest_complete_checkpoint(tmp_path, capsys):
    manager, config = CheckpointManager(tmp_path, keep_last=2), load_config(PretrainConfig)
    for step in (10, 20):
        manager.save(FakeEngine(), step, Topology(1, 1, "fp32", 1), {"step": step}, config)
    (tmp_path / tag_for(20)).rename(tmp_path / (tag_for(20) + ".replaced"))   # a crash between two renames
    assert resolve_resume("latest", tmp_path).tag == tag_for(10)
    assert ("WARNING: " f"{tmp_path / 'latest'} names 'step00000020', which is not a complete checkpoint; resuming "
            "from the newest complete checkpoint, step00000010") in capsys.readouterr().out
    (tmp_path / "latest").write_text("")   # a pointer lost with the page cache
    (tmp_path / tag_for(30)).mkdir()       # and a step directory without meta.json
    assert resolve_resume(str(tmp_path), Path("elsewhere")).tag == tag_for(10)
    assert "latest is missing or empty" in capsys.readouterr().out
    manager.save(FakeEngine(), 40, Topology(1, 1, "fp32", 1), {"step": 40}, config)
    assert manager.tags() == [tag_for(10), tag_for(40)]   # incomplete directories neither count nor stay
    assert not list(tmp_path.glob("*.replaced"))
    for tag in manager.tags():
        shutil.rmtree(tmp_path / tag)
    with pytest.raises(FileNotFoundError, match="names 'step00000040', but .* holds no complete checkpoint"):
        resolve_resume("latest", tmp_path)


def test_keeping_a_single_checkpoint_is_refused(tmp_path):
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=1)


def test_resume_targets(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    assert resolve_resume("latest", tmp_path) is None  # a fresh run
    manager.save(FakeEngine(), 7, Topology(1, 1, "fp32", 1), {}, load_config(PretrainConfig))
    assert resolve_resume("latest", tmp_path).path == tmp_path / "step00000007"
    assert resolve_resume("none", tmp_path / "fresh") is None
    with pytest.raises(ConfigError, match=r"key 'run.resume': 'none' starts a new run, but .* holds this run's"):
        resolve_resume("none", tmp_path)   # a second run would mix its checkpoints and logs with these
    assert resolve_resume(str(tmp_path / "step00000007"), Path("elsewhere")).tag == "step00000007"
    assert resolve_resume(str(tmp_path), Path("elsewhere")).topology() == Topology(1, 1, "fp32", 1)
    with pytest.raises(FileNotFoundError, match="run.resume"):
        resolve_resume(str(tmp_path / "missing"), tmp_path)
    with pytest.raises(FileNotFoundError, match="init.weights="):
        checkpoint_at(str(tmp_path / "missing"), "init.weights")
    assert checkpoint_at(str(tmp_path), "init.weights").tag == "step00000007"


def test_local_experts_are_renamed_to_global_ids_from_their_ranks_first_expert():
    from m2r.engine.experts import with_global_expert_id

    name = "dder2.deepspeed_moe.experts.deepspeed_experts.1.fc1.weight"
    assert with_global_expert_id(name, first_global_id=2 * 3) == name.replace(".1.", ".7.")
    assert with_global_expert_id("dder2.router.w_g", first_global_id=6) == "dder2.router.w_g"


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


def test_ema_weights_are_applied_for_the_duration_and_the_trained_ones_come_back_exactly():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).bfloat16()
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.37)          # training moved the weights; the EMA is halfway
    ema.update()
    trained = [p.clone() for p in model.parameters()]
    with ema.applied():
        for param, shadow, trained_param in zip(model.parameters(), ema.shadow.values(), trained):
            assert torch.equal(param, shadow.to(param.dtype)) and not torch.equal(param, trained_param)
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), trained))


def test_the_total_loss_adds_the_weighted_balance_loss_to_the_pixel_loss():
    from m2r.engine.loss import restoration_loss

    out = SimpleNamespace(restored=torch.zeros(1, 3, 4, 4), balance_loss=torch.tensor(2.0))
    terms = restoration_loss(out, torch.full((1, 3, 4, 4), 0.5), SimpleNamespace(loss="l1", charbonnier_eps=1e-3),
                             balance_weight=0.01)
    assert float(terms.total) == pytest.approx(0.5 + 0.01 * 2.0)


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
def test_other_ranks_null_monitor_takes_the_same_calls_as_rank_0s():
    import inspect

    public = [name for name in vars(NullMonitor) if not name.startswith("_")]
    assert public and all(inspect.signature(getattr(NullMonitor, name)) == inspect.signature(getattr(Monitor, name))
                          for name in public)


@pytest.mark.parametrize("tensorboard", [True, False])
def test_metrics_file_always_and_tensorboard_only_when_asked(tmp_path, tensorboard):
    monitor = build_monitor(True, tmp_path, total_steps=2, start_step=0, world_size=1, progress_bar=False,
                            tensorboard=tensorboard)
    monitor.log_train(1, {"loss": 0.5, "pixel_loss": 0.4, "balance_loss": 1.0, "lr": 1e-3}, log_step=False)
    monitor.log_val(1, {"psnr": 20.0, "ssim": 0.5})
    monitor.log_images(1, torch.zeros(3, 8, 8))
    monitor.log_data_stats(1, {"rain": 3, "haze": 1}, corrupt_samples=2)
    monitor.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["loss"] == 0.5 and records[1]["val_psnr"] == 20.0
    assert records[2] == {"step": 1, "samples_by_type": {"rain": 3, "haze": 1}, "corrupt_samples": 2}
    assert (tmp_path / "tensorboard").is_dir() == tensorboard


def test_a_resumed_runs_metrics_file_reads_as_an_uninterrupted_runs(tmp_path):
    """Resumed at step 3: step 4, logged after the checkpoint, is logged again by the resumed run, and
    a line cut off by a crash goes; the running average continues from the steps kept."""
    kept = [{"step": 0, "val_psnr": 9.0}, {"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0},
            {"step": 2, "val_psnr": 20.0}, {"step": 3, "loss": 3.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept)
                                            + '{"step": 4, "loss": 9.0}\n{"step": 5, "lo')
    monitor = build_monitor(True, tmp_path, total_steps=6, start_step=3, world_size=1, progress_bar=False,
                            tensorboard=False)
    monitor.log_train(4, {"loss": 4.0, "pixel_loss": 4.0, "balance_loss": 0.0, "lr": 1e-3}, log_step=False)
    monitor.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records == kept + [{"step": 4, "loss": 4.0, "pixel_loss": 4.0, "balance_loss": 0.0, "lr": 1e-3,
                               "loss_avg": 2.5}]


def test_tensorboard_forgets_the_steps_a_resumed_run_logs_again(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {"pixel_loss": 0.0, "balance_loss": 0.0, "lr": 1e-3, "img_per_s": 1.0, "data_wait_share": 0.0}
    for start_step, losses in [(0, {1: 1.0, 2: 2.0, 3: 3.0}), (2, {3: 30.0})]:   # resumed at step 2
        monitor = build_monitor(True, tmp_path, total_steps=3, start_step=start_step, world_size=1,
                                progress_bar=False)
        for step, loss in losses.items():
            monitor.log_train(step, dict(scalars, loss=loss), log_step=True)
        monitor.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_a_fresh_start_drops_what_a_run_killed_before_its_first_checkpoint_logged(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "val_psnr": 9.0}\n{"step": 1, "loss": 1.0}\n')
    build_monitor(True, tmp_path, total_steps=6, start_step=0, world_size=1, progress_bar=False,
                  tensorboard=False).close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""


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


# ----------------------------------------------------------------------------------- stop signals
def test_ctrl_c_asks_for_a_checkpoint_and_a_second_one_aborts(capfd):
    """Also when a launcher's SIGTERM comes between the two (DeepSpeed's passes Ctrl-C on as SIGTERM)."""
    saved_handlers = {sig: signal.getsignal(sig) for sig in stop_signals.STOP_SIGNALS}
    try:
        request = stop_signals.StopRequest()
        signal.raise_signal(signal.SIGINT)
        assert request.signal_name == "SIGINT" and "saving a checkpoint" in capfd.readouterr().out
        signal.raise_signal(signal.SIGTERM)
        assert request.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    finally:
        for sig, handler in saved_handlers.items():
            signal.signal(sig, handler)


def test_compile_workers_block_the_stop_signals_slurm_sends_to_every_process(repo_root):
    """Killed by SLURM's USR1 or TERM while the first steps compile, they would fail the run. In a fresh
    process: a pool started earlier (by another test) would not be started again."""
    import subprocess
    import sys

    import torch._inductor.config as inductor_config

    if inductor_config.compile_threads <= 1 or getattr(inductor_config, "worker_start_method", "") != "subprocess":
        pytest.skip("no compile worker process here (one CPU, or workers forked from this process)")
    code = """
import os, signal
from m2r import stop_signals
signal.signal(signal.SIGUSR1, lambda *_: print("handled"))   # as StopRequest does
stop_signals.start_compile_workers()
from torch._inductor.async_compile import AsyncCompile
worker = AsyncCompile.process_pool().process.pid
blocked = int(next(l for l in open(f"/proc/{worker}/status") if l.startswith("SigBlk:")).split()[1], 16)
print(all(blocked >> (s - 1) & 1 for s in (signal.SIGUSR1, signal.SIGTERM)))
os.kill(worker, signal.SIGUSR1)
os.kill(os.getpid(), signal.SIGUSR1)   # this process still acts on them
import time; time.sleep(0.5)
print(AsyncCompile.process_pool().process.poll() is None)   # the worker lives on
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.stdout.split() == ["True", "handled", "True"], result.stderr[-2000:]


@pytest.mark.parametrize("entry, run_class", [("pretrain", "m2r.engine.trainer.Trainer"),
                                              ("finetune", "m2r.engine.finetuner.Finetuner")])
def test_a_stop_signal_during_start_up_reaches_the_run_instead_of_killing_the_rank(monkeypatch, entry, run_class):
    """SLURM's warning may come while the ranks still import, rendezvous or load a checkpoint: the run
    is built knowing it (what it then does: test_engine_dist.py, a warning during start-up)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(entry, Path(__file__).resolve().parent.parent / f"{entry}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    seen = {}

    class RecordingRun:
        def __init__(self, cfg, env, stop_request):
            seen["signal"] = stop_request.signal_name

        def fit(self):
            return 0

    def load_config_while_signalled(*args):
        signal.raise_signal(signal.SIGUSR1)   # its default action would end the process
        return "config"

    monkeypatch.setattr(run_class, RecordingRun)
    monkeypatch.setattr(module, "load_config", load_config_while_signalled)
    monkeypatch.setattr(dist, "discover_dist_env", lambda: "env")   # it would export RANK, MASTER_PORT...
    saved_handlers = {sig: signal.getsignal(sig) for sig in stop_signals.STOP_SIGNALS}
    try:
        assert module.main(["--config", f"configs/{entry}/tiny-test.yaml"]) == 0
    finally:
        for sig, handler in saved_handlers.items():
            signal.signal(sig, handler)
    assert seen["signal"] == "SIGUSR1"


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
                               balance_loss_weight=0.01))))
    schedule = LRSchedule(lr=1.0, min_lr=0.0, warmup_steps=0, steps=10)
    result = run.TrainingRun._optimizer_step(stub, [{}, {}], schedule)
    assert result.terms.tolist() == [2.0, 3.0, 4.0]
    assert result.loads.tolist() == [[0.5, 0.5]] and stub.step == 1 and result.lr == 1.0


def test_zero_fragments_are_stitched_in_rank_order_and_experts_renamed_per_ep_rank(tmp_path):
    """The fp32 master weights of a ZeRO run come from every rank's fragments, joined in rank order (another
    order would export a silently permuted weight), experts renamed by their expert-parallel rank."""
    from m2r.engine.checkpoint import CheckpointRef
    from m2r.export import fp32_master_weights

    tag = tmp_path / "step00000001"
    tag.mkdir()
    expert = "dder1.deepspeed_moe.experts.deepspeed_experts.0.fc1.weight"
    # world 4, ep_size 2: ranks 0 and 2 hold ep_rank 0 (expert 0), ranks 1 and 3 ep_rank 1 (expert 1);
    # the dense weight is split over all 4 ranks, the expert over its data-parallel pair.
    for rank in range(4):
        flat = torch.arange(4.0) + 10 * rank
        mapping = {"dense.weight": SimpleNamespace(start=0, numel=2), expert: SimpleNamespace(start=2, numel=2)}
        torch.save({"optimizer_state_dict": {"single_partition_of_fp32_groups": [flat],
                                             "param_slice_mappings": [mapping]}},
                   tag / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    weights = fp32_master_weights(CheckpointRef(tmp_path, tag.name), ep_size=2, num_experts=2)
    assert weights["dense.weight"].tolist() == [0, 1, 10, 11, 20, 21, 30, 31]
    assert weights[expert].tolist() == [2, 3, 22, 23]
    assert weights[expert.replace(".0.", ".1.")].tolist() == [12, 13, 32, 33]


def _partition_holding(tail_of_a: int, head_of_b: int):
    """A fake ZeRO optimizer whose one flat partition holds the last `tail_of_a` values of a 4-value
    parameter `a` and the first `head_of_b` of a 3-value `b`, then 1 value of padding."""
    a, b = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(3))
    a._hp_mapping = SimpleNamespace(lp_fragment_address=SimpleNamespace(start=4 - tail_of_a, numel=tail_of_a),
                                    hp_fragment_address=SimpleNamespace(start=0, numel=tail_of_a))
    b._hp_mapping = SimpleNamespace(lp_fragment_address=SimpleNamespace(start=0, numel=head_of_b),
                                    hp_fragment_address=SimpleNamespace(start=tail_of_a, numel=head_of_b))
    flat = torch.full((tail_of_a + head_of_b + 1,), -1.0)
    zero = SimpleNamespace(bit16_groups=[[a, b]], single_partition_of_fp32_groups=[flat],
                           optimizer=SimpleNamespace(state={}))
    return zero, flat, {id(a): "a", id(b): "b"}


def test_a_new_zero_partition_takes_each_parameters_fragment_of_the_saved_state():
    """A resume at another topology: the masters and both AdamW moments of exactly the fragments this
    rank's partition holds, at their offsets, and the saved step count (AdamW's bias correction)."""
    from m2r.engine.zero_state import _fill_partition

    zero, flat, names = _partition_holding(tail_of_a=1, head_of_b=2)
    saved = {name: {"fp32": torch.arange(n) + base, "exp_avg": torch.arange(n) + base + 100,
                    "exp_avg_sq": torch.arange(n) + base + 200, "step": torch.tensor(7.0)}
             for name, n, base in (("a", 4, 0.0), ("b", 3, 10.0))}
    assert _fill_partition(zero, 0, flat, saved, names) is True
    assert flat.tolist() == [3, 10, 11, -1]   # padding left alone
    state = zero.optimizer.state[flat]
    assert state["exp_avg"].tolist() == [103, 110, 111, 0] and state["exp_avg_sq"].tolist() == [203, 210, 211, 0]
    assert float(state["step"]) == 7.0


def test_a_partition_saved_before_any_step_leaves_adamw_fresh_and_disagreeing_steps_are_refused():
    from m2r.engine.zero_state import _fill_partition

    zero, flat, names = _partition_holding(tail_of_a=2, head_of_b=1)
    masters_only = {"a": {"fp32": torch.arange(4.0)}, "b": {"fp32": torch.arange(3.0)}}
    assert _fill_partition(zero, 0, flat, masters_only, names) is False
    assert flat.tolist() == [2, 3, 0, -1] and zero.optimizer.state == {}

    disagreeing = {name: {"fp32": torch.zeros(n), "exp_avg": torch.zeros(n), "exp_avg_sq": torch.zeros(n),
                          "step": torch.tensor(step)} for name, n, step in (("a", 4, 7.0), ("b", 3, 6.0))}
    with pytest.raises(ValueError, match="parameter group 0: the saved step counts disagree"):
        _fill_partition(zero, 0, flat, disagreeing, names)


def test_a_rank_that_fails_to_re_partition_makes_every_rank_raise(monkeypatch):
    """Otherwise the others would wait for it in their next collective until the timeout."""
    from m2r.engine import zero_state

    def fails(engine, ref):
        raise OSError("shard-3 unreadable")
    monkeypatch.setattr(zero_state, "_load_resharded", fails)
    with pytest.raises(OSError, match="shard-3 unreadable"):
        zero_state.load_resharded_optimizer_state(None, None)
    monkeypatch.setattr(zero_state, "_load_resharded", lambda engine, ref: True)
    monkeypatch.setattr(dist, "max_over_ranks", lambda value: max(value, zero_state._FAILED))  # another rank failed
    with pytest.raises(RuntimeError, match="another rank could not re-partition the optimizer state"):
        zero_state.load_resharded_optimizer_state(None, None)


def test_every_resume_takes_this_runs_eps_and_weight_decay_too():
    from m2r.engine.optim import apply_optimizer_settings

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
    apply_optimizer_settings(opt, SimpleNamespace(betas=[0.5, 0.9], eps=1e-6, weight_decay=0.0))
    group = opt.param_groups[0]
    assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.5, 0.9), 1e-6, 0.0)


def test_moments_and_steps_are_stitched_from_their_own_parameter_group(tmp_path):
    from m2r.engine.checkpoint import CheckpointRef
    from m2r.engine.zero_state import stitched_zero_state

    tag = tmp_path / "step00000001"
    tag.mkdir()
    for rank in range(2):
        groups = [torch.arange(2.0) + 10 * rank, torch.arange(2.0) + 100 + 10 * rank]
        state = {g: {"exp_avg": groups[g] + 1000, "exp_avg_sq": groups[g] + 2000, "step": torch.tensor(5.0 + g)}
                 for g in range(2)}
        torch.save({"optimizer_state_dict": {
            "single_partition_of_fp32_groups": groups,
            "base_optimizer_state": {"state": state},
            "param_slice_mappings": [{"dense.weight": SimpleNamespace(start=0, numel=2)},
                                     {"other.weight": SimpleNamespace(start=0, numel=2)}]}},
                   tag / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    got = stitched_zero_state(CheckpointRef(tmp_path, tag.name), 1, 4, ("fp32", "exp_avg", "exp_avg_sq", "step"))
    assert got["other.weight"]["fp32"].tolist() == [100, 101, 110, 111]
    assert got["other.weight"]["exp_avg"].tolist() == [1100, 1101, 1110, 1111]
    assert got["other.weight"]["exp_avg_sq"].tolist() == [2100, 2101, 2110, 2111]
    assert float(got["other.weight"]["step"]) == 6.0 and float(got["dense.weight"]["step"]) == 5.0
    only = stitched_zero_state(CheckpointRef(tmp_path, tag.name), 1, 4, ("fp32",), wanted={"other.weight"})
    assert list(only) == ["other.weight"]


def test_a_rank_holding_no_stepped_fragment_reports_what_the_others_saved(monkeypatch):
    """Every rank's answer is the agreement over ranks, not its own (a rank may hold no fragment)."""
    from m2r.engine import zero_state

    monkeypatch.setattr(zero_state, "_load_resharded", lambda engine, ref: False)
    monkeypatch.setattr(dist, "max_over_ranks", lambda value: max(value, 1.0))   # another rank had stepped
    assert zero_state.load_resharded_optimizer_state(None, None) is True


def _stub(topology, train, saved_train):
    from m2r.engine import run

    ref = SimpleNamespace(path=Path("/ck/step3"), saved_config=lambda: {"train": saved_train})
    stub = SimpleNamespace(topology=topology, POSITION="the data stream position", engine=None,
                           cfg=SimpleNamespace(train=train))
    stub._global_batch_change = lambda r, s: run.TrainingRun._global_batch_change(stub, r, s)
    return run, stub, ref


def _warning(capsys, saved, current, same_ranks, carry, train=None, saved_train=None):
    train = train or SimpleNamespace(micro_batch=1, grad_accum=1)
    saved_train = saved_train or {"micro_batch": 1, "grad_accum": 1}
    run, stub, ref = _stub(current, train, saved_train)
    run.TrainingRun._warn_topology_change(stub, ref, saved, same_ranks, carry)
    return capsys.readouterr().out


def test_a_checkpoint_saved_before_the_first_step_still_carries_the_masters(monkeypatch):
    from m2r.engine import run

    monkeypatch.setattr(run, "load_resharded_optimizer_state", lambda engine, ref: False)
    _, stub, ref = _stub(Topology(2, 1, "bf16", 1), None, None)
    carry = run.TrainingRun._carry_optimizer(stub, ref, Topology(1, 1, "bf16", 2))
    assert carry.masters and not carry.adamw and "precedes the first optimizer step" in carry.why_not


def test_the_loss_scale_is_named_only_between_fp16_runs_and_lost_only_with_the_optimizer(capsys):
    from m2r.engine.run import OptimizerCarry

    carried = OptimizerCarry(masters=True, adamw=True)
    restart = OptimizerCarry(masters=False, adamw=False, why_not="the optimizer restarts: ZeRO stage 0")
    assert "loss scale" not in _warning(capsys, Topology(2, 2, "fp16", 1), Topology(2, 2, "bf16", 1), True, carried)
    kept = _warning(capsys, Topology(2, 2, "fp16", 1), Topology(4, 2, "fp16", 2), False, carried)
    assert "the fp16 loss scale" in kept.split("LOST")[0] and "loss scale" not in kept.split("LOST")[1]
    lost = _warning(capsys, Topology(2, 2, "fp16", 0), Topology(2, 2, "fp16", 1), True, restart)
    assert "the fp16 loss scale (starts again from its initial value)" in lost.split("LOST")[1]


def _fp16_shard_with_scaler(tmp_path, scaler, precision="fp16") -> "CheckpointRef":
    tag = tmp_path / "step00000400"
    tag.mkdir(parents=True)
    (tag / "meta.json").write_text(json.dumps({"world_size": 2, "ep_size": 1, "precision": precision,
                                               "zero_stage": 1}))
    torch.save({"optimizer_state_dict": {"loss_scaler": scaler, "param_slice_mappings": [{}]}},
               tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    return CheckpointRef(tmp_path, tag.name)


def _dynamic_scaler(scale_window=1000):
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    return DynamicLossScaler(init_scale=2.0 ** 16, scale_window=scale_window, min_scale=1, delayed_shift=2,
                             consecutive_hysteresis=False)


def test_an_fp16_run_on_another_topology_continues_from_the_saved_loss_scale_with_its_own_settings(tmp_path):
    """Restarting at 2^16 would skip steps on overflows until the scale found its level again; the saved
    progress comes, the window (a setting) stays this run's."""
    from m2r.engine.zero_state import carry_loss_scale

    saved = _dynamic_scaler()
    saved.cur_scale, saved.cur_iter, saved.last_overflow_iter, saved.cur_hysteresis = 512.0, 4000, 3990, 1
    live = SimpleNamespace(loss_scaler=_dynamic_scaler(scale_window=50))
    assert carry_loss_scale(live, _fp16_shard_with_scaler(tmp_path, saved))
    scaler = live.loss_scaler
    assert (scaler.cur_scale, scaler.cur_iter, scaler.last_overflow_iter, scaler.cur_hysteresis) == (512.0, 4000, 3990, 1)
    assert scaler.scale_window == 50


def test_a_loss_scale_comes_only_from_an_fp16_checkpoint_into_an_fp16_run(tmp_path):
    from m2r.engine.zero_state import carry_loss_scale

    saved = _dynamic_scaler()
    saved.cur_scale = 512.0
    bf16_ref = _fp16_shard_with_scaler(tmp_path / "bf16", saved, precision="bf16")
    live = SimpleNamespace(loss_scaler=_dynamic_scaler())
    assert not carry_loss_scale(live, bf16_ref) and live.loss_scaler.cur_scale == 2.0 ** 16
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    static = SimpleNamespace(loss_scaler=LossScaler(1.0))   # what a bf16 or fp32 ZeRO optimizer holds
    assert not carry_loss_scale(static, _fp16_shard_with_scaler(tmp_path / "fp16", saved))
    assert static.loss_scaler.cur_scale == 1.0


def test_the_masters_are_named_lost_only_when_a_low_precision_run_is_involved(capsys):
    from m2r.engine.run import OptimizerCarry

    restart = OptimizerCarry(masters=False, adamw=False, why_not="the optimizer restarts: ZeRO stage 0")
    low = _warning(capsys, Topology(2, 2, "bf16", 0), Topology(2, 2, "bf16", 1), True, restart)
    assert "the fp32 master weights (rebuilt from the low-precision module weights)" in low
    assert "fp32 master weights" not in _warning(capsys, Topology(2, 2, "fp32", 0), Topology(2, 2, "fp32", 1), True,
                                                 restart)


def test_the_global_batch_line_uses_the_checkpoints_own_batch_settings(capsys):
    from m2r.engine.run import OptimizerCarry

    out = _warning(capsys, Topology(2, 2, "fp32", 2), Topology(2, 2, "fp32", 1), True,
                   OptimizerCarry(masters=True, adamw=True), train=SimpleNamespace(micro_batch=2, grad_accum=1),
                   saved_train={"micro_batch": 1, "grad_accum": 2})
    assert "global batch" not in out   # 1*2*2 == 2*1*2
    out = _warning(capsys, Topology(2, 2, "fp32", 2), Topology(4, 2, "fp32", 2), False,
                   OptimizerCarry(masters=True, adamw=True), train=SimpleNamespace(micro_batch=1, grad_accum=1),
                   saved_train={"micro_batch": 1, "grad_accum": 4})
    assert "The global batch changes from 8 to 4 images per step" in out


def test_the_optimizer_follows_a_topology_change_between_zero_stages_1_and_2_only():
    from m2r.engine.zero_state import why_not_carried

    assert why_not_carried(Topology(8, 8, "bf16", 2), Topology(4, 2, "fp32", 1)) is None
    for saved, current in ((0, 1), (1, 0)):
        reason = why_not_carried(Topology(2, 1, "fp32", saved), Topology(1, 1, "fp32", current))
        assert "ZeRO stage 0" in reason


def test_resuming_from_another_runs_checkpoint_leaves_that_runs_newer_checkpoints_in_place(tmp_path):
    """run.resume=<other run>/checkpoints/step10 must not reorganise the other run's directory."""
    from m2r.engine.checkpoint import set_aside_newer_tags

    other, mine = tmp_path / "other" / "checkpoints", tmp_path / "mine" / "checkpoints"
    manager, config = CheckpointManager(other, keep_last=3), load_config(PretrainConfig)
    for step in (10, 20, 30):
        manager.save(FakeEngine(), step, Topology(1, 1, "fp32", 1), {"step": step}, config)
    assert set_aside_newer_tags(CheckpointRef(other, tag_for(10)), mine) == []
    assert manager.tags() == [tag_for(10), tag_for(20), tag_for(30)] and not (other / "abandoned").exists()


def test_a_step_abandoned_twice_keeps_both_copies(tmp_path):
    """Resume step 20, train to 30 again, resume step 20 again: both abandoned step-30 tags stay."""
    from m2r.engine.checkpoint import set_aside_newer_tags

    manager, config = CheckpointManager(tmp_path, keep_last=3), load_config(PretrainConfig)
    for step in (10, 20, 30):
        manager.save(FakeEngine(), step, Topology(1, 1, "fp32", 1), {"step": step, "branch": 1}, config)
    assert set_aside_newer_tags(CheckpointRef(tmp_path, tag_for(20)), tmp_path) == [tag_for(30)]
    manager.save(FakeEngine(), 30, Topology(1, 1, "fp32", 1), {"step": 30, "branch": 2}, config)
    assert set_aside_newer_tags(CheckpointRef(tmp_path, tag_for(20)), tmp_path) == [tag_for(30)]
    abandoned = tmp_path / "abandoned"
    assert sorted(p.name for p in abandoned.iterdir()) == [tag_for(30), tag_for(30) + "+"]
    branches = {p.name: torch.load(p / "mp_rank_00_model_states.pt")["branch"] for p in abandoned.iterdir()}
    assert branches == {tag_for(30): 1, tag_for(30) + "+": 2}
    assert manager.tags() == [tag_for(10), tag_for(20)]


def test_the_ema_files_of_an_expert_parallel_group_merge_into_every_weight_once(tmp_path):
    """Rank 0 holds the dense weights and its experts, rank 1 only its experts (global ids)."""
    from m2r.engine.checkpoint import load_ema_states

    tag = tmp_path / tag_for(5)
    tag.mkdir()
    rank0 = {"conv.weight": torch.ones(2), "dder1.experts.0.w": torch.full((2,), 0.0)}
    rank1 = {"dder1.experts.1.w": torch.full((2,), 1.0)}
    torch.save(rank0, tag / "ema_rank00000.pt")
    torch.save(rank1, tag / "ema_rank00001.pt")
    merged = load_ema_states(CheckpointRef(tmp_path, tag_for(5)))
    assert sorted(merged) == ["conv.weight", "dder1.experts.0.w", "dder1.experts.1.w"]
    assert torch.equal(merged["dder1.experts.1.w"], rank1["dder1.experts.1.w"])


def test_a_local_rank_equal_to_the_gpu_count_is_refused_with_the_reason(monkeypatch):
    """Ranks 0-3 on a node showing 4 GPUs are fine; a fifth rank (local rank 4) has none."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    assert dist.device_for(dist.DistEnv(3, 8, 3, "srun")) == torch.device("cuda", 3)
    with pytest.raises(RuntimeError, match="local rank 4 has no GPU: 4 visible"):
        dist.device_for(dist.DistEnv(4, 8, 4, "srun"))


def _two_rank_worker(rank, store_path, out_dir, job):
    """One of two gloo ranks (torch.multiprocessing.spawn calls it with its rank)."""
    import torch.distributed as torch_dist

    from m2r.engine.checkpoint import agreed_resume

    torch_dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    out = {}
    try:
        if job == "collectives":
            out["max"] = dist.max_over_ranks(float([3, 7][rank]))
            out["broadcast"] = dist.broadcast_object(f"rank {rank}'s value")
            # rank 1 lags: its view of the shared run directory is still empty
            view = Path(out_dir) / ("run" if rank == 0 else "lagging_view")
            out["resume"] = getattr(agreed_resume("latest", view), "tag", None)
            try:
                agreed_resume("none", view)
                out["refusal"] = None
            except ConfigError as error:
                out["refusal"] = str(error)
            def refuse():
                raise ValueError("refused on rank 0")
            try:
                dist.on_rank0(refuse)
                out["error"] = None
            except ValueError as error:
                out["error"] = str(error)
            saved = {sig: signal.getsignal(sig) for sig in stop_signals.STOP_SIGNALS}
            try:
                request = stop_signals.StopRequest()
                if rank == 1:
                    signal.raise_signal(signal.SIGUSR1)
                out["stop"] = request.agreed_reason()
                out["agreed_signal"] = request.agreed_signal
            finally:
                for sig, handler in saved.items():
                    signal.signal(sig, handler)
        torch_dist.barrier()
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))
        torch_dist.destroy_process_group()


def test_two_ranks_agree_on_rank_0s_resume_its_refusals_and_the_stop_signal(tmp_path):
    """Rank 0 decides (its view of a shared filesystem may be ahead of rank 1's), its error is raised on
    every rank, max_over_ranks is the maximum, and a stop signal seen on one rank stops both."""
    import torch.multiprocessing as mp

    manager = CheckpointManager(tmp_path / "run", keep_last=2)
    manager.save(FakeEngine(), 7, Topology(2, 1, "fp32", 1), {"step": 7}, load_config(PretrainConfig))
    (tmp_path / "lagging_view").mkdir()
    mp.start_processes(_two_rank_worker, args=(str(tmp_path / "store"), str(tmp_path), "collectives"),
                       nprocs=2, join=True, start_method="spawn")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, out in enumerate(ranks):
        assert out["max"] == 7.0
        assert out["broadcast"] == "rank 0's value"
        assert out["resume"] == tag_for(7)
        assert "'none' starts a new run" in out["refusal"]
        assert out["error"] == "refused on rank 0"
        assert out["agreed_signal"] == "SIGUSR1"
        assert out["stop"] == ("received SIGUSR1" + (" (on another rank)" if rank == 0 else ""))


class _Clock:
    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


def test_step_timer_counts_each_steps_own_time_and_forgets_time_between_steps(monkeypatch):
    """img/s and the data-wait share cover the training steps since the last report only."""
    from m2r.engine import monitor as monitor_module

    clock = _Clock()
    monkeypatch.setattr(monitor_module, "time", clock)
    timer = monitor_module.StepTimer()
    clock.now = 1.0
    timer.add_data_wait(0.25)
    timer.end_step(4)
    clock.now = 3.0
    timer.end_step(4)
    assert timer.take() == pytest.approx({"img_per_s": 8 / 3, "data_wait_share": 0.25 / 3})
    clock.now = 13.0   # validation and a checkpoint
    timer.restart()
    clock.now = 14.0
    timer.end_step(2)
    assert timer.take() == pytest.approx({"img_per_s": 2.0, "data_wait_share": 0.0})


def test_the_image_grid_shows_degraded_restored_clean_rows_with_the_restored_clamped():
    from m2r.engine.validate import image_grid

    lq, gt = torch.full((5, 3, 2, 4), 0.25), torch.full((5, 3, 2, 4), 0.75)
    restored = torch.tensor([-1.0, 2.0]).repeat_interleave(4).reshape(1, 1, 2, 4).expand(5, 3, 2, 4)
    grid = image_grid(lq, restored, gt, max_images=3)
    assert grid.shape == (3, 3 * 2, 3 * 4) and grid.dtype == torch.float32
    row = grid[:, :2]
    assert torch.equal(row[..., :4], lq[0]) and torch.equal(row[..., 8:], gt[0])
    assert torch.equal(row[:, 0, 4:8], torch.zeros(3, 4)) and torch.equal(row[:, 1, 4:8], torch.ones(3, 4))
