"""Checkpoint bookkeeping (m2r/engine/checkpoint.py): tags, `latest`, atomic saves, pruning, abandoned
tags, resume targets, EMA files. Saving through DeepSpeed itself: test_engine_dist.py."""
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fake_engine import FakeEngine
from m2r.config import ConfigError, load_config
from m2r.engine.checkpoint import (CheckpointManager, CheckpointRef, Topology, checkpoint_at, resolve_resume,
                                   set_aside_newer_tags, tag_for)
from m2r.engine.config import PretrainConfig


def saved_step(tag_dir: Path) -> int:
    return torch.load(tag_dir / "mp_rank_00_model_states.pt")["step"]


def test_checkpoints_keep_the_last_k_and_point_latest_at_the_newest(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2, kind="pretrain")
    config = load_config(PretrainConfig, None, ["train.lr=0.125"])
    for step in (10, 20, 30):
        manager.save(FakeEngine(), step, Topology(2, 2, "bf16", 1), {"step": step}, config)
    assert manager.tags() == [tag_for(20), tag_for(30)]
    assert (tmp_path / "latest").read_text() == "step00000030"
    meta = json.loads((tmp_path / "step00000030" / "meta.json").read_text())
    assert meta == {"step": 30, "world_size": 2, "ep_size": 2, "precision": "bf16", "zero_stage": 1, "ema": False,
                    "kind": "pretrain"}
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
    # the failure came after step 20 was renamed into place, complete, before `latest` named it
    assert (tmp_path / "latest").read_text() == tag_for(10) and resolve_resume("latest", tmp_path).tag == tag_for(20)
    assert (tmp_path / tag_for(10)).is_dir()


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
    # `run.resume=no` arrives as YAML's 'False': the error says what the key takes
    with pytest.raises(FileNotFoundError, match="run.resume='False': no such file or directory; run.resume takes "
                                                "'latest', 'none' or the path"):
        resolve_resume("False", tmp_path)
    with pytest.raises(FileNotFoundError, match="init.weights="):
        checkpoint_at(str(tmp_path / "missing"), "init.weights")
    assert checkpoint_at(str(tmp_path), "init.weights").tag == "step00000007"


def test_local_experts_are_renamed_to_global_ids_from_their_ranks_first_expert():
    from m2r.engine.experts import with_global_expert_id

    name = "dder2.deepspeed_moe.experts.deepspeed_experts.1.fc1.weight"
    assert with_global_expert_id(name, first_global_id=2 * 3) == name.replace(".1.", ".7.")
    assert with_global_expert_id("dder2.router.w_g", first_global_id=6) == "dder2.router.w_g"


def test_resuming_from_another_runs_checkpoint_leaves_that_runs_newer_checkpoints_in_place(tmp_path):
    """run.resume=<other run>/checkpoints/step10 must not reorganise the other run's directory."""
    from m2r.engine.checkpoint import set_aside_newer_tags

    other, mine = tmp_path / "other" / "checkpoints", tmp_path / "mine" / "checkpoints"
    manager, config = CheckpointManager(other, keep_last=3), load_config(PretrainConfig)
    for step in (10, 20, 30):
        manager.save(FakeEngine(), step, Topology(1, 1, "fp32", 1), {"step": step}, config)
    assert set_aside_newer_tags(CheckpointRef(other, tag_for(10)), mine) == []
    assert manager.tags() == [tag_for(10), tag_for(20), tag_for(30)] and not (other / "abandoned").exists()


