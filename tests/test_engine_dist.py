"""Multi-rank acceptance of the pretraining engine: real `torchrun` / `deepspeed` launches on CPU + gloo.

Launches are shared between tests through module fixtures (each costs 10-30 s), and results are
read from what the runs wrote before teardown (metrics.jsonl, TensorBoard, checkpoints).
"""
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from m2r.dist import free_port

REPO = Path(__file__).resolve().parents[1]
TINY = "configs/pretrain/tiny-test.yaml"
LAUNCH_TIMEOUT = 300


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO),
                PYTHONUNBUFFERED="1")


def torchrun_command(nproc, script, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port()), script, *args]


def run_launch(command, timeout=LAUNCH_TIMEOUT, env_extra=()):
    result = subprocess.run(command, cwd=REPO, env=dict(_env(), **dict(env_extra)), capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def pretrain(run_dir, *overrides, nproc=2):
    return run_launch(torchrun_command(nproc, "pretrain.py", "--config", TINY, f"run.dir={run_dir}", *overrides))


def metric_records(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir):
    return {r["step"]: r["loss"] for r in metric_records(run_dir) if "loss" in r}


def val_records(run_dir):
    return {r["step"]: r for r in metric_records(run_dir) if "val_psnr" in r}


# ----------------------------------------------------------------------------------- expert parallel parity
FP32_PARITY = ("train.precision=fp32", "train.steps=5", "run.val_every=5", "run.image_every=2",
               "model.moe.noisy_gating=false", "train.ema_decay=0.5")


@pytest.fixture(scope="module")
def parity_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    runs = {}
    for zero in (1, 2):
        for ep in (1, 2):
            runs[ep, zero] = root / f"ep{ep}-zero{zero}"
            pretrain(runs[ep, zero], *FP32_PARITY, f"model.moe.ep_size={ep}", f"train.zero_stage={zero}")
    return runs


@pytest.mark.parametrize("zero", [1, 2])
def test_expert_parallel_gives_the_same_losses_as_replicated_experts(parity_runs, zero):
    replicated, parallel = train_losses(parity_runs[1, zero]), train_losses(parity_runs[2, zero])
    assert sorted(replicated) == [1, 2, 3, 4, 5]
    assert parallel[1] == replicated[1]  # the same forward, bit for bit
    # Later steps: an expert's gradient sums the same token terms in another order (all-to-all vs
    # all-reduce), so fp32 rounding may differ in the last bits; a wrong gradient scale would not.
    assert parallel == pytest.approx(replicated, rel=1e-6, abs=0)


def test_each_step_trains_at_the_schedules_rate_for_its_index(parity_runs):
    """Step n (1-based, as logged) is optimizer step n - 1 of `learning_rate`: warmup 2, then the cosine."""
    from m2r.config import load_config
    from m2r.engine.config import PretrainConfig
    from m2r.engine.optim import LRSchedule, learning_rate

    cfg = load_config(PretrainConfig, parity_runs[1, 1] / "config.yaml")
    logged = {r["step"]: r["lr"] for r in metric_records(parity_runs[1, 1]) if "lr" in r}
    assert list(logged) == [1, 2, 3, 4, 5]
    schedule = LRSchedule.of_steps(cfg.train)
    assert list(logged.values()) == pytest.approx([learning_rate(step - 1, schedule) for step in logged])


def test_the_ema_is_saved_once_at_any_expert_parallel_size(parity_runs):
    """World 2: at ep_size 1 rank 0 alone holds every expert, at ep_size 2 each rank half of them; the
    merged EMA is the same network's either way."""
    from m2r.engine.checkpoint import CheckpointRef, load_ema_states

    refs = {ep: CheckpointRef(parity_runs[ep, 1] / "checkpoints", "step00000005") for ep in (1, 2)}
    assert sorted(p.name for p in refs[1].path.glob("ema_rank*.pt")) == ["ema_rank00000.pt"]
    assert sorted(p.name for p in refs[2].path.glob("ema_rank*.pt")) == ["ema_rank00000.pt", "ema_rank00001.pt"]
    replicated, parallel = load_ema_states(refs[1]), load_ema_states(refs[2])
    assert sorted(replicated) == sorted(parallel) and any(".deepspeed_experts.3." in name for name in parallel)
    for name in replicated:
        torch.testing.assert_close(parallel[name], replicated[name], rtol=1e-3, atol=1e-5)   # summation order


def test_tensorboard_holds_the_scalars_and_an_image(parity_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(parity_runs[2, 2] / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    expected = {f"train/{name}" for name in ("loss", "loss_avg", "pixel_loss", "balance_loss", "lr", "grad_norm",
                                              "img_per_s", "img_per_s_per_gpu", "data_wait_share")}
    expected |= {"val/psnr", "val/ssim", "val/psnr_rain", "moe/level1/expert0", "moe/level3/expert3",
                 "moe/level1/max_load", "moe/level3/max_load"}
    assert expected <= scalars, expected - scalars
    assert not any(tag.endswith("/dropped") for tag in scalars)   # model.moe.capacity_factor 0: nothing dropped
    assert "train/gpu_mem_gib" not in scalars   # a CPU run has no GPU memory to report
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5]
    seen = {tag: events.Scalars(tag)[-1] for tag in scalars if tag.startswith("data/samples_")}
    assert len(seen) == 11 and {e.step for e in seen.values()} == {5}  # the cdd11 preset's types
    assert sum(e.value for e in seen.values()) == 5 * 2 * 2  # steps x micro batch x ranks, summed over ranks
    assert len(events.Images("images/val")) >= 1
    assert (parity_runs[2, 2] / "config.yaml").is_file()


def test_export_then_single_process_load_gives_the_engine_outputs(parity_runs, tmp_path):
    from m2r.config import load_config
    from m2r.data import build_val_set
    from m2r.engine.config import PretrainConfig
    from m2r.data.presets import type_names
    from m2r.engine.validate import validation_metrics
    from m2r.atomic import default_file_mode
    from m2r.eval.loading import load_inference_model
    from m2r.export import export

    run = parity_runs[2, 2]   # with an EMA, which validation saw and --ema exports
    out = export(str(run / "checkpoints"), str(tmp_path / "model.safetensors"), use_ema=True)
    assert stat.S_IMODE(out.stat().st_mode) == default_file_mode()   # readable by teammates, as any new file
    model = load_inference_model(str(out), torch.device("cpu"))
    cfg = load_config(PretrainConfig, run / "config.yaml")
    metrics = validation_metrics(model, build_val_set(cfg.data, cfg.train.crop), torch.device("cpu"),
                                 torch.float32, type_names(cfg.data.preset))
    engine_metrics = val_records(run)[5]
    assert metrics["psnr"] == pytest.approx(engine_metrics["val_psnr"], abs=1e-4)
    assert metrics["ssim"] == pytest.approx(engine_metrics["val_ssim"], abs=1e-5)


def evaluate_pretrain_val(weights, out):
    """`python -m m2r.evaluate --pretrain-val` on the CPU; its results.json."""
    run_launch([sys.executable, "-m", "m2r.evaluate", "--weights", str(weights), "--pretrain-val", "--out", str(out)],
               env_extra={"CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"})
    return json.loads((Path(out) / "results.json").read_text())


def test_evaluate_pretrain_val_gives_the_validation_an_fp32_run_logged(parity_runs, tmp_path):
    """Expert parallel over two ranks in training, every expert in one process here: the same numbers."""
    run = parity_runs[2, 2]
    result = evaluate_pretrain_val(run, tmp_path / "val")
    logged = val_records(run)[5]
    assert (result["step"], result["validated_weights"], result["precision"]) == (5, "ema", "fp32")
    assert result["val"].keys() == logged.keys() - {"step", "time"}   # the overall PSNR/SSIM and each type's PSNR
    assert result["logged"] == {name: logged[name] for name in result["val"]}
    for name, value in result["val"].items():
        assert value == pytest.approx(logged[name], abs=1e-5), name


def test_evaluate_pretrain_val_recomputes_each_checkpoints_step_with_a_bf16_runs_ema(tmp_path):
    """A run directory names its newest checkpoint, a tag directory an older one; each gives its step's record,
    every number of it, though two ranks split the experts and the batches in training and one process holds
    them all here. Casting the frozen CLIP prior to bf16 with the network (`model.to`, where the engine leaves it
    fp32) would be 1e-4 dB away (1e-3 dB on a type), scoring the EMA in fp32 2e-3 dB and the trained weights
    in bf16 1e-2 dB."""
    run = tmp_path / "run"
    pretrain(run, "train.precision=bf16", "train.zero_stage=1", "model.moe.ep_size=2", "train.steps=4",
             "train.warmup_steps=1", "run.val_every=2", "run.save_every=2", "run.image_every=0",
             "train.ema_decay=0.5")
    logged = val_records(run)
    for weights, step in ((run, 4), (run / "checkpoints" / "step00000002", 2)):
        result = evaluate_pretrain_val(weights, tmp_path / f"val{step}")
        assert (result["step"], result["validated_weights"], result["precision"]) == (step, "ema", "bf16")
        assert result["val"].keys() == logged[step].keys() - {"step", "time"}
        for name, value in result["val"].items():   # float64 sums over the ranks add in another order
            assert value == pytest.approx(logged[step][name], abs=1e-9), (step, name)
    assert logged[2]["val_psnr"] != pytest.approx(logged[4]["val_psnr"], abs=5e-3)   # the steps are told apart


def test_export_refuses_an_incomplete_or_damaged_checkpoint_and_another_suffix(parity_runs, tmp_path):
    import shutil

    from m2r.config import ConfigError
    from m2r.export import export
    from m2r.models.convert import CheckpointMismatch

    tag = tmp_path / "checkpoints" / "step00000005"
    shutil.copytree(parity_runs[2, 2] / "checkpoints" / "step00000005", tag)
    with pytest.raises(ConfigError, match="safetensors"):
        export(str(tag), str(tmp_path / "model.pt"))
    (tag / "layer_1_expert_2_mp_rank_00_model_states.pt").unlink()
    for path in tag.glob("layer_2_expert_*"):   # the last layer's, all of them
        path.unlink()
    with pytest.raises(CheckpointMismatch, match=r"lacks the files of 5 experts \(layer 1 expert 2, layer 2 expert 0"):
        export(str(tag), str(tmp_path / "model.safetensors"))
    dense = tag / "mp_rank_00_model_states.pt"
    dense.write_bytes(dense.read_bytes()[:1000])
    with pytest.raises(CheckpointMismatch, match="mp_rank_00_model_states.pt is not a readable checkpoint"):
        export(str(tag), str(tmp_path / "model.safetensors"))
    assert not (tmp_path / "model.safetensors").exists()


# ----------------------------------------------------------------------------------- exact resume, topology change
RESUME = ("train.precision=bf16", "train.zero_stage=2", "model.moe.ep_size=2", "model.moe.noisy_gating=true",
          "data.workers=1", "train.steps=6", "run.val_every=100", "run.image_every=0", "train.ema_decay=0.9")


@pytest.fixture(scope="module")
def resume_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    straight, split = root / "straight", root / "split"
    pretrain(straight, *RESUME)
    first = pretrain(split, *RESUME, "run.stop_after_steps=3")
    second = pretrain(split, *RESUME)
    return {"straight": straight, "split": split, "first_output": first, "second_output": second}


def test_resuming_continues_exactly_where_the_run_stopped(resume_runs):
    assert "stopping at step 3: run.stop_after_steps=3" in resume_runs["first_output"]
    assert "at step 3" in resume_runs["second_output"] and "resumed from" in resume_runs["second_output"]
    straight, split = train_losses(resume_runs["straight"]), train_losses(resume_runs["split"])
    assert sorted(straight) == [1, 2, 3, 4, 5, 6]
    assert split == straight


def test_the_ema_is_saved_once_and_resumes_exactly(resume_runs):
    """Rank 0 saves the dense EMA weights and its experts, rank 1 (the rest of the expert-parallel
    group) only its experts: every weight once, whatever the world size."""
    from m2r.engine.checkpoint import CheckpointRef, load_ema_states

    split, straight = (CheckpointRef(resume_runs[run] / "checkpoints", "step00000006") for run in ("split", "straight"))
    rank0, rank1 = (torch.load(split.path / f"ema_rank0000{rank}.pt") for rank in (0, 1))
    assert any(".deepspeed_experts." not in name for name in rank0)
    assert rank1 and all(".deepspeed_experts." in name for name in rank1) and not set(rank0) & set(rank1)
    resumed, uninterrupted = load_ema_states(split), load_ema_states(straight)
    assert sorted(resumed) == sorted(uninterrupted)
    assert all(torch.equal(resumed[name], uninterrupted[name]) for name in resumed)


def test_a_capacity_s_dropped_share_and_the_largest_load_are_logged_per_level(tmp_path):
    """A capacity of half the even share per expert drops at least half of the assignments (at most 1/2 kept)."""
    out = pretrain(tmp_path, "model.moe.capacity_factor=0.5", "run.stop_after_steps=2", nproc=1)
    records = [r for r in metric_records(tmp_path) if "moe/level1/max_load" in r]
    assert [r["step"] for r in records] == [1, 2]   # run.log_every=1
    num_experts = 4   # configs/model/tiny.yaml
    for record, level in ((r, level) for r in records for level in (1, 2, 3)):
        assert 1 / num_experts <= record[f"moe/level{level}/max_load"] <= 1
        assert 0.45 <= record[f"moe/level{level}/dropped"] < 1
    assert re.search(r"^step 2/6 .*\| drop [\d.]+/[\d.]+/[\d.]+% \|", out, re.MULTILINE), out


def test_a_bf16_runs_ema_averages_the_fp32_master_weights_not_their_bf16_copies(tmp_path):
    """With a decay near 0 the EMA is the last fp32 masters (partitioned over both ranks at ZeRO 1, the
    experts over ep_size 2), assembled for validation and the save; an average of the module's bf16
    copies would be about 1e-3 away."""
    from m2r.engine.checkpoint import CheckpointRef, load_ema_states
    from m2r.export import export_state_dict

    pretrain(tmp_path, "train.precision=bf16", "train.zero_stage=1", "model.moe.ep_size=2", "train.steps=2",
             "train.warmup_steps=1", "run.val_every=2", "run.image_every=0", "train.ema_decay=1e-6")
    ref = CheckpointRef(tmp_path / "checkpoints", "step00000002")
    averaged, (masters, _) = load_ema_states(ref), export_state_dict(ref)
    assert averaged and averaged.keys() <= masters.keys()
    for name, weight in averaged.items():
        torch.testing.assert_close(weight, masters[name], rtol=1e-5, atol=1e-6, msg=name)
    assert not all(torch.equal(master, master.bfloat16().float()) for master in masters.values())
    assert 2 in val_records(tmp_path)


def test_a_resume_with_other_data_settings_draws_a_fresh_stream_and_says_so(resume_runs, tmp_path):
    """data.workers changes when a requeued job lands on nodes with other CPU counts."""
    run_dir = tmp_path / "copy"
    shutil.copytree(resume_runs["split"], run_dir)
    settings = [o for o in RESUME if not o.startswith(("data.workers", "train.steps"))]
    output = pretrain(run_dir, *settings, "data.workers=2", "train.steps=7")
    assert "WARNING: data settings changed since step00000006 (rank 0: data stream state does not match this " \
           "run: workers 1 -> 2)" in output
    assert "stopping at step 7: finished" in output


def test_a_refusal_decided_on_rank_0_reaches_every_rank_as_one_line(resume_runs):
    """run.resume=none on a run.dir that holds checkpoints: rank 0 resolves resume targets; without its
    error, rank 1 would wait in the broadcast until the launcher killed it (or, on nccl, for ever)."""
    half_written = resume_runs["split"] / "checkpoints" / "step00000009.partial"   # a failed save's leftover
    half_written.mkdir()
    command = torchrun_command(2, "pretrain.py", "--config", TINY, f"run.dir={resume_runs['split']}", *RESUME,
                               "run.resume=none")
    result = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert result.returncode != 0
    for rank in (0, 1):
        assert f"rank {rank}: error: config error: key 'run.resume': 'none' starts a new run" in result.stderr
    assert "m2r/engine" not in result.stderr   # no traceback through our code (the launcher prints its own)
    assert not half_written.exists()   # removed first, before anything could fail: a full disk's relief


@pytest.mark.parametrize("lost, overrides, expected", [
    ("layer_1_expert_3_mp_rank_00_model_states.pt", ("train.zero_stage=1",),   # a topology change: weights only
     "{tag} lacks the files of 1 experts (layer 1 expert 3): the checkpoint is incomplete (on rank 1); resume an "
     "older one with run.resume={older}"),
    ("layer_0_expert_2_mp_rank_00_model_states.pt", (),   # an exact resume: DeepSpeed's own load
     "{tag} lacks the files of 1 experts (layer 0 expert 2): the checkpoint is incomplete (on rank 1); resume an "
     "older one with run.resume={older}"),
    ("bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", (),   # read by rank 1 alone at an exact resume
     "{tag} lacks bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt, this rank's part of the optimizer state: the "
     "checkpoint is incomplete (on rank 1); resume an older one with run.resume={older}"),
    ("ema_rank00001.pt", (), "the EMA of {tag} lacks 24 weights, e.g. ["),
], ids=["expert_file_at_a_topology_change", "expert_file_at_the_same_topology", "optimizer_partition", "ema_file"])
def test_a_resume_from_a_checkpoint_lacking_one_ranks_files_stops_every_rank_with_one_line(resume_runs, tmp_path,
                                                                                           lost, overrides, expected):
    """Rank 1's expert file (each rank reads its own experts' files), its ZeRO partition of the optimizer state or
    its EMA file is lost: every rank prints the same error naming the checkpoint, what it lacks and the rank, and
    exits with the user-error status at once, instead of rank 1 alone while rank 0 goes on into its next collective
    (ended there by gloo or the failure watch, with a traceback that names no lost file)."""
    run_dir = tmp_path / "copy"
    shutil.copytree(resume_runs["split"], run_dir)
    tag = run_dir / "checkpoints" / "step00000006"
    (tag / lost).unlink()
    command = torchrun_command(2, "pretrain.py", "--config", TINY, f"run.dir={run_dir}", *RESUME, *overrides)
    result = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert "m2r/engine" not in result.stderr, result.stderr[-4000:]   # no traceback through our code
    message = expected.format(tag=tag, older=tag.with_name("step00000003"))
    for rank in (0, 1):
        assert f"rank {rank}: error: {message}" in result.stderr, result.stderr[-4000:]
        assert f"rank {rank}: exiting after CheckpointMismatch (status 2)" in result.stderr
    assert result.stderr.count("(on rank 1)") == 2


def test_old_checkpoints_are_pruned_to_the_last_two(resume_runs):
    checkpoints = resume_runs["split"] / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step00000006"
    # and nothing else: DeepSpeed's zero_to_fp32.py, which cannot read MoE checkpoints, is removed
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step00000003", "step00000006"]


def test_a_two_rank_ep2_checkpoint_resumes_on_one_rank_with_experts_by_global_id(resume_runs, tmp_path):
    from m2r.engine.checkpoint import resolve_resume
    from m2r.export import merged_module_state

    tag_dir = resume_runs["split"] / "checkpoints" / "step00000003"
    dump = tmp_path / "resumed.pt"
    output = run_launch([sys.executable, "tests/engine_dump_resumed.py", str(dump), "--config", TINY,
                         f"run.dir={tmp_path / 'one-rank'}", f"run.resume={tag_dir}",
                         *[o for o in RESUME if not o.startswith("model.moe.ep_size")], "model.moe.ep_size=1"])
    assert "TOPOLOGY CHANGE" in output and "world size 2, ep_size 2" in output and "(re-partitioned)" in output
    loaded = torch.load(f"{dump}.rank0")
    saved, _ = merged_module_state(resolve_resume(str(tag_dir), tag_dir.parent))
    experts = [name for name in saved if ".deepspeed_experts." in name]
    assert len(experts) == 3 * 4 * 4  # 3 adapters x 4 experts x (2 weights + 2 biases)
    assert saved.keys() == loaded.keys()
    for name in saved:
        assert torch.equal(loaded[name], saved[name]), name


def test_a_topology_change_re_partitions_the_optimizer_state(resume_runs, tmp_path):
    """World size 2 -> 3, ep_size 2 -> 1, ZeRO 2 -> 1: the three ranks' new ZeRO partitions (parameters
    split across them, padding at the end) hold every saved master weight, moment and step count, experts
    by global id, and the bf16 weights are the masters rounded."""
    from m2r.engine.checkpoint import CheckpointRef
    from m2r.engine.zero_state import MASTER, MOMENTS, stitched_zero_state

    tag_dir = resume_runs["split"] / "checkpoints" / "step00000003"
    dump = tmp_path / "resumed.pt"
    output = run_launch(torchrun_command(3, "tests/engine_dump_resumed.py", str(dump), "--config", TINY,
                                         f"run.dir={tmp_path / 'three-ranks'}", f"run.resume={tag_dir}",
                                         *[o for o in RESUME if not o.startswith(("model.moe.ep_size",
                                                                                  "train.zero_stage"))],
                                         "model.moe.ep_size=1", "train.zero_stage=1"))
    assert "Loaded: model weights; fp32 master weights, AdamW moments and step counts (re-partitioned); the EMA " \
        "weights; experts mapped by global id." in output
    assert "The global batch changes from 4 to 6 images per step; train.lr is not rescaled" in output
    live_tag = tmp_path / "live" / "step00000003"
    live_tag.mkdir(parents=True)
    for rank in range(3):
        shutil.copy(f"{dump}.zero.rank{rank}", live_tag / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    keys = (MASTER, *MOMENTS, "step")
    saved = stitched_zero_state(CheckpointRef(tag_dir.parent, tag_dir.name), 2, 4, keys)
    live = stitched_zero_state(CheckpointRef(live_tag.parent, live_tag.name), 1, 4, keys)
    assert len([name for name in saved if ".deepspeed_experts." in name]) == 3 * 4 * 4
    assert saved.keys() == live.keys()
    for rank in range(3):
        weights = torch.load(f"{dump}.rank{rank}")
        for name, state in saved.items():
            assert torch.equal(weights[name].flatten(), state[MASTER].bfloat16()), (rank, name)
    for name, state in saved.items():
        assert state.keys() == live[name].keys() == set(keys), name
        assert float(live[name]["step"]) == 3.0
        for key in (MASTER, *MOMENTS):
            assert torch.equal(live[name][key], state[key]), (name, key)


CARRY = ("train.precision=fp32", "train.zero_stage=2", "model.moe.ep_size=2", "model.moe.noisy_gating=false",
         "run.val_every=100", "run.image_every=0")


def test_after_a_topology_change_training_continues_as_from_an_exact_resume(tmp_path):
    """Every resume takes this run's AdamW betas (an exact load would bring back the saved ones). At the
    same world size and ep_size, a ZeRO stage change continues the data stream and RNGs exactly: steps
    4-6 train as after a resume at the saved topology. Changing ep_size too lays the ranks out anew, so
    the stream starts afresh; compared with a fresh stream at the saved topology (data.workers changes),
    the re-partitioned optimizer again trains as the exact resume does. Restarting AdamW there, as
    topology changes did before, changed step 5 by 2%."""
    pretrain(tmp_path / "base", *CARRY, "data.workers=1", "train.steps=3")
    checkpoint = f"run.resume={tmp_path / 'base' / 'checkpoints' / 'step00000003'}"
    variants = {"exact": (), "zero": ("train.zero_stage=1",), "exact-fresh": ("data.workers=2",),
                "layout": ("model.moe.ep_size=1", "train.zero_stage=1", "data.workers=2")}
    losses, outputs = {}, {}
    for name, changes in variants.items():
        changed_keys = {change.split("=")[0] for change in changes}
        settings = [s for s in (*CARRY, "data.workers=1") if s.split("=")[0] not in changed_keys]
        outputs[name] = pretrain(tmp_path / name, *settings, *changes, checkpoint, "train.steps=6",
                                 "train.betas=[0.5,0.9]")
        assert ("TOPOLOGY CHANGE" in outputs[name]) == (name in ("zero", "layout")), name
        losses[name] = train_losses(tmp_path / name)
    assert "Loaded: model weights; fp32 master weights, AdamW moments and step counts (re-partitioned); the data " \
        "stream position and the per-rank RNG states (same world size and ep_size); experts mapped by global " \
        "id. LOST: nothing." in outputs["zero"] and "global batch" not in outputs["zero"]
    assert "LOST: the data stream position (started afresh); the per-rank RNG states" in outputs["layout"]
    assert sorted(losses["layout"]) == [4, 5, 6]
    for step in (4, 5, 6):
        assert losses["zero"][step] == pytest.approx(losses["exact"][step], rel=1e-4), step
        assert losses["layout"][step] == pytest.approx(losses["exact-fresh"][step], rel=1e-4), step
    assert losses["exact-fresh"][5] != pytest.approx(losses["exact"][5], rel=1e-3)   # the streams differ


PRECISION_CHANGE = ("train.zero_stage=1", "model.moe.ep_size=1", "run.val_every=100", "run.image_every=0")


def test_a_bf16_checkpoint_resumed_in_fp32_gives_the_module_the_fp32_masters_not_their_bf16_rounding(tmp_path):
    from m2r.engine.checkpoint import CheckpointRef
    from m2r.engine.zero_state import MASTER, stitched_zero_state

    pretrain(tmp_path / "bf16", *PRECISION_CHANGE, "train.precision=bf16", "train.steps=2",
             "train.warmup_steps=1", nproc=1)
    tag = tmp_path / "bf16" / "checkpoints" / "step00000002"
    dump = tmp_path / "resumed.pt"
    run_launch(torchrun_command(1, "tests/engine_dump_resumed.py", str(dump), "--config", TINY,
                                f"run.dir={tmp_path / 'fp32'}", f"run.resume={tag}", *PRECISION_CHANGE,
                                "train.precision=fp32", "train.steps=3"))
    saved = stitched_zero_state(CheckpointRef(tag.parent, tag.name), 1, 4, (MASTER,))
    weights = torch.load(f"{dump}.rank0")
    assert saved.keys() <= weights.keys()
    assert any(not torch.equal(s[MASTER].bfloat16().float(), s[MASTER]) for s in saved.values())  # rounding shows
    for name, state in saved.items():
        assert weights[name].dtype == torch.float32 and torch.equal(weights[name].flatten(), state[MASTER]), name


def first_gradient_norm(run_dir):
    return next(r["grad_norm"] for r in metric_records(run_dir) if r.get("step") == 1 and "grad_norm" in r)


def test_bf16_follows_fp32_training_at_zero_1_and_2(tmp_path):
    """Same weights, same batches, no clipping: bf16 may round, not change the gradients or the updates.
    DeepSpeed's BF16_Optimizer (what fp32 micro-batch sums at ZeRO 1 would select) was 18% off on the
    first gradient and 1% on the third loss here, its bf16 without ZeRO 3% and 2%."""
    settings = ("train.grad_accum=2", "model.moe.ep_size=2", "train.grad_clip=0", "train.steps=3",
                "run.val_every=100", "run.image_every=0")
    pretrain(tmp_path / "fp32", *settings, "train.precision=fp32")
    reference, reference_loss = first_gradient_norm(tmp_path / "fp32"), train_losses(tmp_path / "fp32")[3]
    for stage, micro_batch_sums in ((1, "bf16"), (2, "fp32")):
        output = pretrain(tmp_path / f"bf16-zero{stage}", *settings, "train.precision=bf16",
                          f"train.zero_stage={stage}")
        sums = f"micro-batches in {micro_batch_sums}, over ranks in fp32"
        assert f"precision bf16 (gradients summed over {sums}) | ZeRO {stage}" in output
        assert first_gradient_norm(tmp_path / f"bf16-zero{stage}") == pytest.approx(reference, rel=0.01)
        assert train_losses(tmp_path / f"bf16-zero{stage}")[3] == pytest.approx(reference_loss, rel=0.002)


def test_bf16_resumes_exactly_and_a_precision_change_loads_weights_and_optimizer(tmp_path):
    """bf16 and fp32 optimizer states are different DeepSpeed files: resuming under another precision
    must carry the fp32 master weights and AdamW over, not crash or round the weights to bf16."""
    settings = ("train.precision=bf16", "train.zero_stage=1", "train.grad_accum=2", "model.moe.ep_size=2",
                "data.workers=1", "train.steps=4", "run.val_every=100", "run.image_every=0")
    pretrain(tmp_path / "straight", *settings)
    pretrain(tmp_path / "split", *settings, "run.stop_after_steps=2")
    pretrain(tmp_path / "split", *settings)
    assert train_losses(tmp_path / "split") == train_losses(tmp_path / "straight")

    changed = pretrain(tmp_path / "split", *[s for s in settings if "precision" not in s and "steps" not in s],
                       "train.precision=fp32", "train.steps=5")
    assert "TOPOLOGY CHANGE" in changed
    assert "ep_size 2, bf16, ZeRO 1; this run has world size 2, ep_size 2, fp32, ZeRO 1" in changed
    assert "Loaded: model weights; fp32 master weights, AdamW moments" in changed
    assert "stopping at step 5: finished" in changed
    assert "resume: settings changed since step00000004: train.precision 'bf16' -> 'fp32'; train.steps 4 -> 5" \
        in changed

    dense = tmp_path / "split" / "checkpoints" / "step00000005" / "mp_rank_00_model_states.pt"
    dense.write_bytes(dense.read_bytes()[:1000])
    with pytest.raises(AssertionError) as failed:
        pretrain(tmp_path / "split", *[s for s in settings if "precision" not in s and "steps" not in s],
                 "train.precision=fp32", "train.steps=6")
    assert f"if its files are damaged, resume an older one with run.resume={dense.parent.parent / 'step00000004'}" \
        in str(failed.value)
    older = pretrain(tmp_path / "split", *[s for s in settings if "precision" not in s and "steps" not in s],
                     "train.precision=fp32", "train.steps=6", f"run.resume={dense.parent.parent / 'step00000004'}")
    assert f"moved to {tmp_path / 'split' / 'checkpoints' / 'abandoned'}" in older
    assert sorted(p.name for p in (tmp_path / "split" / "checkpoints" / "abandoned").iterdir()) == ["step00000005"]
    with pytest.raises(AssertionError) as refused:   # its logs are gone: going back is the user's move
        pretrain(tmp_path / "split", *[s for s in settings if "precision" not in s and "steps" not in s],
                 "train.precision=fp32", "train.steps=6",
                 f"run.resume={dense.parent.parent / 'abandoned/step00000005'}")
    assert "is a checkpoint this run abandoned" in str(refused.value)


def build_small_shards(tmp_path):
    """4 shards of 2 clean 48x48 photos in tmp_path/shards."""
    from PIL import Image

    from m2r.data.builtin import TRAIN_PHOTOS, load_photo
    from m2r.shards.build import BuildOptions, build

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(8):
        Image.fromarray(load_photo(TRAIN_PHOTOS[i % len(TRAIN_PHOTOS)])[:48, :48]).save(photos / f"{i}.png")
    build(BuildOptions(src=[str(photos)], out=str(tmp_path / "shards"), samples_per_shard=2), progress=False)


def test_every_rank_streams_and_validates_on_rank_0s_listing_of_the_shards(tmp_path):
    """A rank listing a shared folder itself (a stale NFS listing: one shard missing here) would draw
    from another corpus, and a resume would not notice; one finding no validation shard would fail
    alone while the other waited for it."""
    build_small_shards(tmp_path)
    run_launch(torchrun_command(2, "tests/stale_listing.py", "pretrain.py", "--config", TINY,
                                f"run.dir={tmp_path / 'run'}", "data.source=shards",
                                f"data.shards={tmp_path / 'shards'}", "train.steps=2",
                                "train.warmup_steps=1", "run.image_every=0",
                                f"data.val_shards={tmp_path / 'shards/shard-000000.tar'}", "run.val_every=2"))
    client = torch.load(tmp_path / "run/checkpoints/step00000002/mp_rank_00_model_states.pt", weights_only=False)
    assert [state["plan"]["shards"] for state in client["stream_states"]] == [4, 4]
    assert any("val_psnr" in json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines())


def test_damaged_samples_skipped_on_any_rank_are_named_on_the_console(tmp_path):
    """Bits flipped in a shard after its build (the size still right, so no start-up check sees it): its
    samples are skipped, counted in data/corrupt_samples, and rank 0 names the shard on the log step."""
    build_small_shards(tmp_path)
    damaged = tmp_path / "shards/shard-000001.tar"
    data = bytearray(damaged.read_bytes())
    with tarfile.open(damaged) as tar:
        for member in tar.getmembers():
            if member.name.endswith(".zst"):
                for i in range(member.offset_data + 60, member.offset_data + 120):
                    data[i] ^= 0x5A
    damaged.write_bytes(bytes(data))
    output = pretrain(tmp_path / "run", "data.source=shards", f"data.shards={tmp_path / 'shards'}", "data.workers=1",
                      "data.shuffle_buffer=8", "train.steps=2", "train.warmup_steps=1", "run.image_every=0")
    assert "skipped damaged training samples" in output
    assert re.search(r"rank [01]: shard \S*shard-000001\.tar: sample \d+: cannot decode", output), output
    counts = [r["corrupt_samples"] for r in metric_records(tmp_path / "run") if "corrupt_samples" in r]
    assert counts and counts[-1] >= 2


def test_a_run_dir_that_is_not_one_directory_for_every_rank_is_refused_on_every_rank(tmp_path):
    """The same path on two nodes with their own disks (here: run.dir per rank, through the RANK variable) would
    publish checkpoints whose rank 1 parts no resume finds. Rank 1 looks for rank 0's file for 30 s."""
    command = torchrun_command(2, "pretrain.py", "--config", TINY, "run.dir=" + str(tmp_path) + "/node${oc.env:RANK}",
                               "train.steps=1", "train.warmup_steps=0")
    result = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert result.returncode != 0
    for rank in (0, 1):
        assert f"rank {rank}: error: config error: key 'run.dir': {tmp_path}/node{rank} is not one directory for " \
               "every rank: rank 1 on" in result.stderr
    # rank 0 removes its file, then the run dir it created for this refused start
    assert list(tmp_path.iterdir()) == []


# Run on each rank by torchrun: a good checkpoint, then one expert weight of rank 1 made NaN (as fp32 at ZeRO 0
# leaves a non-finite gradient with a finite loss), then another save; writes what each rank saw to argv[1].
SAVE_NON_FINITE = """
import json, sys
from pathlib import Path
import torch
from m2r import dist
from m2r.config import load_config
from m2r.engine.config import PretrainConfig
from m2r.engine.experts import EXPERT_INFIX
from m2r.engine.trainer import Trainer

cfg = load_config(PretrainConfig, "configs/pretrain/tiny-test.yaml", sys.argv[2:])
trainer = Trainer(cfg, dist.discover_dist_env())
trainer.save_checkpoint()
trainer.step += 1
if dist.rank() == 1:
    with torch.no_grad():
        expert = next(p for name, p in trainer.engine.module.named_parameters() if EXPERT_INFIX in name)
        expert.view(-1)[0] = float("nan")
try:
    trainer.save_checkpoint()
    error = None
except FloatingPointError as caught:
    error = str(caught)
Path(sys.argv[1], f"rank{dist.rank()}.json").write_text(json.dumps(
    {"error": error, "tags": sorted(p.name for p in trainer.checkpoints.root.iterdir())}))
dist.destroy_process_group()   # as every entry point: else gloo's threads may abort the exit (SIGABRT)
"""


def test_weights_no_longer_finite_on_any_rank_are_not_saved_and_every_rank_stops_naming_the_last_good_one(tmp_path):
    """A checkpoint of NaN weights would be the one a resume takes and would push a good one out: every rank refuses
    to save (the NaN expert is on rank 1 only), the error names the newest good checkpoint, and nothing is written."""
    script = tmp_path / "save_non_finite.py"
    script.write_text(SAVE_NON_FINITE)
    run_launch(torchrun_command(2, str(script), str(tmp_path), "train.zero_stage=0", "model.moe.ep_size=2",
                                "run.tensorboard=false", f"run.dir={tmp_path / 'run'}"))
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    newest = tmp_path / "run" / "checkpoints" / "step00000000"
    for result in results:
        assert result["error"].startswith("step 1: weight tensors are no longer finite on 1 of the 2 ranks (1 on rank "
                                          "1)"), result
        assert f"no checkpoint is saved; resume the newest with run.resume={newest} (train.zero_stage=1 or 2 " \
               "skip non-finite steps)" in result["error"]
        assert result["tags"] == ["latest", "step00000000"]
    # rank 1's first expert is the network's third (global id 2)
    assert "(1 on rank 1); this rank's: " in results[1]["error"] and ".deepspeed_experts.2." in results[1]["error"]
    assert "this rank's" not in results[0]["error"]


# ----------------------------------------------------------------------------------- preemption
def _worker_pids(launcher_pid):
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    return [int(pid) for pid in children]


@pytest.mark.timeout(2 * LAUNCH_TIMEOUT)
def test_compiled_forward_trains_like_eager_under_zero2_bf16_and_expert_parallelism(tmp_path):
    """train.compile through DeepSpeed: ZeRO-2 gradient hooks, bf16 weights, the sparse dispatch as an
    eager island at ep_size 2, the learnt AFLB box inside the graph, full-resolution recomputation,
    channels_last. Backend aot_eager: it
    traces the same graphs as inductor, whose code generation takes minutes on CPU (the GPU test runs it)."""
    settings = ("train.precision=bf16", "train.zero_stage=2", "model.moe.ep_size=2", "model.aflb_mask=fixed",
                "train.steps=2", "train.warmup_steps=1",
                "train.activation_checkpointing=full_res", "train.channels_last=true", "run.val_every=2",
                "run.image_every=0")
    out = pretrain(tmp_path / "compiled", *settings, "train.compile=true", "train.compile_backend=aot_eager")
    eager_out = pretrain(tmp_path / "eager", *settings, "train.cudnn_benchmark=false", "train.tf32_matmul=true")
    assert "compile True (aot_eager)" in out and "compile False" in eager_out
    assert "cudnn_benchmark" not in out + eager_out   # CUDA's flags: on a CPU they change nothing, so not shown
    compiled, eager = train_losses(tmp_path / "compiled"), train_losses(tmp_path / "eager")
    assert compiled.keys() == eager.keys() == {1, 2}
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=2e-2), (compiled, eager)


@pytest.mark.parametrize("entry, config", [("pretrain.py", TINY), ("finetune.py", "configs/finetune/tiny-test.yaml")])
def test_a_warning_during_start_up_stops_the_run_before_its_first_step(tmp_path, entry, config):
    """Nothing is trained, validated or saved, and the job script is asked to requeue through M2R_STOP_FILE."""
    from finetune_layouts import build_allweather

    overrides = [f"run.dir={tmp_path / 'run'}", "run.image_every=0"] if entry == "pretrain.py" else \
        [f"run.dir={tmp_path / 'run'}", f"data.root={build_allweather(tmp_path / 'aw', size=(40, 48), train=8)}"]
    stop_file = tmp_path / "job.stop"
    env = _env()
    env["M2R_STOP_FILE"] = str(stop_file)
    result = subprocess.run(torchrun_command(2, "tests/signalled_run.py", "start", entry, "--config", config,
                                             *overrides),
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "received SIGUSR1" in result.stdout and "val step" not in result.stdout
    assert stop_file.read_text() == "SIGUSR1\n"
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("entry", ["pretrain.py", "finetune.py"])
def test_a_warning_resent_until_the_ranks_have_exited_does_not_fail_a_run_that_stopped_and_saved(tmp_path, entry):
    """The job script requeues only on exit status 0; Python's shutdown gives USR1 back its default action."""
    from finetune_layouts import build_allweather

    settings = ["--config", TINY, "train.steps=6", "run.val_every=100", "run.image_every=0"] \
        if entry == "pretrain.py" else \
        ["--config", "configs/finetune/tiny-test.yaml", "train.epochs=2",
         f"data.root={build_allweather(tmp_path / 'aw', size=(40, 48), train=16)}"]
    stop_file = tmp_path / "job.stop"
    result = subprocess.run(torchrun_command(2, "tests/signalled_run.py", "resent-after-step-2", entry, *settings,
                                             f"run.dir={tmp_path / 'run'}"),
                            cwd=REPO, env=dict(_env(), M2R_STOP_FILE=str(stop_file)), capture_output=True, text=True,
                            timeout=LAUNCH_TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "stopping at step 2: received SIGUSR1" in result.stdout and stop_file.read_text() == "SIGUSR1\n"
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step00000002"


def test_a_warning_at_the_last_step_leaves_the_final_validation_to_the_next_run_which_does_it_once(tmp_path):
    run_dir, overrides = tmp_path / "run", ("train.steps=3", "run.val_every=100", "run.image_every=0",
                                            "run.demo_summary=true")
    stop_file = tmp_path / "job.stop"   # the job script requeues: the final validation is left to do
    first = run_launch(torchrun_command(2, "tests/signalled_run.py", "after-step-3", "pretrain.py", "--config", TINY,
                                        f"run.dir={run_dir}", *overrides), env_extra={"M2R_STOP_FILE": str(stop_file)})
    assert "stopping at step 3: received SIGUSR1" in first and "demo: stopped before the final validation" in first
    assert stop_file.read_text() == "SIGUSR1\n"
    assert sorted(val_records(run_dir)) == [0]
    for _ in range(2):   # the finished run, again: it validates step 3 once, and records that it did
        again = pretrain(run_dir, *overrides)
        assert "demo: val PSNR before" in again
    assert [r["step"] for r in metric_records(run_dir) if "val_psnr" in r] == [0, 3]


def test_sigterm_saves_exits_zero_and_the_next_run_continues(tmp_path):
    """SLURM's preemption signals every process of the job step, DataLoader workers included. The
    time SLURM leaves goes to the checkpoint: the validation due at that step waits for the next run."""
    run_dir = tmp_path / "preempted"
    overrides = (f"run.dir={run_dir}", "train.steps=400", "run.val_every=1", "run.image_every=0",
                 "data.workers=1")
    launcher = subprocess.Popen(torchrun_command(2, "pretrain.py", "--config", TINY, *overrides), cwd=REPO,
                                env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in launcher.stdout:  # wait until training is under way
        lines.append(line)
        if line.startswith("step 2/"):
            break
    workers = _worker_pids(launcher.pid)
    assert len(workers) == 2
    data_workers = [pid for rank_pid in workers for pid in _worker_pids(rank_pid)]
    assert len(data_workers) >= 2
    for pid in data_workers:
        os.kill(pid, signal.SIGTERM)
    os.kill(workers[-1], signal.SIGTERM)  # one rank only: the ranks must agree among themselves
    lines += launcher.stdout.readlines()
    assert launcher.wait(timeout=LAUNCH_TIMEOUT) == 0, "".join(lines)[-4000:]
    output = "".join(lines)
    assert "stopping at step" in output
    stopped_at = int((run_dir / "checkpoints" / "latest").read_text()[len("step"):])
    assert 2 <= stopped_at < 400
    assert sorted(val_records(run_dir)) == list(range(stopped_at))

    resumed = pretrain(run_dir, *overrides[1:], "run.stop_after_steps=1")
    assert f"at step {stopped_at}" in resumed
    assert max(train_losses(run_dir)) == stopped_at + 1
    val_steps = [r["step"] for r in metric_records(run_dir) if "val_psnr" in r]
    assert val_steps == list(range(stopped_at + 2))


# ----------------------------------------------------------------------------------- the README's demo command
@pytest.mark.timeout(2 * LAUNCH_TIMEOUT)
def test_demo_command_prints_the_psnr_line(tmp_path):
    """The demo, shortened (the full one takes minutes): deepspeed launcher, built-in photos, ep_size 2."""
    command = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2",
               "--master_port", str(free_port()), "pretrain.py", "--config", "configs/pretrain/demo.yaml",
               f"run.dir={tmp_path / 'demo'}", "train.steps=40", "train.warmup_steps=5", "run.val_every=40",
               "run.log_every=10", "train.crop=32"]
    started = time.time()
    output = run_launch(command)
    line = next(line for line in output.splitlines() if line.startswith("demo: val PSNR before"))
    before, after = (float(word) for word in line.replace(",", "").split() if word.replace(".", "").isdigit())
    assert after > before + 1.0, line
    assert time.time() - started < LAUNCH_TIMEOUT
    # Run again: the finished run resumes, says the same from its checkpoint and validates nothing twice.
    again = run_launch(torchrun_command(2, *command[command.index("pretrain.py"):]))
    assert line in again.splitlines()
    assert [r["step"] for r in metric_records(tmp_path / "demo") if "val_psnr" in r] == [0, 40]


# ----------------------------------------------------------------------------------- ranks kept in step
def launched_script_results(script, tmp_path):
    """tests/<script> on two torchrun ranks (gloo): what rank 0 wrote to its RESULT_JSON."""
    result_path = tmp_path / "result.json"
    run_launch(torchrun_command(2, f"tests/{script}", str(result_path)), timeout=120)
    return json.loads(result_path.read_text())


def test_validation_over_batches_the_ranks_cannot_share_evenly_ends_on_every_rank_as_with_every_expert_local(
        tmp_path):
    """Sets of 3 and 1 images in batches of 2 (2, 1 and 1 images: the ranks send different token counts through
    the all-to-all, then one runs a padding forward), and a single image for two ranks: at ep_size 2 every rank
    runs as many forwards as the other, and the metrics are those of the network with every expert local."""
    results = launched_script_results("uneven_validation.py", tmp_path)
    assert {case: result["batches"] for case, result in results.items()} == {"3_and_1_in_batches_of_2": 3,
                                                                              "one_image": 1}
    for case, result in results.items():
        assert result["ep2"].keys() == result["ep1"].keys(), case
        for name, value in result["ep2"].items():
            assert value == pytest.approx(result["ep1"][name], abs=1e-5), (case, name)


def test_weights_missing_for_one_ranks_experts_stop_every_rank_with_the_same_error(tmp_path):
    """An EMA (init.use_ema, or a resume) or an init.weights file lacking the experts of rank 1 alone: every rank
    raises, naming the weights and the rank, instead of rank 1 alone while rank 0 goes on into its next
    collective (claiming to have loaded them)."""
    results = launched_script_results("rank_dependent_checks.py", tmp_path)
    expected = {"init_use_ema": "CheckpointMismatch: the EMA of ckpt lacks 24 trainable weights",
                "resumed_ema": "CheckpointMismatch: EMA state lacks 24 weights",
                "init_weights_file": "ConfigError: init.weights lacks 24 weights of this model"}
    for check, (rank0, rank1) in results.items():
        assert rank0 == rank1, check
        assert rank0.startswith(expected[check]) and "deepspeed_experts.2.fc1.bias" in rank0, rank0
        assert rank0.endswith("(on rank 1)"), rank0


def test_what_one_rank_alone_does_or_reads_at_start_up_and_as_a_save_starts_fails_on_every_rank_with_its_error(
        tmp_path):
    """Writing config.yaml and opening the reports at start-up, and removing what earlier saves left as a save starts,
    are rank 0's; a finetuning's validation images each rank reads from its node's copy: when they fail, every rank
    raises the failing rank's error there (one collective each, at start-up and per save), naming a rank other than
    0, instead of going on into its next collective and ending there by a broken connection or the failure watch."""
    results = launched_script_results("rank0_only_failures.py", tmp_path)
    read = results.pop("validation_read")
    for check, (rank0, rank1) in results.items():
        assert rank0.startswith("IsADirectoryError: "), (check, rank0)
        assert rank1 == rank0, check
    assert "config.yaml" in results["reports_opened"][0] and "latest.tmp" in results["save_started"][0]
    assert read[0] == read[1] and "lost.png" in read[0] and read[0].endswith("(on rank 1)"), read


def test_a_non_finite_loss_on_one_rank_stops_every_rank_at_that_step_in_fp32_at_zero_0(tmp_path):
    """The loss the stop is judged by is the ranks' mean (one all-reduce with the dropped fractions and the stop
    signals): rank 0, whose own loss is finite, stops at rank 1's first NaN step too, after the same reports."""
    results = launched_script_results("rank_step_reports.py", tmp_path)
    assert results == [{"reported": [1, 2, 3], "outcome": "step 3"}] * 2
