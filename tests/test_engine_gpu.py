"""The DeepSpeed engine on a GPU: nccl, bf16 with ZeRO 1 and 2, MoE parameter groups, mamba_ssm kernels,
the AFLB FFT under bf16, a checkpoint round trip, the pretraining entry point with every speed switch,
and fp16 with its loss scale across a resume. One rank; skipped without CUDA."""
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from m2r import dist
from m2r.config import load_config
from m2r.engine.config import PretrainConfig
from m2r.engine.deepspeed_config import build_deepspeed_config
from m2r.engine.loss import restoration_loss
from m2r.engine.optim import build_optimizer
from m2r.models.m2restore import build_model

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def make_engine(cfg):
    import deepspeed

    model = build_model(cfg.model)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg.train),
                                           config=build_deepspeed_config(cfg.train, 1), dist_init_required=False)
    return engine


def train_step(engine, cfg, lq, gt):
    loss = restoration_loss(engine(lq.bfloat16()), gt, cfg.train, cfg.model.moe.balance_loss_weight).total
    engine.backward(loss)
    engine.step()
    return loss.item()


@pytest.fixture(scope="module")
def device():
    """One nccl process group for the in-process tests, ended after them."""
    yield dist.init_distributed(dist.discover_dist_env())
    dist.destroy_process_group()


# bf16 sums micro-batch gradients in bf16 at ZeRO 1 and in fp32 at ZeRO 2 (m2r/engine/deepspeed_config.py).
@pytest.mark.parametrize("zero_stage", [1, 2])
def test_bf16_zero_moe_training_and_checkpoint_round_trip_on_gpu(tmp_path, repo_root, device, zero_stage):
    cfg = load_config(PretrainConfig, os.path.join(repo_root, "configs/pretrain/tiny-test.yaml"),
                      ["train.precision=bf16", f"train.zero_stage={zero_stage}", "model.scan_backend=mamba_ssm"])
    generator = torch.Generator().manual_seed(0)
    gt = torch.rand(2, 3, 64, 64, generator=generator)
    lq = (gt + 0.2 * torch.randn(2, 3, 64, 64, generator=generator)).clamp(0, 1)
    lq, gt = lq.to(device), gt.to(device)

    engine = make_engine(cfg)
    engine.eval()  # deterministic routing, so the resumed engine must give the same loss
    losses = [train_step(engine, cfg, lq, gt) for _ in range(6)]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses

    engine.save_checkpoint(str(tmp_path), tag="step6")
    expected_next = train_step(engine, cfg, lq, gt)
    resumed = make_engine(cfg)
    resumed.load_checkpoint(str(tmp_path), tag="step6")
    resumed.eval()
    assert train_step(resumed, cfg, lq, gt) == pytest.approx(expected_next, rel=1e-3)


def synthetic_shards(tmp_path) -> str:
    """Shards of smooth random colour images (the GPU machine may lack scikit-image for the built-in photos), as
    bench/engine_speed.py writes them, at a side the tests' crops fit."""
    spec = importlib.util.spec_from_file_location("engine_speed", f"{REPO}/bench/engine_speed.py")
    engine_speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(engine_speed)   # it puts bench/ on sys.path for its train_speed
    return str(engine_speed.write_synthetic_shards(tmp_path, side=96))