def test_resuming_another_runs_older_checkpoint_sets_this_runs_newer_ones_aside(tmp_path):
    """run.dir holds steps 20 and 30, run.resume names another run's step 10: left in place, this run's tags would
    outrank the new branch, pruning deleting its step 20 and a restart resuming its step 30 (a `latest` warning)."""
    from m2r.engine.checkpoint import set_aside_newer_tags

    other, mine = tmp_path / "other" / "checkpoints", tmp_path / "mine" / "checkpoints"
    save(CheckpointManager(other, keep_last=2), 10)
    manager = CheckpointManager(mine, keep_last=2)
    for step in (20, 30):
        save(manager, step)
    assert set_aside_newer_tags(CheckpointRef(other, tag_for(10)), mine) == [tag_for(20), tag_for(30)]
    save(manager, 15)   # the new branch's first save
    assert resolve_resume("latest", mine).tag == tag_for(15)
    assert sorted(p.name for p in (mine / "abandoned").iterdir()) == [tag_for(20), tag_for(30)]
    assert not (other / "abandoned").exists()


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


def save(manager, step, **client):
    return manager.save(FakeEngine(), step, Topology(1, 1, "fp32", 1), {"step": step, **client},
                        load_config(PretrainConfig))


def test_a_checkpoint_directory_whose_latest_is_gone_still_names_its_newest_complete_tag(tmp_path):
    """`latest` deleted (not only emptied): the directory is still a checkpoint directory for
    init.weights, run.resume, export and evaluate, not 'neither a checkpoint directory nor a tag'."""
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (10, 20):
        save(manager, step)
    (tmp_path / "latest").unlink()
    assert checkpoint_at(str(tmp_path), "init.weights").tag == tag_for(20)
    assert resolve_resume(str(tmp_path), Path("elsewhere")).tag == tag_for(20)


def test_resuming_the_runs_own_older_checkpoint_by_its_absolute_path_sets_the_newer_ones_aside(tmp_path,
                                                                                             monkeypatch):
    """run.dir relative, run.resume absolute (or the other way round): still this run's checkpoints, so
    the newer tags move to abandoned/ (else pruning and the `latest` fallback would take them)."""
    monkeypatch.chdir(tmp_path)
    run_checkpoints = Path("run") / "checkpoints"
    manager = CheckpointManager(run_checkpoints, keep_last=3)
    for step in (10, 20):
        save(manager, step)
    ref = resolve_resume(str(tmp_path / run_checkpoints / tag_for(10)), run_checkpoints)
    assert set_aside_newer_tags(ref, run_checkpoints) == [tag_for(20)]
    assert (run_checkpoints / "abandoned" / tag_for(20)).is_dir()


def test_a_step_abandoned_three_times_keeps_every_copy(tmp_path):
    """Resume step 20 and train to 30, three times over: three abandoned step-30 tags, none overwritten."""
    manager = CheckpointManager(tmp_path, keep_last=3)
    save(manager, 20)
    for branch in range(3):
        save(manager, 30, branch=branch)
        assert set_aside_newer_tags(CheckpointRef(tmp_path, tag_for(20)), tmp_path) == [tag_for(30)]
    abandoned = tmp_path / "abandoned"
    assert sorted(p.name for p in abandoned.iterdir()) == [tag_for(30), tag_for(30) + "+", tag_for(30) + "++"]
    assert sorted(torch.load(p / "mp_rank_00_model_states.pt")["branch"] for p in abandoned.iterdir()) == [0, 1, 2]


def test_a_save_cut_short_is_cleared_by_the_next_save_of_any_step(tmp_path):
    """Cut short while saving step 30, resumed from step 20 and saving step 25 next (another
    checkpoint interval): the half-written step 30 goes with that save, not only with a save of step 30."""
    manager = CheckpointManager(tmp_path, keep_last=2)
    save(manager, 20)
    try:
        manager.save(FakeEngine(crash=True), 30, Topology(1, 1, "fp32", 1), {"step": 30}, load_config(PretrainConfig))
    except OSError:
        pass
    assert (tmp_path / (tag_for(30) + ".partial")).is_dir()
    save(manager, 25)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", tag_for(20), tag_for(25)]


