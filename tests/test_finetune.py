"""finetune.py: the paper recipe in the configs, config checks, and a 2-rank run from a 1-rank
pretraining checkpoint whose best weights `m2r.evaluate` then scores on AllWeather and CDD-11;
a second run from those exported weights keeps an EMA, which its best export holds."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from finetune_layouts import build_allweather, build_cdd11, write_pair
from m2r.config import ConfigError, load_config
from m2r.engine.checkpoint import CheckpointRef, complete_tags, resolve_resume, tag_for
from m2r.engine.config import FinetuneConfig, check_init_weights_kind, validate_finetune_config
from m2r.engine.finetuner import Finetuner, init_weights_kind
from m2r.eval.datasets import CDD11_TYPES, evaluation_sets
from m2r.export import export_state_dict

REPO = Path(__file__).resolve().parent.parent
PROTOCOL_KEYS = {f"{m}_{p}" for m in ("psnr", "ssim") for p in ("rgb", "y", "official")}


@pytest.mark.parametrize("name, dataset", [("allweather", "allweather"), ("cdd11", "cdd11")])
def test_configs_hold_the_paper_recipe(repo_root, name, dataset):
    cfg = load_config(FinetuneConfig, Path(repo_root) / f"configs/finetune/{name}.yaml")
    train = cfg.train
    assert (cfg.data.dataset, train.lr, train.weight_decay, train.epochs, train.warmup_epochs) == \
        (dataset, 2e-4, 0.01, 200, 15)
    assert (train.schedule_epochs, train.crop, train.micro_batch, train.grad_accum, train.precision) == \
        (180, 224, 4, 4, "fp32")
    assert cfg.data.augment is False and cfg.model.moe.combine == "log" and cfg.model.dim == 48
    plus = load_config(FinetuneConfig, Path(repo_root) / f"configs/finetune/{name}-plus.yaml")
    assert plus.data.augment and plus.model.moe.combine == "linear" and plus.data.dataset == dataset


@pytest.mark.parametrize("overrides, key", [([], "data.root"), (["train.ema_decay=1.5"], "train.ema_decay"),
                                            (["run.best_metrics=[lpips]"], "run.best_metrics"),
                                            (["model.moe.ep_size=4"], "model.moe.ep_size"),
                                            (["data.val_images_per_set=-1"], "val_images_per_set"),
                                            (["init.allow_model_changes=[nope]"], "init.allow_model_changes"),
                                            (["train.lr=0"], "train.lr"),
                                            (["run.log_every=0"], "run.log_every"),
                                            (["run.keep_last=1"], "run.keep_last"),
                                            # the cosine would climb back over halfway to train.lr
                                            (["train.epochs=200", "train.schedule_epochs=100",
                                              "train.warmup_epochs=0"], "train.epochs")])
def test_invalid_settings_name_their_key(repo_root, overrides, key):
    root = ["data.root=/data"] if overrides else []  # the tiny config leaves data.root empty
    cfg = load_config(FinetuneConfig, Path(repo_root) / "configs/finetune/tiny-test.yaml",
                      root + overrides)
    with pytest.raises(ConfigError, match=key):
        validate_finetune_config(cfg, world_size=2)


def test_init_weights_of_an_unknown_kind_are_refused_but_a_vanished_start_does_not_stop_a_resume(repo_root, tmp_path):
    """A resumed run does not load init.weights: its pretraining checkpoints may have been pruned since."""
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"")
    cfg = load_config(FinetuneConfig, Path(repo_root) / "configs/finetune/tiny-test.yaml",
                      ["data.root=/data", f"init.weights={weights}"])
    with pytest.raises(ConfigError, match="key 'init.weights'.*a .safetensors file"):
        validate_finetune_config(cfg, world_size=2)
    gone = load_config(FinetuneConfig, Path(repo_root) / "configs/finetune/tiny-test.yaml",
                       ["data.root=/data", f"init.weights={tmp_path / 'pruned/checkpoints'}"])
    validate_finetune_config(gone, world_size=2)


@pytest.mark.parametrize("key", ["train.steps", "train.warmup_steps"])
def test_step_counts_are_refused_as_finetuning_counts_epochs(repo_root, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(FinetuneConfig, Path(repo_root) / "configs/finetune/tiny-test.yaml", [f"{key}=5"])


def test_validation_crops_larger_than_an_image_are_refused_not_upscaled(repo_root, tmp_path):
    root = build_allweather(tmp_path / "aw", size=(40, 48))
    val_sets = evaluation_sets("allweather", root, ["raindrop_a"])

    def val_batches(val_crop):
        cfg = load_config(FinetuneConfig, Path(repo_root) / "configs/finetune/tiny-test.yaml",
                          [f"data.root={root}", f"data.val_crop={val_crop}"])
        return Finetuner._val_batches(SimpleNamespace(cfg=cfg), val_sets)

    with pytest.raises(ConfigError, match=r"data.val_crop.*0_rain.png \(48x40\); use at most 40"):
        val_batches(48)
    assert val_batches(40)[0]["lq"].shape == (1, 3, 40, 40)


def test_a_validation_set_read_otherwise_on_another_rank_is_refused_naming_the_folder_and_the_rank(repo_root,
                                                                                                   tmp_path,
                                                                                                   monkeypatch):
    """Each rank reads the validation images itself (rank 0 lists them): a node whose copy of data.root holds other
    images is refused at start-up, on every rank, rather than mixed into the metrics, as pretraining's set is."""
    from m2r.data import stream

    root = build_allweather(tmp_path / "aw", size=(40, 48))
    cfg = load_config(FinetuneConfig, Path(repo_root) / "configs/finetune/tiny-test.yaml",
                      [f"data.root={root}", "data.val_crop=32"])
    stub = SimpleNamespace(cfg=cfg)
    mine = Finetuner._val_batches(stub, evaluation_sets("allweather", root, ["raindrop_a"]))
    other_node = stream._digest(Finetuner._val_batches(stub, evaluation_sets("allweather", root, ["snow100k_s"])))
    monkeypatch.setattr(stream.dist, "is_multi_rank", lambda: True)
    # two gathers: each rank's failure to read (None: none, `dist.failing_together`), then each rank's digest
    monkeypatch.setattr(stream.dist, "all_gather_object", lambda mine: [mine, mine and (other_node, "node7")])
    with pytest.raises(ConfigError, match=re.escape(f"data.root={root} (data.val_root unset): the validation set "
                                                    "built by rank 1 on host node7 differs from rank 0's")):
        Finetuner._val_batches(stub, evaluation_sets("allweather", root, ["raindrop_a"]))
    monkeypatch.setattr(stream.dist, "all_gather_object", lambda digest: [digest, digest])
    again = Finetuner._val_batches(stub, evaluation_sets("allweather", root, ["raindrop_a"]))
    assert all(torch.equal(a["lq"], b["lq"]) for a, b in zip(again, mine))


def run(command, cwd, timeout=300, expect_failure=False):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu")
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert (result.returncode != 0) == expect_failure, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr if expect_failure else result.stdout