def _pretrain_on_one_gpu(repo_root, run_dir, shards, *overrides, timeout: int) -> str:
    """pretrain.py on the tiny model and synthetic shards under torchrun, one GPU; its stdout. (Not the
    built-in photos: they are scikit-image's, which the GPU machine lacks.) In a session of its own, killed
    whole at `timeout` (under pytest-timeout's limit), so that no orphaned worker holds the GPU afterwards."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
               str(dist.free_port()), "pretrain.py", "--config", "configs/pretrain/tiny-test.yaml",
               f"run.dir={run_dir}", "run.tensorboard=false", "data.source=shards", f"data.shards={shards}",
               f"data.val_shards={shards}", *overrides]
    # Keep the inherited PYTHONPATH: on the GPU machine the carried wheels are installed there.
    python_path = os.pathsep.join(filter(None, [repo_root, env.get("PYTHONPATH")]))
    process = subprocess.Popen(command, cwd=repo_root, env=dict(env, PYTHONPATH=python_path), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"pretrain.py still running after {timeout} s\n{stdout[-3000:]}\n{stderr[-3000:]}")
    assert process.returncode == 0, f"{stdout[-3000:]}\n{stderr[-3000:]}"
    return stdout


@pytest.mark.parametrize("workers", [0, 1])
def test_training_batches_come_page_locked_so_their_copies_to_the_gpu_do_not_block(tmp_path, device, workers):
    """A pageable batch's copy waits for every kernel queued before it; a page-locked one is asynchronous.
    (Synthetic shards: the built-in photos are scikit-image's.)"""
    from m2r.data import DataConfig, build_train_stream

    cfg = DataConfig(source="shards", shards=synthetic_shards(tmp_path), preset="cdd11", workers=workers)
    batches = iter(build_train_stream(cfg, seed=1, rank=0, world_size=1, micro_batch=2, crop=64, pin_memory=True))
    batch = next(batches)
    batches.close()
    assert batch["lq"].is_pinned() and batch["gt"].is_pinned()


def test_fp16_trains_and_continues_its_loss_scale_at_another_zero_stage(tmp_path, repo_root):
    """fp16 (DeepSpeed's dynamic loss scaling) trains and saves; resumed at ZeRO 2 from a ZeRO 1 checkpoint
    (a topology change), the loss scaler's progress comes with the optimizer: its iteration count goes on
    from 3 to 5 instead of starting again."""
    shards, run_dir = synthetic_shards(tmp_path), tmp_path / "run"
    quiet = ("model.moe.ep_size=1", "run.image_every=0", "run.val_every=1000")
    _pretrain_on_one_gpu(repo_root, run_dir, shards, *quiet, "train.precision=fp16", "train.zero_stage=1",
                         "train.steps=3", timeout=55)
    out = _pretrain_on_one_gpu(repo_root, run_dir, shards, *quiet, "train.precision=fp16", "train.zero_stage=2",
                               "train.steps=5", timeout=55)
    assert "the fp16 loss scale" in out.split("Loaded:")[1].split("LOST")[0]
    (shard,) = (run_dir / "checkpoints/step00000005").glob("*zero_pp_rank_0_*optim_states.pt")
    scaler = torch.load(shard, map_location="cpu", weights_only=False)["optimizer_state_dict"]["loss_scaler"]
    assert scaler.cur_iter == 5
    steps = [record for record in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if "loss" in record]
    assert all(math.isfinite(record["loss"]) for record in steps)
    # run.log_every=1: every step reports the loss scale and whether DeepSpeed skipped it (an overflow)
    assert [record["step"] for record in steps if "loss_scale" in record] == [1, 2, 3, 4, 5]
    assert all(record["loss_scale"] >= 1 and record["skipped_steps"] in (0, 1) for record in steps)


def test_pretrain_entry_point_with_every_speed_switch_on_gpu(tmp_path, repo_root):
    """The whole pretraining loop (shard stream, validation, images, checkpoint) under nccl on one GPU,
    with bf16, ZeRO 2, channels_last, a compiled training forward and full-resolution recomputation.
    Last of the file: inductor's first compilation is the slowest of these tests."""
    shards, run_dir = synthetic_shards(tmp_path), tmp_path / "run"
    out = _pretrain_on_one_gpu(repo_root, run_dir, shards, "train.precision=bf16", "train.zero_stage=2",
                               "train.channels_last=true", "train.compile=true",
                               "train.activation_checkpointing=full_res", "train.steps=4", "train.crop=64",
                               "model.scan_backend=mamba_ssm", timeout=110)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses), losses
    assert any("val_psnr" in r for r in records)
    assert (run_dir / "checkpoints" / "latest").exists()
    assert "compile True" in out and "cudnn_benchmark True" in out