class FullDisk(FakeEngine):
    """Fails like torch's zip writer on a full disk (a RuntimeError with no file name), after noting which
    half-written saves were still there to take space."""

    def __init__(self):
        super().__init__()
        self.leftovers_seen = None

    def save_checkpoint(self, root, tag, client_state, save_latest):
        self.leftovers_seen = sorted(p.name for p in Path(root).glob("step*.partial"))
        (Path(root) / tag).mkdir(parents=True)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 17088 vs 16980")


def test_a_save_that_fills_the_disk_names_the_rank_the_directory_and_the_space_left(tmp_path, monkeypatch):
    """And each failed save's leftovers go before the next one writes: on a full disk, every retry would
    otherwise leave another half-written tag (and fail for want of the space they hold)."""
    import m2r.atomic
    from m2r.atomic import StorageError

    manager, config = CheckpointManager(tmp_path, keep_last=2), load_config(PretrainConfig)
    save(manager, 10)
    monkeypatch.setattr(m2r.atomic, "free_bytes", lambda path: 5 * 2**20)
    engine = FullDisk()
    for step in (20, 30):
        with pytest.raises(StorageError, match=f"rank 0: writing {tmp_path / tag_for(step)}.partial failed: "
                                               r"RuntimeError: \[enforce fail .* \(0.00 GiB free on its filesystem\)"):
            manager.save(engine, step, Topology(1, 1, "fp32", 1), {"step": step}, config)
    assert engine.leftovers_seen == []   # step 20's half-written tag was gone before step 30 wrote
    assert resolve_resume("latest", tmp_path).tag == tag_for(10)
    monkeypatch.setattr(m2r.atomic, "free_bytes", lambda path: 50 * 2**30)   # plenty left: not the disk's fault
    with pytest.raises(RuntimeError, match="unexpected pos") as raised:
        manager.save(FullDisk(), 40, Topology(1, 1, "fp32", 1), {"step": 40}, config)
    assert not isinstance(raised.value, StorageError)


def test_a_run_starts_by_removing_what_failed_saves_left(tmp_path):
    """Before it writes anything (its config.yaml first): on a full disk that is the space it needs."""
    manager = CheckpointManager(tmp_path, keep_last=2)
    save(manager, 10)
    for leftover in (tag_for(20) + ".partial", tag_for(10) + ".replaced"):
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"half")
    (tmp_path / "latest.tmp").write_text("step000")
    (tmp_path / "zero_to_fp32.py").write_text("# DeepSpeed's")
    manager.remove_leftovers()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", tag_for(10)]
    # a save that had finished (meta.json written) but not been renamed into place is kept, published
    save(manager, 30)
    (tmp_path / tag_for(30)).rename(tmp_path / (tag_for(30) + ".partial"))
    manager.remove_leftovers()
    assert manager.tags() == [tag_for(10), tag_for(30)] and resolve_resume("latest", tmp_path).tag == tag_for(30)
    # but not over its tag saved before (a step saved again): that one stays, the finished copy goes
    shutil.copytree(tmp_path / tag_for(30), tmp_path / (tag_for(30) + ".partial"))
    manager.remove_leftovers()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", tag_for(10), tag_for(30)]


def test_a_tag_published_without_latest_updated_is_still_the_one_resumed(tmp_path, capsys):
    """A crash (or a full disk) between renaming the finished tag into place and rewriting `latest`: the
    newer complete tag is what the run saved last, not a branch to abandon."""
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (10, 20):
        save(manager, step)
    (tmp_path / "latest").write_text(tag_for(10))
    ref = resolve_resume("latest", tmp_path)
    assert ref.tag == tag_for(20) and set_aside_newer_tags(ref, tmp_path) == []
    assert (f"WARNING: {tmp_path / 'latest'} names 'step00000010', but step00000020 is newer and complete"
            in capsys.readouterr().out)
    manager.point_latest_at(ref)   # what the resuming run does, so that the next start does not warn again
    assert (tmp_path / "latest").read_text() == tag_for(20)
    assert resolve_resume("latest", tmp_path).tag == tag_for(20) and "WARNING" not in capsys.readouterr().out
    manager.point_latest_at(CheckpointRef(tmp_path / "elsewhere", tag_for(5)))   # another run's checkpoint
    assert (tmp_path / "latest").read_text() == tag_for(20)