def test_two_rank_finetune_from_a_one_rank_pretraining_checkpoint_then_evaluation(repo_root, tmp_path):
    python = sys.executable
    pretrain_dir, finetune_dir = tmp_path / "pretrain", tmp_path / "finetune"
    run([python, "pretrain.py", "--config", "configs/pretrain/tiny-test.yaml", "train.steps=1",
         "train.warmup_steps=0", "run.image_every=0",
         f"run.dir={pretrain_dir}"], repo_root)
    # Same shapes, another function: the weights load strictly, so the networks' configs are compared.
    refused = run([python, "pretrain.py", "--config", "configs/pretrain/tiny-test.yaml", "train.steps=2",
                   "train.warmup_steps=1", f"run.dir={pretrain_dir}", "model.input_range=zero_one"], repo_root,
                  expect_failure=True)
    assert "key 'run.resume'" in refused and "model.input_range: checkpoint 'minus_one_one', this run 'zero_one'" \
        in refused
    allweather = build_allweather(tmp_path / "allweather", size=(40, 48), train=8)
    finetune = [python, "finetune.py", "--config", "configs/finetune/tiny-test.yaml", f"data.root={allweather}",
                f"init.weights={pretrain_dir}/checkpoints"]
    refused = run([*finetune, "model.moe.combine=linear", "model.moe.ep_size=1", f"run.dir={tmp_path / 'refused'}"],
                  repo_root, expect_failure=True)
    assert "key 'init.weights'" in refused and "model.moe.combine: checkpoint 'log', this run 'linear'" in refused
    assert "init.allow_model_changes" in refused
    refused = run([*finetune, "model.moe.ep_size=1", f"run.resume={pretrain_dir}/checkpoints",
                   f"run.dir={tmp_path / 'refused'}"], repo_root, expect_failure=True)
    assert "is a pretrain checkpoint; a finetune run resumes only its own kind" in refused
    log = run([python, "-m", "torch.distributed.run", "--nproc_per_node", "2", *finetune[1:],
               f"run.dir={finetune_dir}", "run.log_every=3"], repo_root)
    assert "saved with world size 1, ep_size 1" in log
    # which of the layout's folders, and the list file that chose the images
    assert f"8 training pairs in {allweather / 'train/input'} (listed in {allweather / 'filenames.txt'}) |" in log
    assert "2 steps/epoch x 2 epochs = 4 steps | warmup 2, cosine to min_lr after step 4\n" in log
    assert "step 3/4 |" in log and "step 4/4 |" in log and "step 2/4 |" not in log   # log steps and the last
    assert "stopping at step 4: finished" in log
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(finetune_dir / "tensorboard"))
    events.Reload()
    loads = [[events.Scalars(f"moe/level{level}/expert{e}")[-1].value for e in range(4)] for level in (1, 2, 3)]
    assert all(sum(level) == pytest.approx(1.0) for level in loads)   # assignment fractions of each adapter
    meta = json.loads((finetune_dir / "checkpoints/step00000004/meta.json").read_text())
    assert (meta["world_size"], meta["ep_size"]) == (2, 2)
    assert meta["kind"] == "finetune"   # which runs may resume it (TrainingRun._check_resumable)
    assert json.loads((pretrain_dir / "checkpoints/step00000001/meta.json").read_text())["kind"] == "pretrain"
    assert resolve_resume("latest", finetune_dir / "best_psnr").meta()["kind"] == "finetune"
    best = json.loads((finetune_dir / "best_psnr.json").read_text())
    assert best["epoch"] in (1, 2)
    val_lines = [json.loads(line) for line in (finetune_dir / "metrics.jsonl").read_text().splitlines()
                 if "val_psnr" in line]
    assert [record["step"] for record in val_lines] == [0, 2, 4]   # the starting weights, then each epoch
    assert "val_psnr_raindrop_a" in val_lines[0]

    weights = finetune_dir / "best_psnr.safetensors"
    # An exported file as the start, at ep_size 2: experts are picked by global id before DeepSpeed exists.
    # With an EMA, which is what validation sees and what the best export holds.
    ema_run = tmp_path / "from-export"
    log = run([python, "-m", "torch.distributed.run", "--nproc_per_node", "2", "finetune.py", "--config",
               "configs/finetune/tiny-test.yaml", f"data.root={allweather}", f"init.weights={weights}",
               "train.epochs=1", "train.warmup_epochs=0", "train.ema_decay=0.5", f"run.dir={ema_run}"], repo_root)
    assert f"init: weights from {weights}" in log
    assert (ema_run / "checkpoints/step00000002").is_dir()
    best_ref = resolve_resume("latest", ema_run / "best_psnr")
    ema_weights, trained_weights = export_state_dict(best_ref, use_ema=True)[0], export_state_dict(best_ref)[0]
    exported = load_file(str(ema_run / "best_psnr.safetensors"))
    assert all(torch.equal(exported[name], ema_weights[name]) for name in ema_weights)
    assert any(not torch.equal(trained_weights[name], ema_weights[name]) for name in ema_weights)

    cdd11 = build_cdd11(tmp_path / "cdd11", size=(24, 32))
    for dataset, root, names in (("allweather", allweather, ["outdoor_rain", "snow100k_s", "snow100k_l",
                                                             "raindrop_a"]),
                                 ("cdd11", cdd11, list(CDD11_TYPES))):
        out = tmp_path / f"eval-{dataset}"
        run([python, "-m", "m2r.evaluate", "--weights", str(weights), "--dataset", dataset, "--root", str(root),
             "--out", str(out)], repo_root)
        results = json.loads((out / "results.json").read_text())
        assert list(results["sets"]) == names
        assert all(PROTOCOL_KEYS <= set(summary) for summary in results["sets"].values())

    # The two-rank run continued on one rank at ep_size 1: the optimizer follows, re-partitioned.
    log = run([*finetune, "model.moe.ep_size=1", "train.epochs=4", "run.stop_after_epochs=1",
               f"run.dir={finetune_dir}"], repo_root)
    assert "stopping at step 8: run.stop_after_epochs=1 reached" in log
    assert "saved with world size 2, ep_size 2" in log and "AdamW moments and step counts (re-partitioned)" in log
    assert "resumed from" in log and (finetune_dir / "checkpoints/latest").read_text() == "step00000008"  # 4 a epoch


CRASH_IN_EXPORT = """
import os, runpy, signal, sys
from m2r.engine import bests
real_export = bests.export
def export(source, target, **kwargs):
    if target.endswith("best_psnr.safetensors"):
        print("killed while exporting " + source, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    return real_export(source, target, **kwargs)
bests.export = export
sys.argv[0] = "finetune.py"
runpy.run_path("finetune.py", run_name="__main__")
"""


def test_a_run_killed_while_keeping_its_bests_trains_the_epoch_again_and_keeps_them(repo_root, tmp_path):
    """Killed (a preemption) while the epoch's best copies are made, before its checkpoint is published:
    the restart trains that epoch again and keeps its bests, rather than resuming a staged checkpoint whose
    client state already records bests that best_<metric>/ and the exports lack. One epoch: its validation
    is always a best (the first), and the restart's would be the last chance to keep it."""
    python = sys.executable
    pretrain_dir, run_dir = tmp_path / "pretrain", tmp_path / "finetune"
    run([python, "pretrain.py", "--config", "configs/pretrain/tiny-test.yaml", "train.steps=1",
         "train.warmup_steps=0", "run.image_every=0",
         f"run.dir={pretrain_dir}"], repo_root)
    allweather = build_allweather(tmp_path / "allweather", size=(40, 48), train=8)
    settings = ["--config", "configs/finetune/tiny-test.yaml", f"data.root={allweather}", "model.moe.ep_size=1",
                f"init.weights={pretrain_dir}/checkpoints", "train.epochs=1", "train.warmup_epochs=0",
                f"run.dir={run_dir}"]
    crash = tmp_path / "crash_in_export.py"
    crash.write_text(CRASH_IN_EXPORT)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu")
    killed = subprocess.run([python, str(crash), *settings], cwd=repo_root, env=env, capture_output=True, text=True,
                            timeout=300)
    assert "killed while exporting" in killed.stdout and killed.returncode != 0, killed.stdout + killed.stderr
    assert not (run_dir / "checkpoints/latest").exists()   # the epoch's checkpoint was never published
    log = run([python, "finetune.py", *settings], repo_root)
    assert "finished" in log
    latest = (run_dir / "checkpoints/latest").read_text()
    saved_best = torch.load(run_dir / "checkpoints" / latest / "mp_rank_00_model_states.pt",
                            weights_only=False)["best"]
    for name in ("psnr", "ssim"):
        assert json.loads((run_dir / f"best_{name}.json").read_text()) == saved_best[name]
        assert (run_dir / f"best_{name}" / f"step{saved_best[name]['step']:08d}/meta.json").is_file()
        assert (run_dir / f"best_{name}.safetensors").is_file()


def test_a_finetune_resumed_from_an_older_checkpoint_keeps_the_bests_that_checkpoint_recorded(repo_root, tmp_path):
    """Rewound from step 6 to step 2, and killed while exporting again: the next start still ends with step 2's
    bests, not those of the abandoned steps 4 and 6 (set aside, not taken by `best_<metric>/` readers)."""
    python = sys.executable
    allweather = build_allweather(tmp_path / "allweather", size=(40, 48), train=8)
    run_dir = tmp_path / "run"
    settings = ["--config", "configs/finetune/tiny-test.yaml", f"data.root={allweather}", "model.moe.ep_size=1",
                "train.grad_accum=2", "train.epochs=3", "train.warmup_epochs=0", "run.keep_last=3",
                f"run.dir={run_dir}"]   # 2 steps per epoch
    run([python, "finetune.py", *settings], repo_root)
    assert json.loads((run_dir / "best_psnr.json").read_text())["step"] == 6   # each epoch a best: 4, 6 kept
    crash = tmp_path / "crash_in_export.py"
    crash.write_text(CRASH_IN_EXPORT)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu")
    killed = subprocess.run([python, str(crash), *settings, f"run.resume={run_dir}/checkpoints/step00000002"],
                            cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert f"killed while exporting {run_dir}/best_psnr/step00000002" in killed.stdout, killed.stdout + killed.stderr
    log = run([python, "finetune.py", *settings, "run.stop_after_steps=1"], repo_root)   # resumes step 2
    assert "resume: best psnr as recorded at step 2:" in log and "resume: best ssim as recorded at step 2:" in log
    saved_best = torch.load(run_dir / "checkpoints/step00000003/mp_rank_00_model_states.pt", weights_only=False)["best"]
    for name in ("psnr", "ssim"):
        best_dir = run_dir / f"best_{name}"
        assert json.loads((run_dir / f"best_{name}.json").read_text()) == saved_best[name]
        assert saved_best[name]["step"] == 2 and complete_tags(best_dir) == ["step00000002"]
        assert resolve_resume("latest", best_dir).tag == "step00000002"
        assert sorted(os.listdir(best_dir / "abandoned")) == ["step00000004", "step00000006"]
        exported = load_file(str(run_dir / f"best_{name}.safetensors"))
        recorded = export_state_dict(CheckpointRef(best_dir, "step00000002"))[0]
        assert all(torch.equal(exported[key], recorded[key]) for key in recorded)


def test_a_kill_while_a_revalidated_epoch_end_keeps_its_bests_leaves_no_copy_and_no_record_twice(repo_root, tmp_path):
    """A stop signal on epoch 1's last step saves step 2 before its validation; the resumed run validates it,
    keeps its bests and is killed while exporting, before saving step 2 again. The next start validates step 2
    once more: the copy of step 2 the killed run kept, never saved, is removed (not set aside under
    best_psnr/abandoned/, a whole checkpoint's bytes), and metrics.jsonl holds step 2's validation once."""
    python = sys.executable
    allweather = build_allweather(tmp_path / "allweather", size=(40, 48), train=8)
    run_dir = tmp_path / "run"
    settings = ["--config", "configs/finetune/tiny-test.yaml", f"data.root={allweather}", "model.moe.ep_size=1",
                "train.grad_accum=2", "train.epochs=2", "train.warmup_epochs=0", f"run.dir={run_dir}"]   # 2 steps/epoch
    stopped = run([python, "tests/signalled_run.py", "after-step-2", "finetune.py", *settings], repo_root)
    assert "val step 2" not in stopped and "stopping at step 2: received SIGUSR1 in epoch 1 of 2" in stopped, stopped
    crash = tmp_path / "crash_in_export.py"
    crash.write_text(CRASH_IN_EXPORT)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu")
    killed = subprocess.run([python, str(crash), *settings], cwd=repo_root, env=env, capture_output=True, text=True,
                            timeout=300)
    assert f"killed while exporting {run_dir}/best_psnr/step00000002" in killed.stdout, killed.stdout + killed.stderr
    log = run([python, "finetune.py", *settings, "run.stop_after_steps=1"], repo_root)
    assert "resume: best psnr as recorded at step 2: step00000002 removed (their epochs' checkpoints were never " \
           "saved)" in log
    assert not (run_dir / "best_psnr/abandoned").exists()
    assert complete_tags(run_dir / "best_psnr") == ["step00000002"]   # kept again by the validation redone
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records if "val_psnr" in record] == [0, 2]