def test_latest_naming_a_tag_directory_without_meta_falls_back_to_the_newest_complete_one(tmp_path, capsys):
    """A tag directory that exists but lacks meta.json (a copy of the run cut short, a file lost) is not
    complete, even when `latest` names it."""
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (10, 20):
        save(manager, step)
    (tmp_path / tag_for(20) / "meta.json").unlink()
    assert resolve_resume("latest", tmp_path).tag == tag_for(10)
    assert "names 'step00000020', which is not a complete checkpoint" in capsys.readouterr().out


@pytest.mark.parametrize("meta, saved, kind", [
    ({"kind": "finetune"}, {"model": {}}, "finetune"),               # meta.json says it
    ({}, {"model": {}, "init": {"weights": "/w"}}, "finetune"),      # older: only a finetune config has init
])
def test_the_kind_a_checkpoint_recorded_decides_which_runs_resume_it(tmp_path, meta, saved, kind):
    from m2r.engine.run import TrainingRun

    ref = SimpleNamespace(root=tmp_path / "other", path=tmp_path / "other/step00000001", meta=lambda: meta,
                          saved_config=lambda: saved)
    stub = SimpleNamespace(KIND="pretrain", checkpoints=SimpleNamespace(root=tmp_path / "checkpoints"))
    with pytest.raises(ConfigError, match=f"is a {kind} checkpoint; a pretrain run resumes only its own kind"):
        TrainingRun._check_resumable(stub, ref)


def test_a_checkpoint_kept_under_another_root_is_hard_links_published_meta_last(tmp_path, monkeypatch):
    """Finetuning's best_<metric>/ copies of an epoch's checkpoint: the same bytes written once, complete
    (meta.json) only when every file is there, pruned to keep_last like a save."""
    config = load_config(PretrainConfig)
    source = CheckpointManager(tmp_path / "checkpoints", keep_last=2, kind="finetune")
    best = CheckpointManager(tmp_path / "best_psnr", keep_last=2, kind="finetune")
    copies, linked = [], []
    real_link = os.link

    def link(src, dst):   # the staged tag has no meta.json yet: it is never linked
        linked.append(Path(dst).name)
        real_link(src, dst)
    monkeypatch.setattr(os, "link", link)

    def keep(staged, meta):
        assert not (staged / "meta.json").exists()   # incomplete while the copies are made
        copies.append(best.keep_copy(staged, meta["step"], meta))

    def keep_during_save(step):
        source.save(FakeEngine(), step, Topology(1, 1, "fp32", 1), {"step": step}, config, before_publish=keep)
    for step in (10, 20, 30):
        keep_during_save(step)
    assert best.tags() == [tag_for(20), tag_for(30)] and (tmp_path / "best_psnr/latest").read_text() == tag_for(30)
    kept, original = copies[-1].path, tmp_path / "checkpoints" / tag_for(30)
    for name in ("mp_rank_00_model_states.pt", "config.yaml"):
        assert os.stat(kept / name).st_ino == os.stat(original / name).st_ino
    assert "meta.json" not in linked and saved_step(kept) == 30
    assert json.loads((kept / "meta.json").read_text()) == json.loads((original / "meta.json").read_text())
    assert resolve_resume("latest", tmp_path / "best_psnr").meta()["kind"] == "finetune"

    # The same step kept again (an epoch trained again after a crash before its save was published).
    keep_during_save(30)
    assert best.tags() == [tag_for(20), tag_for(30)] and saved_step(best.root / tag_for(30)) == 30
    assert os.stat(best.root / tag_for(30) / "mp_rank_00_model_states.pt").st_ino == \
        os.stat(tmp_path / "checkpoints" / tag_for(30) / "mp_rank_00_model_states.pt").st_ino

    def no_links(src, dst):
        raise OSError(18, "Invalid cross-device link")
    monkeypatch.setattr(os, "link", no_links)   # another filesystem: copies
    keep_during_save(40)
    assert saved_step(tmp_path / "best_psnr" / tag_for(40)) == 40
    assert os.stat(tmp_path / "best_psnr" / tag_for(40) / "mp_rank_00_model_states.pt").st_ino != \
        os.stat(tmp_path / "checkpoints" / tag_for(40) / "mp_rank_00_model_states.pt").st_ino