def test_a_resume_removes_a_best_export_whose_recorded_best_is_no_longer_kept(tmp_path):
    """Newer (abandoned) bests pruned the copy of the recorded one: no weights go by the name of the best until
    the next one; said once."""
    from m2r.engine.bests import align_best_with_resume

    for step in (8, 10):
        (tmp_path / f"best_psnr/step{step:08d}").mkdir(parents=True)
        (tmp_path / f"best_psnr/step{step:08d}/meta.json").write_text(json.dumps({"step": step}))
        (tmp_path / f"checkpoints/abandoned/step{step:08d}").mkdir(parents=True)   # saved, then rewound past
    (tmp_path / "best_psnr/latest").write_text("step00000010")
    for suffix in (".safetensors", ".yaml", ".json"):
        (tmp_path / f"best_psnr{suffix}").write_text(json.dumps({"value": 12.0, "epoch": 5, "step": 10}))
    recorded = {"value": 9.0, "epoch": 2, "step": 4}
    changes = align_best_with_resume(tmp_path, tmp_path / "checkpoints", "psnr", recorded, resumed_at(tmp_path, 4))
    assert changes == [f"step00000008, step00000010 moved to {tmp_path / 'best_psnr/abandoned'} (delete them when "
                       "no longer needed)",
                       "best_psnr.safetensors removed until the next best (its checkpoint (step00000004) is no "
                       "longer kept)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_psnr", "checkpoints"]
    assert sorted(p.name for p in (tmp_path / "best_psnr").iterdir()) == ["abandoned"]
    assert align_best_with_resume(tmp_path, tmp_path / "checkpoints", "psnr", recorded, resumed_at(tmp_path, 4)) == []


def test_best_copies_of_an_epoch_whose_checkpoint_was_never_saved_are_removed_not_kept(tmp_path):
    """A kill while epoch 2 kept its bests, before its checkpoint was published: the epoch is trained again, so
    its copies are nobody's (a whole checkpoint's bytes each); those of a rewound run were saved and are kept."""
    from m2r.engine.bests import align_best_with_resume

    for step in (2, 4, 6):
        best_copy(tmp_path, step)
    (tmp_path / "checkpoints/step00000002").mkdir(parents=True)   # the checkpoint resumed
    (tmp_path / "checkpoints/step00000002/meta.json").write_text(json.dumps({"step": 2}))
    (tmp_path / "checkpoints/abandoned/step00000004+").mkdir(parents=True)   # step 4 was saved, then rewound past
    changes = align_best_with_resume(tmp_path, tmp_path / "checkpoints", "psnr", {"value": 9.0, "epoch": 1, "step": 2},
                                     resumed_at(tmp_path, 2))
    assert changes[:2] == ["step00000006 removed (their epochs' checkpoints were never saved)",
                           f"step00000004 moved to {tmp_path / 'best_psnr/abandoned'} (delete them when no longer "
                           "needed)"]
    assert sorted(p.name for p in (tmp_path / "best_psnr").iterdir()) == ["abandoned", "latest", "step00000002"]


def test_best_copies_of_epochs_whose_checkpoints_were_pruned_are_set_aside_not_removed(tmp_path):
    """The run kept steps 8 and 10 (run.keep_last=2) and, under best_psnr/, the bests of steps 4 and 6, whose own
    tags pruning removed: resumed from a copy of step 2 elsewhere (which recorded the best of step 2), those copies
    are newer than the recorded best but were saved; they may be the only whole checkpoints of those epochs."""
    from m2r.engine.bests import align_best_with_resume

    for step in (4, 6):
        best_copy(tmp_path, step)
    for step in (8, 10):
        (tmp_path / f"checkpoints/step{step:08d}").mkdir(parents=True)
        (tmp_path / f"checkpoints/step{step:08d}/meta.json").write_text(json.dumps({"step": step}))
    changes = align_best_with_resume(tmp_path, tmp_path / "checkpoints", "psnr", {"value": 9.0, "epoch": 1, "step": 2},
                                     CheckpointRef(tmp_path / "elsewhere", "step00000002"))
    assert changes[0] == (f"step00000004, step00000006 moved to {tmp_path / 'best_psnr/abandoned'} (delete them when "
                          "no longer needed)"), changes
    assert sorted(p.name for p in (tmp_path / "best_psnr/abandoned").iterdir()) == ["step00000004", "step00000006"]


def test_a_damaged_copy_of_the_recorded_best_does_not_stop_the_resume(tmp_path, monkeypatch):
    """Its export fails (an expert file lost): the export is removed until the next best, and training goes on."""
    from m2r.engine import bests
    from m2r.models.convert import CheckpointMismatch

    def damaged(source, target, **kwargs):
        raise CheckpointMismatch(f"{source}: expert files missing\nsecond line")

    monkeypatch.setattr(bests, "export", damaged)
    best_copy(tmp_path, 4)
    for suffix in (".safetensors", ".yaml", ".json"):
        (tmp_path / f"best_psnr{suffix}").write_text(json.dumps({"value": 12.0, "epoch": 5, "step": 10}))
    changes = bests.align_best_with_resume(tmp_path, tmp_path / "checkpoints", "psnr",
                                           {"value": 9.0, "epoch": 2, "step": 4}, resumed_at(tmp_path, 4))
    assert changes == [f"best_psnr.safetensors removed until the next best ({tmp_path / 'best_psnr/step00000004'} "
                       f"cannot be exported: {tmp_path / 'best_psnr/step00000004'}: expert files missing)"]
    assert not list(tmp_path.glob("best_psnr.*"))


def best_copy(run_dir: Path, step: int) -> None:
    """A complete copy of step `step`'s checkpoint under best_psnr/ (meta.json only: enough for the tag logic)."""
    (run_dir / f"best_psnr/step{step:08d}").mkdir(parents=True)
    (run_dir / f"best_psnr/step{step:08d}/meta.json").write_text(json.dumps({"step": step}))


def resumed_at(run_dir: Path, step: int) -> CheckpointRef:
    """The run's own checkpoint of step `step`, as the resume names it."""
    return CheckpointRef(run_dir / "checkpoints", tag_for(step))


def exported_weights_of(run_dir: Path, step: int) -> None:
    """best_psnr.safetensors as `export` writes it from best_psnr/step<step>: its source in the metadata."""
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(run_dir / "best_psnr.safetensors"),
              metadata={"source": str(run_dir / f"best_psnr/step{step:08d}"), "weights": "fp32"})


def capture_exports(monkeypatch) -> list:
    from m2r.engine import bests

    exported = []
    monkeypatch.setattr(bests, "export", lambda source, target, use_ema, companions: exported.append(source))
    return exported


def test_a_kill_between_the_renames_of_a_best_export_is_mended_at_the_next_start(tmp_path, monkeypatch):
    """`export` renames the weights first and best_psnr.json last: killed between them while epoch 2 kept its best
    (step 4), the record still says step 2, the best the resumed checkpoint recorded, but the weights are step
    4's. The record alone would pass them as step 2's."""
    from m2r.engine.bests import align_best_with_resume

    for step in (2, 4):
        best_copy(tmp_path, step)
    recorded = {"value": 9.0, "epoch": 1, "step": 2}
    exported_weights_of(tmp_path, 4)
    (tmp_path / "best_psnr.json").write_text(json.dumps(recorded))
    exported = capture_exports(monkeypatch)
    changes = align_best_with_resume(tmp_path, tmp_path / "checkpoints", "psnr", recorded, resumed_at(tmp_path, 2))
    assert exported == [str(tmp_path / "best_psnr/step00000002")], changes
    assert changes[-1] == f"best_psnr.safetensors exported again from {tmp_path / 'best_psnr/step00000002'}"


def test_a_first_best_killed_between_its_renames_leaves_no_weights_under_the_bests_name(tmp_path, monkeypatch):
    """Epoch 1's last step saved by a stop signal (no best recorded), resumed, validated, its best kept at that same
    step 2 and killed after renaming the weights: no best is recorded, so neither copy nor weights may stay."""
    from m2r.engine.bests import align_best_with_resume

    best_copy(tmp_path, 2)
    (tmp_path / "best_psnr/latest").write_text("step00000002")
    exported_weights_of(tmp_path, 2)
    exported = capture_exports(monkeypatch)
    align_best_with_resume(tmp_path, tmp_path / "checkpoints", "psnr", None, resumed_at(tmp_path, 2))
    assert exported == [] and not (tmp_path / "best_psnr.safetensors").exists()
    assert complete_tags(tmp_path / "best_psnr") == [] and not (tmp_path / "best_psnr/latest").exists()


def test_a_best_copy_at_the_resumed_step_itself_is_removed_when_that_step_did_not_record_it(tmp_path, monkeypatch):
    """Resumed at step 4, whose checkpoint recorded the best of step 2: a copy at step 4 is one an epoch end kept
    before a kill (the run had stopped on epoch 2's last step and saved it; resumed, it validated and kept its best,
    then died before saving step 4 again). Never saved, it is removed (it holds a whole checkpoint's bytes), not set
    aside, and `best_psnr/` readers must not take it."""
    from m2r.engine.bests import align_best_with_resume

    for step in (2, 4):
        best_copy(tmp_path, step)
    (tmp_path / "best_psnr/latest").write_text("step00000004")
    (tmp_path / "checkpoints/step00000004").mkdir(parents=True)   # saved by the stop, before the validation
    (tmp_path / "checkpoints/step00000004/meta.json").write_text(json.dumps({"step": 4}))
    exported_weights_of(tmp_path, 4)
    (tmp_path / "best_psnr.json").write_text(json.dumps({"value": 9.5, "epoch": 2, "step": 4}))
    exported = capture_exports(monkeypatch)
    changes = align_best_with_resume(tmp_path, tmp_path / "checkpoints", "psnr", {"value": 9.0, "epoch": 1, "step": 2},
                                     resumed_at(tmp_path, 4))
    assert changes[0] == "step00000004 removed (their epochs' checkpoints were never saved)", changes
    assert exported == [str(tmp_path / "best_psnr/step00000002")]
    assert sorted(p.name for p in (tmp_path / "best_psnr").iterdir()) == ["latest", "step00000002"]
    assert resolve_resume("latest", tmp_path / "best_psnr").tag == "step00000002"