def test_a_failure_before_publishing_leaves_the_previous_checkpoint_the_latest(tmp_path):
    """A crash while the best copies are made: the epoch's tag was never published, its epoch is trained
    again on resume (and its best copies made again). The restart's `remove_leftovers` (TrainingRun's
    start) must not publish the staged tag instead: its client state records the new bests, whose copies
    and exports the crash cut short, and a resume from it would never make them."""
    config, manager = load_config(PretrainConfig), CheckpointManager(tmp_path, keep_last=2)
    manager.save(FakeEngine(), 10, Topology(1, 1, "fp32", 1), {"step": 10}, config)

    def fail(staged, *meta):
        raise OSError("disk gone")
    with pytest.raises(OSError, match="disk gone"):
        manager.save(FakeEngine(), 20, Topology(1, 1, "fp32", 1), {"step": 20}, config, before_publish=fail)
    assert resolve_resume("latest", tmp_path).tag == tag_for(10) and manager.tags() == [tag_for(10)]
    manager.remove_leftovers()   # the restart
    assert resolve_resume("latest", tmp_path).tag == tag_for(10) and manager.tags() == [tag_for(10)]
    assert not list(tmp_path.glob("*.partial"))


def test_a_resume_names_a_model_key_added_since_the_checkpoint_that_this_run_sets_off_its_default(tmp_path, capsys):
    """moe.load_with_clip_bias (a runtime key, so not refused) is on in the plus config: a plus run saved
    before the key existed trained with the official load estimate, and resuming it switches the balance
    loss. The saved config lacks the key, which the comparison of saved values never saw."""
    from omegaconf import OmegaConf

    from m2r.engine.run import TrainingRun

    cfg = load_config(PretrainConfig, Path(__file__).parent.parent / "configs/pretrain/m2restore-plus.yaml")
    assert cfg.model.moe.load_with_clip_bias
    saved = OmegaConf.to_container(cfg, resolve=True)
    del saved["model"]["moe"]["load_with_clip_bias"]   # saved before 0cf8299
    ref = SimpleNamespace(root=tmp_path / "other", path=tmp_path / "other" / tag_for(1), tag=tag_for(1),
                          meta=lambda: {"kind": "pretrain"}, saved_config=lambda: saved)
    stub = SimpleNamespace(KIND="pretrain", checkpoints=SimpleNamespace(root=tmp_path / "checkpoints"), cfg=cfg)
    TrainingRun._check_resumable(stub, ref)
    assert "model.moe.load_with_clip_bias False (the default; not in step00000001's config) -> True" in \
        capsys.readouterr().out


def rmtree_killed_before_meta_json(path, ignore_errors=False):
    """shutil.rmtree killed part way: every file of a directory but its meta.json deleted, then the kill."""
    if not Path(path).is_dir():
        return
    for entry in sorted(Path(path).iterdir()):
        if entry.name != "meta.json":
            entry.unlink()
    raise KeyboardInterrupt("killed")