def test_a_best_copy_at_the_step_of_another_runs_resumed_checkpoint_is_set_aside(tmp_path):
    """Resumed from another run.dir's step 4, which recorded the best of step 2: this run's own step 4 recorded its
    copy there, which was saved (a branch this run abandons), so it is set aside, not removed."""
    from m2r.engine.bests import align_best_with_resume

    for step in (2, 4):
        best_copy(tmp_path, step)
    (tmp_path / "checkpoints/step00000004").mkdir(parents=True)
    (tmp_path / "checkpoints/step00000004/meta.json").write_text(json.dumps({"step": 4}))
    align_best_with_resume(tmp_path, tmp_path / "checkpoints", "psnr", {"value": 9.0, "epoch": 1, "step": 2},
                           CheckpointRef(tmp_path / "other/checkpoints", "step00000004"))
    assert sorted(p.name for p in (tmp_path / "best_psnr/abandoned").iterdir()) == ["step00000004"]


@pytest.mark.parametrize("ema", [True, False])
def test_a_best_exported_again_at_resume_holds_the_weights_that_were_validated(tmp_path, monkeypatch, ema):
    """With an EMA, validation scored the EMA weights: the export made again from the recorded best's checkpoint
    holds them, as the one made when it was the best did (that checkpoint's meta.json says whether it has them)."""
    from m2r.engine import bests

    (tmp_path / "best_psnr/step00000002").mkdir(parents=True)
    (tmp_path / "best_psnr/step00000002/meta.json").write_text(json.dumps({"step": 2, "ema": ema}))
    calls = []
    monkeypatch.setattr(bests, "export", lambda source, target, use_ema, companions: calls.append(use_ema))
    bests.align_best_with_resume(tmp_path, tmp_path / "checkpoints", "psnr", {"value": 9.0, "epoch": 1, "step": 2},
                                 resumed_at(tmp_path, 2))
    assert calls == [ema]


def test_ranks_train_on_rank_0s_listing_of_the_dataset(repo_root, tmp_path):
    """A rank listing fewer images would run fewer steps per epoch and wait for the others forever."""
    allweather = build_allweather(tmp_path / "allweather", size=(40, 48), train=8)
    log = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "tests/stale_listing.py",
               "finetune.py", "--config", "configs/finetune/tiny-test.yaml", f"data.root={allweather}",
               "train.epochs=1", "train.warmup_epochs=0", f"run.dir={tmp_path / 'run'}"], repo_root, timeout=120)
    assert "2 steps/epoch x 1 epochs = 2 steps" in log and "checkpoints/step00000002" in log
    assert "init: no init.weights: the network starts from random weights" in log   # not a silent default
    assert re.search(r"validation sets \(images of each, at most data.val_images_per_set=\d+\): "
                     r"outdoor_rain \d+, ", log)


def test_a_folder_finetune_validates_each_set_subfolder_of_val_root_data_val_sets_chooses(repo_root, tmp_path):
    """A lab's own test sets, one subfolder each (<val_root>/<set>/{input,gt}): val_psnr_<set> per set chosen,
    in data.val_sets' order, and val_psnr, which picks the best, over every validation image."""
    for i in range(4):
        write_pair(tmp_path / f"train/input/{i}.png", tmp_path / f"train/gt/{i}.png", (40, 48), i)
    for j, name in enumerate(("day", "night", "fog")):
        write_pair(tmp_path / f"val/{name}/input/0.png", tmp_path / f"val/{name}/gt/0.png", (40, 48), 10 + j)
    run_dir = tmp_path / "run"
    log = run([sys.executable, "finetune.py", "--config", "configs/finetune/tiny-test.yaml", "data.dataset=folder",
               f"data.root={tmp_path / 'train'}", f"data.val_root={tmp_path / 'val'}", "data.val_sets=[night,day]",
               "model.moe.ep_size=1", "train.epochs=1", "train.warmup_epochs=0", f"run.dir={run_dir}"], repo_root)
    assert "validation sets (images of each, at most data.val_images_per_set=1): night 1, day 1" in log
    records = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "val_psnr" in r]
    assert [r["step"] for r in records] == [0, 2]
    for record in records:
        assert {k for k in record if k.startswith("val_psnr_")} == {"val_psnr_night", "val_psnr_day"}
        assert record["val_psnr"] == pytest.approx((record["val_psnr_night"] + record["val_psnr_day"]) / 2)


def test_a_finetune_stopped_mid_epoch_and_at_an_epoch_end_continues_exactly(repo_root, tmp_path):
    """Gate noise and the loader's seed come out as in one uninterrupted run; the step saved at an
    epoch's end is saved again after the resumed validation (replaced only once complete)."""
    allweather = build_allweather(tmp_path / "allweather", size=(40, 48), train=8)
    base = [sys.executable, "finetune.py", "--config", "configs/finetune/tiny-test.yaml", f"data.root={allweather}",
            "model.moe.ep_size=1", "train.grad_accum=2", "train.epochs=4"]   # 2 steps per epoch, gate noise on
    run([*base, f"run.dir={tmp_path / 'straight'}"], repo_root)
    split = tmp_path / "split"
    assert "stopping at step 3: run.stop_after_steps=3 reached in epoch 2 of 4" in run(
        [*base, f"run.dir={split}", "run.stop_after_steps=3"], repo_root)
    resumed = run([*base, f"run.dir={split}", "run.stop_after_steps=1"], repo_root)
    # at an epoch's last step: the epoch is validated (and its bests kept) before the run stops
    assert "stopping at step 4: run.stop_after_steps=1 reached at the end of epoch 2 of 4" in resumed
    assert "val step 4:" in resumed
    assert "init: no init.weights" not in resumed   # a resume has the checkpoint's weights
    run([*base, f"run.dir={split}"], repo_root)

    def records(run_dir, kind):   # what the run computed, not its timings or running averages
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k == "step" or k.startswith(kind) or k in ("loss", "lr", "grad_norm")}
                for r in lines if kind in r]
    for kind in ("pixel_loss", "val_psnr"):
        assert records(tmp_path / "straight", kind) == records(split, kind)
    assert sorted(p.name for p in (split / "checkpoints").iterdir() if p.is_dir()) == ["step00000006", "step00000008"]


def test_run_stop_after_steps_reaching_the_last_step_finishes_the_finetune_as_pretraining_does(repo_root, tmp_path):
    """Pretraining stopped by run.stop_after_steps at its last step validates and finishes; so does a finetune:
    its last epoch validated, its bests exported, not an unfinished run waiting for another launch."""
    allweather = build_allweather(tmp_path / "allweather", size=(40, 48), train=8)
    command = [sys.executable, "finetune.py", "--config", "configs/finetune/tiny-test.yaml", f"data.root={allweather}",
               "model.moe.ep_size=1", f"run.dir={tmp_path / 'run'}"]
    log = run([*command, "run.stop_after_steps=8"], repo_root)   # 2 epochs x 4 steps
    assert "val step 8:" in log and "stopping at step 8: finished" in log
    assert json.loads((tmp_path / "run/best_psnr.json").read_text())["epoch"] == 2
    # launched again (a requeue after the end), as pretraining says so: not 'epoch 3 of 2'
    again = run(command, repo_root)
    assert "step00000008: after epoch 2, step 8\ntrain.epochs=2 is reached already (the checkpoint is after epoch 2)" \
        in again and "stopping at step 8: finished" in again and "epoch 3" not in again