def test_a_tag_pruned_part_way_never_counts_as_complete(tmp_path, monkeypatch):
    """rmtree removes a tag's files in directory order, meta.json among them: a kill part way must not leave an
    older tag that counts as complete (meta.json) but lacks its weights, which a resume or export would take."""
    import m2r.engine.checkpoint as checkpoint
    from m2r.engine.checkpoint import complete_tags

    config, manager = load_config(PretrainConfig), CheckpointManager(tmp_path, keep_last=2)
    for step in (10, 20):
        manager.save(FakeEngine(), step, Topology(1, 1, "fp32", 1), {"step": step}, config)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", rmtree_killed_before_meta_json)
    with pytest.raises(KeyboardInterrupt):
        manager.save(FakeEngine(), 30, Topology(1, 1, "fp32", 1), {"step": 30}, config)
    assert complete_tags(tmp_path) == [tag_for(20), tag_for(30)]


def test_a_step_saved_again_never_leaves_a_complete_tag_without_its_weights(tmp_path, monkeypatch):
    """The old tag of a step saved again leaves its name in one rename before any of it is deleted: a kill
    during that deletion (rmtree goes in directory order) must not leave `step<N>` holding meta.json alone."""
    import m2r.engine.checkpoint as checkpoint
    from m2r.engine.checkpoint import complete_tags

    config, manager = load_config(PretrainConfig), CheckpointManager(tmp_path, keep_last=2)
    for step, epoch in ((10, 0), (20, 0)):
        manager.save(FakeEngine(), step, Topology(1, 1, "fp32", 1), {"step": step, "epoch": epoch}, config)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", rmtree_killed_before_meta_json)
    with pytest.raises(KeyboardInterrupt):
        manager.save(FakeEngine(), 20, Topology(1, 1, "fp32", 1), {"step": 20, "epoch": 1}, config)
    assert complete_tags(tmp_path) == [tag_for(10), tag_for(20)]
    assert torch.load(resolve_resume("latest", tmp_path).path / "mp_rank_00_model_states.pt")["epoch"] == 1


def test_tags_set_aside_are_gone_from_the_checkpoint_directory_durably(tmp_path, monkeypatch):
    """After a power loss the abandoned branch must not come back beside `latest`: the moves out of the checkpoint
    directory are followed by a sync of that directory."""
    import m2r.engine.checkpoint as checkpoint

    manager, config = CheckpointManager(tmp_path, keep_last=3), load_config(PretrainConfig)
    for step in (20, 40, 60):
        manager.save(FakeEngine(), step, Topology(1, 1, "fp32", 1), {"step": step}, config)
    events = []
    real_replace, real_sync = os.replace, checkpoint.fsync_directory
    monkeypatch.setattr(checkpoint.os, "replace", lambda src, dst: events.append(("move", Path(src).name))
                        or real_replace(src, dst))
    monkeypatch.setattr(checkpoint, "fsync_directory", lambda path: events.append(("sync", Path(path)))
                        or real_sync(path))
    assert set_aside_newer_tags(CheckpointRef(tmp_path, tag_for(20)), tmp_path) == [tag_for(40), tag_for(60)]
    assert events[:2] == [("move", tag_for(40)), ("move", tag_for(60))] and ("sync", tmp_path) in events[2:]


def test_a_kept_copy_has_its_directory_entries_on_disk_before_its_meta_json(tmp_path, monkeypatch):
    """`keep_copy` links the staged files into a new folder: the folder's entries are synced before meta.json makes
    the copy complete, or a power loss could leave a complete best copy without its weights."""
    import m2r.atomic

    config = load_config(PretrainConfig)
    source = CheckpointManager(tmp_path / "checkpoints", keep_last=2, kind="finetune")
    best = CheckpointManager(tmp_path / "best_psnr", keep_last=2, kind="finetune")
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(m2r.atomic.os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}"))
                        or real_fsync(fd))
    source.save(FakeEngine(), 10, Topology(1, 1, "fp32", 1), {"step": 10}, config,
                before_publish=lambda staged, meta: best.keep_copy(staged, meta["step"], meta))
    staged = str(tmp_path / "best_psnr" / (tag_for(10) + ".partial"))
    assert synced.index(staged) < synced.index(f"{staged}/meta.json.tmp")


def test_a_tag_directory_named_as_run_resume_is_that_checkpoint(tmp_path):
    """Not merely a reference with its name: its root is the checkpoint directory, so its files are read."""
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (7, 8):
        manager.save(FakeEngine(), step, Topology(1, 1, "fp32", 1), {"step": step}, load_config(PretrainConfig))
    ref = resolve_resume(str(tmp_path / tag_for(7)), Path("elsewhere"))
    assert (ref.root, ref.path) == (tmp_path, tmp_path / tag_for(7)) and ref.meta()["step"] == 7


@pytest.mark.parametrize("name", ["final", "zz-final"])
def test_a_resumed_tag_directory_of_any_name_sets_aside_the_tags_newer_than_its_step(tmp_path, name):
    """run.resume may name a tag directory copied under any name: what is newer is decided by its saved step (its
    meta.json), not by comparing names, or this run's step 30 would stay and a restart would resume it."""
    other, mine = tmp_path / "other", tmp_path / "mine" / "checkpoints"
    save(CheckpointManager(other, keep_last=2), 10)
    os.replace(other / tag_for(10), other / name)
    manager = CheckpointManager(mine, keep_last=3)
    for step in (5, 20, 30):
        save(manager, step)
    ref = resolve_resume(str(other / name), mine)
    assert set_aside_newer_tags(ref, mine) == [tag_for(20), tag_for(30)] and manager.tags() == [tag_for(5)]


@pytest.mark.parametrize("name", ["final", "zz-final", tag_for(10)])
def test_a_failed_load_of_a_tag_directory_of_any_name_suggests_the_tag_saved_before_its_step(tmp_path, name):
    """The hint after a failed load names the newest complete tag beside it saved at an earlier step (its meta.json
    step, not its name): "final" sorts before every step<N> and "zz-final" after, yet both are step 10 here; a tag
    keeping its own name is not older than itself."""
    from m2r.engine.run import TrainingRun

    root = tmp_path / "other"
    manager = CheckpointManager(root, keep_last=3)
    for step in (5, 10, 20):
        save(manager, step)
    os.replace(root / tag_for(10), root / name)

    def damaged(*args, **kwargs):
        raise EOFError("truncated")

    run = SimpleNamespace(topology=Topology(1, 1, "fp32", 1),   # an engine without experts or ZeRO
                          engine=SimpleNamespace(load_checkpoint=damaged, module=torch.nn.Module(),
                                                 zero_optimization=lambda: False))
    with pytest.raises(RuntimeError, match=f"resume an older one with run.resume={root / tag_for(5)}$"):
        TrainingRun._load_checkpoint(run, CheckpointRef(root, name))