def test_a_data_error_mid_epoch_with_workers_running_ends_the_run_with_the_error(repo_root, tmp_path):
    """Workers ignore SIGTERM (SLURM signals them too), so they must be stopped explicitly when an
    exception leaves the loop, or Python's exit would wait on them forever."""
    allweather = build_allweather(tmp_path / "allweather", size=(40, 48), train=8)
    damaged = allweather / "train/input/im_0005.png"
    damaged.write_bytes(damaged.read_bytes()[:200])   # its header passes the up-front check; its pixels fail
    command = [sys.executable, "finetune.py", "--config", "configs/finetune/tiny-test.yaml", f"data.root={allweather}",
               "model.moe.ep_size=1", "data.workers=1", f"run.dir={tmp_path / 'run'}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu")
    result = subprocess.run(command, cwd=repo_root, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "in DataLoader worker process" in result.stderr
    assert "train/input/im_0005.png: cannot read image" in result.stderr


@pytest.mark.parametrize("path", sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").glob("*/*.yaml")
                                        if p.parent.name in ("pretrain", "finetune")))
def test_every_shipped_recipe_loads_and_validates_on_8_gpus(path):
    from m2r.engine.config import PretrainConfig, validate_pretrain_config

    if "finetune" in path:
        validate_finetune_config(load_config(FinetuneConfig, REPO / path, ["data.root=/data"]), world_size=8)
    else:
        validate_pretrain_config(load_config(PretrainConfig, REPO / path, ["data.shards=/data/shards"]), world_size=8)


@pytest.mark.parametrize("name", ["allweather", "cdd11", "allweather-plus", "cdd11-plus"])
def test_each_finetune_recipe_starts_from_the_pretraining_recipe_of_its_network(name):
    """The init.weights its header suggests is a pretraining run.dir whose network it accepts."""
    from omegaconf import OmegaConf

    from m2r.engine.config import PretrainConfig
    from m2r.models.config import network_differences

    path = REPO / f"configs/finetune/{name}.yaml"
    run_dir = re.search(r"init\.weights=(\S+)/checkpoints", path.read_text()).group(1)
    pretraining = [cfg for cfg in (load_config(PretrainConfig, p) for p in (REPO / "configs/pretrain").glob("*.yaml"))
                   if cfg.run.dir == run_dir]
    assert len(pretraining) == 1, run_dir
    finetune = load_config(FinetuneConfig, path, ["data.root=/data"])
    assert network_differences(OmegaConf.to_container(pretraining[0].model), finetune.model) == []


def test_an_exact_finetune_resume_restores_the_best_metrics_so_far(capsys):
    """Forgetting `best` makes the first validation after a resume a 'new best' whatever its value:
    best_<metric>.safetensors/.json are overwritten with worse weights."""
    best = {"psnr": {"value": 30.0, "epoch": 1, "step": 4}}
    client = {"step": 5, "epoch": 2, "samples_into_epoch": 4, "best": best}
    stub = SimpleNamespace(step=0, epoch=0, samples_into_epoch=0, best={},
                           cfg=SimpleNamespace(train=SimpleNamespace(epochs=4)))
    stub._load_checkpoint = lambda ref: (stub.__dict__.update(step=client["step"]) or client, {"rng": 1})
    stub._restore_ema = lambda ref: None
    stub._align_bests_with_resume = lambda: None
    stub._epoch_name = lambda: Finetuner._epoch_name(stub)
    stub._check_training_set = lambda client, ref: None
    stub._check_validation_sets = lambda client, ref: None
    stub._position_kept_elsewhere = lambda client: False
    Finetuner._resume(stub, SimpleNamespace(path="ckpt"))
    assert (stub.epoch, stub.samples_into_epoch, stub.best) == (2, 4, best)


def test_the_finetune_cosine_ends_at_schedule_epochs_and_warms_up_over_warmup_epochs(tmp_path):
    """Train.schedule_epochs (the paper recipes' cosine end, before the last epoch) must reach the schedule."""
    from m2r import dist

    root = build_allweather(tmp_path / "aw", size=(40, 48), train=8)
    cfg = load_config(FinetuneConfig, REPO / "configs/finetune/tiny-test.yaml",
                      [f"data.root={root}", "train.epochs=4", "train.schedule_epochs=2", "train.warmup_epochs=1"])
    stub = SimpleNamespace(cfg=cfg, device=torch.device("cpu"))
    stub._val_batches = lambda sets: []
    stub._validation_sets = lambda: Finetuner._validation_sets(stub)
    Finetuner._build_data(stub, dist.DistEnv(0, 1, 0, "none"))
    assert stub.steps_per_epoch == 4 and Finetuner._schedule_length(stub) == 16
    assert (stub.schedule.warmup_steps, stub.schedule.steps) == (4, 8)


@pytest.mark.parametrize("device, pinned", [("cuda", True), ("cpu", False)])
def test_the_finetune_loader_pins_its_batches_for_a_gpu_only(tmp_path, device, pinned):
    """Page-locked batches let their copies to the GPU run without blocking the host (built here, never iterated:
    no GPU needed)."""
    from m2r import dist

    root = build_allweather(tmp_path / "aw", size=(40, 48), train=8)
    cfg = load_config(FinetuneConfig, REPO / "configs/finetune/tiny-test.yaml", [f"data.root={root}"])
    stub = SimpleNamespace(cfg=cfg, device=torch.device(device), _val_batches=lambda sets: [],
                           _validation_sets=lambda: {})
    Finetuner._build_data(stub, dist.DistEnv(0, 1, 0, "none"))
    assert stub.loader.pin_memory is pinned


def _finetuner_stub(epoch, epochs, signal=None, stop_after_epochs=0, stopped_in_epoch=None):
    stub = SimpleNamespace(epoch=epoch, step=2 * epoch, finished_calls=[], saves=0, validations=0, steps_this_run=0,
                           _planned_stop_reason=lambda steps_this_run, finished: None,
                           cfg=SimpleNamespace(train=SimpleNamespace(epochs=epochs),
                                               run=SimpleNamespace(stop_after_epochs=stop_after_epochs)),
                           stop_request=SimpleNamespace(agreed_reason=lambda: signal))

    def run_epoch():
        stub.step += 1
        if stopped_in_epoch is not None:   # a signal or run.stop_after_steps after this step
            return stopped_in_epoch
        stub.step += 1
        stub.epoch += 1
    def validate():
        stub.validations += 1
        return {}
    def save_checkpoint(before_publish=None):
        stub.saves += 1
    stub.run_epoch, stub.validate, stub.save_checkpoint = run_epoch, validate, save_checkpoint
    stub.record_bests = lambda metrics: []
    stub._epoch_name = lambda: Finetuner._epoch_name(stub)
    stub._train_epochs = lambda: Finetuner._train_epochs(stub)
    stub._finish = lambda reason, finished, closing_lines=(): stub.finished_calls.append((reason, finished))
    return stub


@pytest.mark.parametrize("epoch, finished", [(1, False), (4, True)])
def test_a_signal_during_start_up_stops_the_finetune_untrained_and_tells_the_job_script_unless_done(epoch, finished):
    stub = _finetuner_stub(epoch, epochs=4, signal="received SIGUSR1")
    assert Finetuner.fit(stub) == 0
    assert stub.finished_calls == [("received SIGUSR1", finished)] and stub.saves == 0 and stub.epoch == epoch


def test_run_stop_after_epochs_trains_validates_and_saves_exactly_that_many_epochs():
    stub = _finetuner_stub(0, epochs=4, stop_after_epochs=1)
    Finetuner.fit(stub)
    assert stub.finished_calls == [("run.stop_after_epochs=1 reached", False)]
    assert (stub.epoch, stub.validations, stub.saves) == (1, 2, 1)   # the starting weights, then epoch 1's


def test_a_resumed_finetune_does_not_validate_its_start_again():
    stub = _finetuner_stub(1, epochs=4, stop_after_epochs=1)
    Finetuner.fit(stub)
    assert (stub.epoch, stub.validations, stub.saves) == (2, 1, 1)


def test_the_last_epoch_finishes_the_finetune():
    stub = _finetuner_stub(2, epochs=4)
    Finetuner.fit(stub)
    assert stub.finished_calls == [("finished", True)] and stub.saves == 2


def test_a_stop_inside_an_epoch_is_saved_unvalidated_and_named_with_the_epoch():
    stub = _finetuner_stub(1, epochs=4, stopped_in_epoch="run.stop_after_steps=1 reached")
    Finetuner.fit(stub)
    assert stub.finished_calls == [("run.stop_after_steps=1 reached in epoch 2 of 4", False)]
    assert (stub.epoch, stub.validations, stub.saves) == (1, 0, 1)


def test_each_kind_of_init_weights_passes_the_config_check_and_another_file_is_named(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    for name in ("best_psnr.safetensors", "m2restore.ckpt", "m2restore.pth", "m2restore.pt", "m2restore.yaml"):
        (tmp_path / name).write_bytes(b"")
    for weights in (None, "checkpoints", "best_psnr.safetensors", "m2restore.ckpt", "m2restore.pth", "m2restore.pt"):
        check_init_weights_kind(weights and str(tmp_path / weights))
    with pytest.raises(ConfigError, match="key 'init.weights'"):
        check_init_weights_kind(str(tmp_path / "m2restore.yaml"))


def test_init_weights_kind_is_one_decision_for_every_rank(tmp_path):
    """Scratch, a checkpoint directory (loaded into the engine) or a file (into the model); a missing path
    is named. Decided on rank 0: whether it is a directory decides which collectives the ranks run."""
    weights = tmp_path / "m2restore.safetensors"
    weights.write_bytes(b"")
    assert [init_weights_kind(w) for w in (None, "", str(tmp_path), str(weights))] == [None, None, "dir", "file"]
    with pytest.raises(FileNotFoundError, match="init.weights=.*gone: no such file or directory"):
        init_weights_kind(str(tmp_path / "gone"))


def test_a_best_is_an_improvement_and_never_a_diverged_validation():
    """A tie does not replace the best. NaN compares as neither above nor below: taken as a best, it
    replaced the best weights with the diverged ones (their export too), and any later value counted as
    a new best."""
    printed = []
    stub = SimpleNamespace(cfg=SimpleNamespace(run=SimpleNamespace(best_metrics=["psnr", "ssim"])), best={},
                           monitor=SimpleNamespace(print=printed.append))
    improved = []
    for epoch, (psnr, ssim) in enumerate([(20.0, 0.5), (25.0, 0.5), (float("nan"), 0.6), (25.0, 0.6)], start=1):
        stub.epoch, stub.step = epoch, 2 * epoch
        improved.append(Finetuner.record_bests(stub, {"psnr": psnr, "ssim": ssim}))
    assert improved == [["psnr", "ssim"], ["psnr"], ["ssim"], []]
    assert stub.best == {"psnr": {"value": 25.0, "epoch": 2, "step": 4}, "ssim": {"value": 0.6, "epoch": 3, "step": 6}}
    assert any("validation psnr is nan at epoch 3: not a best" in line for line in printed)


def test_each_improved_metric_keeps_the_epochs_checkpoint_and_exports_its_weights(monkeypatch, tmp_path):
    """Before the epoch's checkpoint is published: best_<metric>/ gets it (hard links) and
    best_<metric>.safetensors its weights, with best_<metric>.json beside them."""
    from m2r.engine import bests

    staged = tmp_path / "checkpoints/step00000004.partial"
    staged.mkdir(parents=True)
    (staged / "mp_rank_00_model_states.pt").write_bytes(b"weights")   # staged: no meta.json yet
    exported = []
    monkeypatch.setattr(bests, "export", lambda source, target, use_ema, companions:
                        exported.append((source, target, use_ema, companions)))
    stub = SimpleNamespace(run_dir=tmp_path, step=4, epoch=2, ema=None, KIND="finetune",
                           best={"psnr": {"value": 25.0, "epoch": 2, "step": 4}},
                           monitor=SimpleNamespace(print=lambda line: None))
    Finetuner._keep_bests(stub, ["psnr"], staged, {"step": 4})
    kept = tmp_path / "best_psnr/step00000004"
    assert json.loads((kept / "meta.json").read_text()) == {"step": 4} and not (staged / "meta.json").exists()
    assert os.stat(kept / "mp_rank_00_model_states.pt").st_ino == os.stat(staged / "mp_rank_00_model_states.pt").st_ino
    ((source, target, use_ema, companions),) = exported
    assert (source, target, use_ema) == (str(kept), str(tmp_path / "best_psnr.safetensors"), False)
    assert {path: json.loads(text) for path, text in companions.items()} == \
        {tmp_path / "best_psnr.json": {"value": 25.0, "epoch": 2, "step": 4}}


def test_a_finetune_step_counts_its_wait_for_data():
    """data_wait_share (console `data N%`, TensorBoard) must show a slow loader in finetuning too."""
    import time

    from m2r.engine.monitor import StepTimer
    from m2r.engine.run import TrainingRun

    def slow_batches():
        while True:
            time.sleep(0.05)
            yield {}
    pulled = []
    stub = SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(grad_accum=2)), schedule=None,
                           _next_batch=TrainingRun._next_batch,
                           schedule_position=lambda: 0,
                           _optimizer_step=lambda micro_batches, schedule, position: pulled.extend(micro_batches))
    timer = StepTimer()
    Finetuner.train_step(stub, slow_batches(), timer)
    assert len(pulled) == 2 and timer.data_seconds >= 0.09


@pytest.mark.parametrize("epochs, accepted", [(200, True), (262, True), (263, False)])
def test_the_cosine_may_run_past_schedule_epochs_until_it_is_back_at_half_height(repo_root, epochs, accepted):
    """Warmup 15, cosine ending at epoch 180 (the paper recipe): 15 + 1.5 x 165 = 262 epochs at most."""
    from m2r.config import ConfigError
    from m2r.engine.config import validate_finetune_config

    cfg = load_config(FinetuneConfig, Path(repo_root) / "configs/finetune/tiny-test.yaml",
                      ["data.root=/data", f"train.epochs={epochs}", "train.schedule_epochs=180",
                       "train.warmup_epochs=15"])
    if accepted:
        validate_finetune_config(cfg, 2)
    else:
        with pytest.raises(ConfigError, match="key 'train.epochs'.*climbs back over halfway to train.lr: at most 262"):
            validate_finetune_config(cfg, 2)


def test_an_epoch_counts_whole_accumulations_of_whole_micro_batches():
    from m2r.engine.finetuner import optimizer_steps_in

    # 13 samples a rank: 6 micro-batches of 2 (the loader drops the last partial one), 2 steps of 3 of them
    assert optimizer_steps_in(list(range(13)), SimpleNamespace(micro_batch=2, grad_accum=3)) == 2


def test_every_rank_loads_init_weights_as_rank_0_sees_them(monkeypatch, tmp_path):
    """A checkpoint directory loads into the engine (collectives), a file into the model before it: a rank
    judging a stale NFS view itself (the directory not there yet) would take the other path, or fail alone."""
    from m2r.engine import finetuner, run

    weights, calls = tmp_path / "pretrain/checkpoints", []   # rank 0 sees a directory; this rank nothing

    def start(self, cfg, env, validate, stop_request=None):
        self.cfg, self.resume_ref, self.total_steps = cfg, None, 1
    monkeypatch.setattr(run.TrainingRun, "__init__", start)
    monkeypatch.setattr(finetuner.dist, "on_rank0", lambda work: "dir")   # rank 0's answer, broadcast
    for name in ("_build_data", "_start_ema", "_seed_rng", "_count_steps_to_the_end", "_open_monitor"):
        monkeypatch.setattr(Finetuner, name, lambda self, *args: None)
    monkeypatch.setattr(Finetuner, "_build_model", lambda self: "model")
    monkeypatch.setattr(Finetuner, "_load_init_weights", lambda self, model: calls.append("file"))

    def check(self, path):
        calls.append(("checked", path))
        return "ref", True

    monkeypatch.setattr(Finetuner, "_checked_init_checkpoint", check)
    monkeypatch.setattr(Finetuner, "_start_engine", lambda self, model: calls.append("engine"))
    monkeypatch.setattr(Finetuner, "_load_pretraining_checkpoint", lambda self, *ref: calls.append(("dir", ref)))
    monkeypatch.setattr(Finetuner, "startup_summary", lambda self: "")
    Finetuner(SimpleNamespace(init=SimpleNamespace(weights=str(weights))), env=None)
    # checked (network, EMA) before the engine is built, loaded into it after
    assert calls == [("checked", str(weights)), "engine", ("dir", ("ref", True))]


def load_pretraining_checkpoint(monkeypatch, has_ema: bool, use_ema: bool, loaded: list):
    """Finetuner's check and load of a pretraining checkpoint with or without an EMA; `loaded` gets what it loads."""
    from m2r.engine import finetuner
    from m2r.engine.checkpoint import Topology

    ref = SimpleNamespace(path=Path("runs/p/checkpoints/step00000006"), saved_model_config=lambda: {},
                          topology=lambda: Topology(1, 1, "fp32", 1), meta=lambda: {"ema": has_ema})
    monkeypatch.setattr(finetuner, "checkpoint_at", lambda directory, key: ref)
    monkeypatch.setattr(finetuner, "load_weights_only", lambda engine, ref: loaded.append("trained"))
    monkeypatch.setattr(finetuner, "own_files_lacking", lambda engine, ref, exact: None)
    monkeypatch.setattr(finetuner, "load_ema_states", lambda ref: {"w": "ema"})
    monkeypatch.setattr(finetuner, "load_trainable_weights", lambda engine, state, source: loaded.append(state["w"]))
    stub = SimpleNamespace(engine=None, cfg=SimpleNamespace(init=SimpleNamespace(use_ema=use_ema)),
                           _require_init_network=lambda saved, source: None)
    Finetuner._load_pretraining_checkpoint(stub, *Finetuner._checked_init_checkpoint(stub, "runs/p/checkpoints"))


@pytest.mark.parametrize("ema", [True, False])
def test_init_from_a_pretraining_checkpoint_with_an_ema_says_which_weights_it_starts_from(monkeypatch, capsys, ema):
    """Pretraining's validation (its TensorBoard PSNR) scored the EMA; init.weights=<dir> takes the trained
    weights: say so, and how to start from the EMA instead, not leave the user to find it in the README."""
    loaded = []
    load_pretraining_checkpoint(monkeypatch, has_ema=ema, use_ema=False, loaded=loaded)
    out = capsys.readouterr().out
    assert loaded == ["trained"]
    assert ("also holds EMA weights" in out and "init.use_ema=true" in out) == ema


def test_init_use_ema_starts_from_the_ema_of_a_pretraining_checkpoint(monkeypatch, capsys):
    loaded = []
    load_pretraining_checkpoint(monkeypatch, has_ema=True, use_ema=True, loaded=loaded)
    assert loaded == ["trained", "ema"]   # the EMA over the trained weights (it holds no buffers)
    assert "init: EMA weights from runs/p/checkpoints/step00000006 (init.use_ema;" in capsys.readouterr().out


def test_init_from_a_pretraining_checkpoint_lacking_an_expert_file_is_refused_before_any_load(monkeypatch, tmp_path):
    """init.weights=<dir> whose tag lacks one expert's file (DeepSpeed's layer_<L>_expert_<E>_... , layers numbered
    in module order) stops with a CheckpointMismatch naming it, before DeepSpeed reads any file (its
    FileNotFoundError would stop the ranks missing it alone); a complete tag passes the check."""
    from m2r.engine import finetuner
    from m2r.engine.checkpoint import Topology, expert_file
    from m2r.models.config import ModelConfig
    from m2r.models.m2restore import build_model

    model = build_model(load_config(ModelConfig, "configs/model/tiny.yaml"), with_clip_prior=False)
    ref = CheckpointRef(tmp_path, tag_for(6))
    ref.path.mkdir()
    for layer in range(3):   # the tiny model's DDER 1 to 3, 4 experts each
        for expert in range(4):
            (ref.path / expert_file(layer, expert)).touch()
    loaded = []
    monkeypatch.setattr(finetuner, "load_weights_only", lambda engine, ref: loaded.append(ref))
    monkeypatch.setattr(CheckpointRef, "topology", lambda self: Topology(1, 1, "fp32", 1))
    stub = SimpleNamespace(engine=SimpleNamespace(module=model),
                           cfg=SimpleNamespace(init=SimpleNamespace(use_ema=False)))
    Finetuner._load_pretraining_checkpoint(stub, ref, False)
    assert loaded == [ref]
    (ref.path / expert_file(2, 1)).unlink()
    with pytest.raises(finetuner.CheckpointMismatch, match=re.escape(
            f"init.weights: {ref.path} lacks the files of 1 experts (layer 2 expert 1): the checkpoint is incomplete; "
            "give it a complete pretraining checkpoint")):
        Finetuner._load_pretraining_checkpoint(stub, ref, False)
    assert loaded == [ref]


def test_init_use_ema_from_a_checkpoint_without_an_ema_stops_the_run_naming_the_key_and_the_checkpoint(monkeypatch):
    """Not a silent start from the trained weights: the user asked for what the pretraining validation scored."""
    loaded = []
    with pytest.raises(ConfigError, match=r"key 'init.use_ema': runs/p/checkpoints/step00000006 \(init.weights\) "
                                          "holds no EMA weights"):
        load_pretraining_checkpoint(monkeypatch, has_ema=False, use_ema=True, loaded=loaded)
    assert loaded == []


@pytest.mark.parametrize("weights", [None, "weights.safetensors"])
def test_init_use_ema_without_a_checkpoint_directory_to_take_it_from_is_refused(repo_root, tmp_path, weights):
    """A file holds one set of weights (m2r.export --ema writes a checkpoint's EMA to one): nothing to choose."""
    if weights:
        (tmp_path / weights).write_bytes(b"")
    start = [f"init.weights={tmp_path / weights}"] if weights else []
    cfg = load_config(FinetuneConfig, Path(repo_root) / "configs/finetune/tiny-test.yaml",
                      ["data.root=/data", "init.use_ema=true", *start])
    with pytest.raises(ConfigError, match="key 'init.use_ema'.*" + ("is a file" if weights else "needs init.weights")):
        validate_finetune_config(cfg, world_size=2)


def test_a_finetune_from_a_checkpoints_ema_trains_as_one_from_the_ema_exported(repo_root, tmp_path):
    """init.use_ema=true with a pretraining checkpoint directory starts where init.weights=<its m2r.export --ema>
    does: the same validation at step 0 and the same losses after, at 2 ranks with the experts split over them
    (the EMA's experts taken by global id, and the fp32 masters ZeRO partitions set as well as the module: else
    the first optimizer step would bring the trained weights back)."""
    from m2r.export import export

    python = sys.executable
    pretrain_dir = tmp_path / "pretrain"
    run([python, "pretrain.py", "--config", "configs/pretrain/tiny-test.yaml", "train.steps=2",
         "train.warmup_steps=0", "train.ema_decay=0.5", "run.image_every=0", f"run.dir={pretrain_dir}"], repo_root)
    ref = resolve_resume("latest", pretrain_dir / "checkpoints")
    ema_weights, trained_weights = export_state_dict(ref, use_ema=True)[0], export_state_dict(ref)[0]
    assert any(not torch.equal(trained_weights[name], ema_weights[name]) for name in ema_weights)
    exported = export(str(pretrain_dir / "checkpoints"), str(tmp_path / "ema.safetensors"), use_ema=True)
    allweather = build_allweather(tmp_path / "allweather", size=(40, 48), train=8)
    finetune = [python, "-m", "torch.distributed.run", "--nproc_per_node", "2", "finetune.py", "--config",
                "configs/finetune/tiny-test.yaml", f"data.root={allweather}", "train.epochs=1", "train.warmup_epochs=0"]
    log = run([*finetune, f"init.weights={pretrain_dir / 'checkpoints'}", "init.use_ema=true",
               f"run.dir={tmp_path / 'from-dir'}"], repo_root)
    assert f"init: EMA weights from {ref.path} (init.use_ema;" in log
    run([*finetune, f"init.weights={exported}", f"run.dir={tmp_path / 'from-export'}"], repo_root)

    def losses_and_validations(run_dir):
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [{key: value for key, value in record.items() if "loss" in key or key.startswith("val_")}
                for record in records]

    from_dir = losses_and_validations(tmp_path / "from-dir")
    assert sum("loss" in record for record in from_dir) == 2 and sum("val_psnr" in record for record in from_dir) == 2
    assert from_dir == losses_and_validations(tmp_path / "from-export")


def test_a_resume_takes_its_load_path_from_rank_0s_read_of_the_topology(monkeypatch):
    """Whether the checkpoint loads exactly (DeepSpeed's load) or re-partitioned decides the collectives every
    rank runs: a rank whose own read of meta.json fails or is stale must follow rank 0's."""
    from m2r.engine import run
    from m2r.engine.checkpoint import Topology

    here = Topology(2, 1, "fp32", 1)

    def stale_read():
        raise FileNotFoundError("meta.json: stale NFS handle")
    loaded = []
    client = {"step": 5, "rng_states": ["rng of rank 0"]}
    monkeypatch.setattr(run.dist, "on_rank0", lambda work: here)   # rank 0's read, broadcast
    monkeypatch.setattr(run, "apply_optimizer_settings", lambda optimizer, train: None)
    engine = SimpleNamespace(load_checkpoint=lambda root, tag: loaded.append(tag) or (None, client),
                             module=torch.nn.Module(), zero_optimization=lambda: False)   # no experts, no ZeRO
    stub = SimpleNamespace(topology=here, optimizer=None, cfg=SimpleNamespace(train=None), step=0, engine=engine)
    ref = SimpleNamespace(topology=stale_read, root="ckpt", tag="step00000005", path="ckpt/step00000005")
    assert run.TrainingRun._load_checkpoint(stub, ref) == (client, "rng of rank 0")
    assert loaded == ["step00000005"] and stub.step == 5


def test_a_copy_of_the_recorded_best_missing_a_file_does_not_stop_the_resume(tmp_path):
    """A copy complete by its meta.json but lacking its weight files (a kill while pruning removed them first, or
    a user): its export fails with FileNotFoundError, which must not stop the resume any more than a damaged one."""
    from m2r.engine.bests import align_best_with_resume

    best_copy(tmp_path, 4)
    for suffix in (".safetensors", ".yaml", ".json"):
        (tmp_path / f"best_psnr{suffix}").write_text(json.dumps({"value": 12.0, "epoch": 5, "step": 10}))
    changes = align_best_with_resume(tmp_path, tmp_path / "checkpoints", "psnr",
                                     {"value": 9.0, "epoch": 2, "step": 4}, resumed_at(tmp_path, 4))
    assert len(changes) == 1 and changes[0].startswith("best_psnr.safetensors removed until the next best (")
    assert not list(tmp_path.glob("best_psnr.*"))


def test_a_complete_staged_best_copy_of_an_abandoned_epoch_is_not_published_by_the_next_best(tmp_path):
    """Killed between writing best_psnr/step12.partial/meta.json and its rename; the restart resumed step 10, whose
    checkpoint recorded the best of step 6, and (at another topology, say) epoch 6 is no best this time. The next
    best, step 14, must not publish the abandoned step 12 as a best copy, nor prune the recorded step 6 for it."""
    from m2r.engine.bests import align_best_with_resume, best_checkpoints

    for step in (2, 6):
        best_copy(tmp_path, step)
    (tmp_path / "best_psnr/latest").write_text("step00000006")
    staged = tmp_path / "best_psnr/step00000012.partial"
    staged.mkdir()
    (staged / "meta.json").write_text(json.dumps({"step": 12}))
    recorded = {"value": 9.0, "epoch": 3, "step": 6}
    exported_weights_of(tmp_path, 6)
    (tmp_path / "best_psnr.json").write_text(json.dumps(recorded))
    (tmp_path / "best_psnr.yaml").write_text("{}")
    align_best_with_resume(tmp_path, tmp_path / "checkpoints", "psnr", recorded, resumed_at(tmp_path, 10))
    source = tmp_path / "checkpoints/step00000014.partial"
    source.mkdir(parents=True)
    (source / "config.yaml").write_text("{}")
    best_checkpoints(tmp_path, "psnr").keep_copy(source, 14, {"step": 14})
    assert complete_tags(tmp_path / "best_psnr") == ["step00000006", "step00000014"]


def test_a_resume_with_other_steps_per_epoch_continues_the_learning_rate_from_its_epoch(repo_root, tmp_path):
    """4 steps per epoch, stopped 2 steps into epoch 2 (step 6), resumed with grad_accum 2 (2 steps per epoch):
    the schedule (warmup 1 epoch, 3 epochs) continues from epoch 2's second half (schedule step 3 of 6), not from
    step 6 of 6 (past its end: a cosine rising again), and the run ends at step 9, reported as the last step."""
    from m2r.engine.optim import LRSchedule, learning_rate

    python = sys.executable
    allweather = build_allweather(tmp_path / "allweather", size=(40, 48), train=8)
    run_dir = tmp_path / "run"
    settings = ["--config", "configs/finetune/tiny-test.yaml", f"data.root={allweather}", "model.moe.ep_size=1",
                "train.epochs=3", "train.warmup_epochs=1", "train.min_lr=1.0e-5", f"run.dir={run_dir}"]
    run([python, "finetune.py", *settings, "run.stop_after_steps=6"], repo_root)
    log = run([python, "finetune.py", *settings, "train.grad_accum=2"], repo_root)
    assert "step 9/9 |" in log and "stopping at step 9: finished" in log, log
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
           if "lr" in r}
    before, after = LRSchedule(1.0e-3, 1.0e-5, 4, 12), LRSchedule(1.0e-3, 1.0e-5, 2, 6)
    assert sorted(lrs) == list(range(1, 10))
    assert [lrs[step] for step in range(1, 7)] == pytest.approx([learning_rate(s, before) for s in range(6)])
    assert [lrs[step] for step in (7, 8, 9)] == pytest.approx([learning_rate(s, after) for s in (3, 4, 5)])


@pytest.mark.parametrize("epoch, samples_into_epoch, step, total, said", [
    (1, 4, 6, 9, "resume: 2 steps per epoch here, other than before: step 6 is step 3 of the learning-rate "
                 "schedule, which goes on from epoch 2 of 3's place on it; the run ends at step 9\n"),
    (1, 0, 2, 6, ""),   # the steps per epoch as the run began: nothing to say
    (3, 0, 9, 9, ""),   # the run above, finished and launched again: it trains nothing (not 'epoch 4 of 3')
])
def test_the_start_of_a_run_whose_steps_per_epoch_changed_counts_its_end_and_shows_its_schedule_in_its_own_steps(
        repo_root, capsys, epoch, samples_into_epoch, step, total, said):
    """4 steps per epoch (grad_accum 1) up to step 6, 2 steps into epoch 2; now grad_accum 2, 2 steps per epoch:
    the console counts to step 9, while the schedule (warmup 1 epoch, 3 epochs) is 6 of its steps long. The summary
    describes that schedule in its own steps: over the 9 counted it would say the cosine rises again after step 6
    (5.05e-04 at the last step), which the learning rate, following the epochs, never does."""
    from m2r.engine.checkpoint import Topology
    from m2r.engine.optim import LRSchedule

    cfg = load_config(FinetuneConfig, Path(repo_root) / "configs/finetune/tiny-test.yaml",
                      ["train.epochs=3", "train.grad_accum=2", "train.min_lr=1.0e-5"])
    stub = SimpleNamespace(cfg=cfg, epoch=epoch, samples_into_epoch=samples_into_epoch, step=step,
                           steps_per_epoch=2, sampler=SimpleNamespace(num_samples=8),
                           schedule=LRSchedule(1.0e-3, 1.0e-5, warmup_steps=2, steps=6),
                           topology=Topology(1, 1, "fp32", 1), launcher="single", train_set=[None] * 8,
                           _training_folder=lambda: "train/input", _speed_settings=lambda: [],
                           _network_lines=lambda: [], val_names=["a"], val_counts=[1])
    for name in ("schedule_position", "_epoch_name", "_schedule_length", "_steps_left_in_epoch"):
        setattr(stub, name, getattr(Finetuner, name).__get__(stub))
    Finetuner._count_steps_to_the_end(stub)
    assert stub.total_steps == total and capsys.readouterr().out == said
    assert "| 2 steps/epoch x 3 epochs = 6 steps | warmup 2, cosine to min_lr after step 6\n" in \
        Finetuner.startup_summary(stub)


def test_a_dataset_shrunk_below_the_resumed_place_in_its_epoch_ends_that_epoch_not_the_run():
    """Resumed at the same topology 6 samples into an epoch of a folder now holding 4 per rank: the epoch's rest
    is empty (it is validated and saved, the next one starts), not `ValueError: __len__() should return >= 0`."""
    from m2r.engine.finetuner import ResumableSampler, optimizer_steps_in

    sampler = ResumableSampler(list(range(4)), num_replicas=1, rank=0, shuffle=True, seed=0, drop_last=True)
    sampler.skip = 6
    assert optimizer_steps_in(sampler, SimpleNamespace(micro_batch=2, grad_accum=1)) == 0 and list(sampler) == []


def test_a_resume_after_images_were_removed_mid_epoch_starts_the_epoch_again(repo_root, tmp_path):
    """16 images (8 steps per epoch at 1 rank), stopped 6 steps into epoch 1; the list file then names 8 (4 steps
    per epoch): the saved place (12 images in) is past the new epoch's end and points into another order of the
    images. The epoch starts again (it stopped the start, `len(sampler)` < 0), its learning rate from the epoch's
    start, the run ends after epoch 2 at step 6 + 2 x 4, and the summary describes the schedule, not a cosine that
    rises again after 8 steps."""
    from m2r.engine.optim import LRSchedule, learning_rate

    allweather = build_allweather(tmp_path / "allweather", size=(40, 48), train=16)
    names = (allweather / "filenames.txt").read_text().splitlines(keepends=True)
    run_dir = tmp_path / "run"
    command = [sys.executable, "finetune.py", "--config", "configs/finetune/tiny-test.yaml", f"data.root={allweather}",
               "model.moe.ep_size=1", "train.min_lr=1.0e-5", f"run.dir={run_dir}"]
    run([*command, "run.stop_after_steps=6"], repo_root)
    (allweather / "filenames.txt").write_text("".join(names[:8]))
    log = run(command, repo_root)
    assert "resume: the training set changed since step00000006: 16 -> 8 pairs\nWARNING: epoch 1 of 2 starts again " \
           "from its first image" in log, log
    assert "4 steps/epoch x 2 epochs = 8 steps | warmup 4, cosine to min_lr after step 8\n" in log
    assert "step 6 is step 0 of the learning-rate schedule, which goes on from epoch 1 of 2's place on it; the run " \
           "ends at step 14\n" in log
    assert "step 14/14 |" in log and "stopping at step 14: finished" in log
    lrs = [(r["step"], r["lr"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
           if "lr" in r]
    assert [step for step, _ in lrs] == list(range(1, 15))
    assert [lr for _, lr in lrs[6:]] == pytest.approx([learning_rate(s, LRSchedule(1.0e-3, 1.0e-5, 4, 8))
                                                       for s in range(8)])


def test_validation_set_names_for_a_training_folder_name_the_keys_that_chose_it(tmp_path):
    """data.val_sets without data.val_root asks the training folder (a layout, the one set 'folder') for sets."""
    from m2r.eval.datasets import DatasetLayoutError

    write_pair(tmp_path / "train/input/0.png", tmp_path / "train/gt/0.png", (40, 48), 0)
    data = SimpleNamespace(dataset="folder", root=str(tmp_path / "train"), val_root=None, val_sets=["night"])
    with pytest.raises(DatasetLayoutError, match=r"validation sets \(data.root=.*train \(data.val_root unset\), "
                                                 r"data.val_sets=\['night'\]\): sets \['night'\] asked for"):
        Finetuner._validation_sets(SimpleNamespace(cfg=SimpleNamespace(data=data)))


@pytest.mark.parametrize("saved, warns", [({"day": 4, "night": 4}, False),
                                          ({"day": 4}, True),                  # a set subfolder added since
                                          ({"day": 4, "night": 2}, True),      # images added to a set
                                          (None, False)])                      # an older checkpoint: trusted
def test_validation_sets_that_changed_since_the_checkpoint_are_named_with_the_bests_scored_on_them(capsys, saved,
                                                                                                  warns):
    """A folder's set subfolders are found anew at resume, with the same config: val_psnr then averages other
    images than the recorded bests, which a new best must beat."""
    stub = SimpleNamespace(val_names=["day", "night"], val_counts=[4, 4], best={"psnr": {"value": 30.0}})
    stub._validation_set_sizes = lambda: Finetuner._validation_set_sizes(stub)
    Finetuner._check_validation_sets(stub, {"val_sets": saved} if saved else {}, SimpleNamespace(tag="step00000005"))
    out = capsys.readouterr().out
    assert (f"WARNING: the validation sets changed since step00000005: {saved} -> {{'day': 4, 'night': 4}} (images "
            "per set): its bests (psnr 30.0000) were scored on the others" in out) is warns
    assert bool(out) is warns


@pytest.mark.parametrize("saved, into, restarts", [
    ({"pairs": 16, "sha256": "a"}, 12, False),    # the same images: the epoch goes on
    ({"pairs": 16, "sha256": "b"}, 12, True),     # images added to or removed from the list
    ({"pairs": 16, "sha256": "b"}, 0, False),     # at an epoch's end: nothing to start again
    (None, 12, False),                            # an older checkpoint: what it cannot tell, trusted
    (None, 20, False)])                           # ... its place past the epoch's end ends that epoch (the sampler)
def test_a_changed_training_set_starts_a_begun_epoch_again(capsys, saved, into, restarts):
    stub = SimpleNamespace(train_set_id={"pairs": 16, "sha256": "a"}, samples_into_epoch=into,
                           sampler=SimpleNamespace(num_samples=16), _epoch_name=lambda: "epoch 2 of 3")
    Finetuner._check_training_set(stub, {"train_set": saved} if saved else {}, SimpleNamespace(tag="step00000005"))
    assert stub.samples_into_epoch == (0 if restarts else into)
    out = capsys.readouterr().out
    assert ("epoch 2 of 3 starts again" in out) is restarts
    if saved is not None and saved["sha256"] == "b":   # as many pairs: the message says what else changed
        assert "16 -> 16 pairs (other images or another order)\n" in out


def test_a_signal_at_an_epochs_last_step_then_a_new_world_size_validates_that_epoch_not_trains_it_again(repo_root,
                                                                                                     tmp_path):
    """SIGUSR1 at step 2, epoch 1's last at 2 ranks (2 steps per epoch), saves before the epoch's validation; the
    resume at 1 rank (4 steps per epoch) validates epoch 1 first and goes on with epoch 2 at its place on the
    schedule: not epoch 1 again from its first image, with its warmup again."""
    from m2r.engine.optim import LRSchedule, learning_rate

    allweather = build_allweather(tmp_path / "allweather", size=(40, 48), train=8)
    run_dir = tmp_path / "run"
    settings = ["finetune.py", "--config", "configs/finetune/tiny-test.yaml", f"data.root={allweather}",
                "model.moe.ep_size=1", "train.min_lr=1.0e-5", f"run.dir={run_dir}"]
    stopped = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "tests/signalled_run.py",
                   "after-step-2", *settings], repo_root, timeout=180)
    assert "stopping at step 2: received SIGUSR1 in epoch 1 of 2" in stopped and "val step 2" not in stopped
    log = run([sys.executable, *settings], repo_root)
    assert "resumed from" in log and "epoch 1 of 2, step 2" in log
    # the topology warning does not call the epoch's place lost (it is not trained again)
    assert "the position in the epoch (the epoch's last step was trained: it is validated next)" in log
    assert "the position in the epoch (started afresh)" not in log
    assert "val step 2:" in log and "step 6/6 |" in log and "stopping at step 6: finished" in log, log
    lrs = [(r["step"], r["lr"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
           if "lr" in r]
    assert [step for step, _ in lrs] == list(range(1, 7))
    assert [lr for _, lr in lrs[2:]] == pytest.approx([learning_rate(s, LRSchedule(1.0e-3, 1.0e-5, 4, 8))
                                                       for s in range(4, 8)])


def test_the_training_set_id_names_the_pairs_in_order_relative_to_the_data_root():
    """The same dataset at another mount is the same set; one image swapped for another (same count), or the same
    images in another order, is another."""
    from m2r.engine.finetuner import training_set_id
    from m2r.eval.datasets import Pair

    def pairs(root, names):
        return [Pair(Path(root) / "train/input" / name, Path(root) / "train/gt" / name, "rain") for name in names]

    names = ["a.png", "b.png", "c.png"]
    here = training_set_id(pairs("/data/aw", names), "/data/aw")
    assert here["pairs"] == 3
    assert training_set_id(pairs("/mnt/other/aw", names), "/mnt/other/aw") == here
    assert training_set_id(pairs("/data/aw", ["a.png", "b.png", "d.png"]), "/data/aw") != here
    assert training_set_id(pairs("/data/aw", ["b.png", "a.png", "c.png"]), "/data/aw") != here