def test_an_exact_resume_checks_the_optimizer_file_each_rank_reads_alone_before_deepspeed_loads_it(repo_root,
                                                                                                        tmp_path):
    """At ZeRO 0 DeepSpeed keeps an MoE run's optimizer state per expert-parallel rank (`expp_rank_<R>_...`), under
    ZeRO per partition; an exact load reads this rank's alone, so a lost one is named, as a lost expert file is,
    before any load (on every rank: `TrainingRun._load_checkpoint`). A weights-only load reads no optimizer file."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    from m2r.engine.checkpoint import expert_file, own_files_lacking
    from m2r.models.config import ModelConfig
    from m2r.models.m2restore import build_model

    ref = CheckpointRef(tmp_path, tag_for(6))
    ref.path.mkdir()
    for layer in range(3):   # the tiny model's DDER 1 to 3, 4 experts each, all on this rank (ep_size 1)
        for expert in range(4):
            (ref.path / expert_file(layer, expert)).touch()
    engine = SimpleNamespace(module=build_model(load_config(ModelConfig, Path(repo_root) / "configs/model/tiny.yaml"),
                                                with_clip_prior=False),
                             zero_optimization=lambda: False, optimizer=object(), checkpoint_mp_rank=0)
    engine._get_optimizer_ckpt_name = lambda *args: DeepSpeedEngine._get_optimizer_ckpt_name(engine, *args)
    assert own_files_lacking(engine, ref, exact=True) == (
        f"{ref.path} lacks expp_rank_0_mp_rank_00_optim_states.pt, this rank's part of the optimizer state: the "
        "checkpoint is incomplete")
    assert own_files_lacking(engine, ref, exact=False) is None
    (ref.path / "expp_rank_0_mp_rank_00_optim_states.pt").touch()
    assert own_files_lacking(engine, ref, exact=True) is None


def test_a_runs_saved_configs_name_its_paths_absolute_so_any_directory_reads_the_same_files(tmp_path, monkeypatch):
    """config.yaml in run.dir and beside each checkpoint: m2r.evaluate --pretrain-val (data.val_shards), m2r.export's
    network config (model.clip.weights) and a finetuning's init.weights read it from wherever they are started; a
    path given relative to the run's directory would name another file there. Keys without a path stay as given."""
    from m2r.engine.monitor import NullMonitor
    from m2r.engine.run import TrainingRun

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    cfg = load_config(PretrainConfig, None, ["data.val_shards=shards/val", "model.clip.weights=../weights/clip.pt",
                                             "run.dir=runs/a", "run.resume=latest"])
    run_dir = Path(cfg.run.dir)
    run = SimpleNamespace(cfg=cfg, run_dir=run_dir, step=1, topology=Topology(1, 1, "fp32", 1), engine=FakeEngine(),
                          checkpoints=CheckpointManager(run_dir / "checkpoints", keep_last=2, kind="pretrain"),
                          monitor=NullMonitor(), _refuse_non_finite_weights=lambda: None, _ema_state=lambda: None)
    ref = TrainingRun._save_checkpoint(run, {"step": 1})
    run.engine.skipped_steps = 0
    TrainingRun._open_monitor(run, total_steps=1)
    run.monitor.close()
    monkeypatch.chdir(tmp_path)
    for saved in (work / "runs/a/config.yaml", work / "runs/a/checkpoints" / ref.tag / "config.yaml"):
        again = load_config(PretrainConfig, saved)
        assert (again.data.val_shards, again.model.clip.weights, again.run.dir) == (
            str(work / "shards/val"), str(tmp_path / "weights/clip.pt"), str(work / "runs/a")), saved
        assert (again.data.shards, again.run.resume) == (None, "latest")


def test_a_resume_names_no_path_as_changed_whether_its_checkpoint_saved_it_relative_or_absolute(tmp_path, monkeypatch,
                                                                                                capsys):
    """Checkpoints saved before paths were saved absolute hold them as given: read from the resuming run's directory,
    as that run reads its own. A path that now names another file is named."""
    from m2r.engine.run import TrainingRun

    monkeypatch.chdir(tmp_path)
    relative = ["data.val_shards=shards/val", "run.dir=runs/a"]
    manager = CheckpointManager(tmp_path / "runs/a/checkpoints", keep_last=3, kind="pretrain")
    old = manager.save(FakeEngine(), 1, Topology(1, 1, "fp32", 1), {"step": 1}, load_config(PretrainConfig, None,
                                                                                            relative))
    new = manager.save(FakeEngine(), 2, Topology(1, 1, "fp32", 1), {"step": 2}, load_config(PretrainConfig, None, [
        f"data.val_shards={tmp_path / 'shards/val'}", f"run.dir={tmp_path / 'runs/a'}"]))
    for cfg, said in ((load_config(PretrainConfig, None, relative), ""),
                      (load_config(PretrainConfig, None, ["data.val_shards=other/val", "run.dir=runs/a"]),
                       f"data.val_shards '{tmp_path / 'shards/val'}' -> '{tmp_path / 'other/val'}'")):
        for ref in (old, new):
            TrainingRun._check_resumable(SimpleNamespace(cfg=cfg, checkpoints=manager, KIND="pretrain"), ref)
            out = capsys.readouterr().out
            assert (said in out) if said else out == "", (ref.tag, out)
