"""Atomic writes (temp file, fsync, rename, fsync of the folder), and the file mode m2r.export gives its
weights (safetensors writes 0600 files): the arithmetic here, an export's mode in test_engine_dist."""
import errno
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from m2r.atomic import default_file_mode


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield
    os.umask(previous)


def test_the_default_mode_is_0666_less_the_umask(umask_027):
    assert default_file_mode() == 0o640


def test_the_rename_is_made_durable_by_syncing_its_folder(tmp_path, monkeypatch):
    import m2r.atomic

    synced, sync = [], m2r.atomic.fsync_directory
    monkeypatch.setattr(m2r.atomic, "fsync_directory", lambda path: synced.append(path) or sync(path))
    m2r.atomic.write_text_atomically(tmp_path / "latest", "step1")
    assert [Path(path) for path in synced] == [tmp_path]


def test_a_failed_write_leaves_neither_the_file_nor_its_temp(tmp_path):
    from m2r.atomic import atomic_path

    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "x.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_a_write_that_fails_for_want_of_storage_names_the_file_and_the_space_left(tmp_path, monkeypatch):
    """Python reports a full disk at close() with no file name: the shard, config or JSON must be named."""
    import errno

    import m2r.atomic
    from m2r.atomic import StorageError, atomic_path

    monkeypatch.setattr(m2r.atomic, "free_bytes", lambda path: 3 * 2**30)
    with pytest.raises(StorageError, match=f"writing {tmp_path / 'results.json'} failed: No space left on device "
                                           r"\(3.00 GiB free on its filesystem\)"):
        with atomic_path(tmp_path / "results.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(m2r.atomic, "free_bytes", lambda path: 0)
    with pytest.raises(ValueError, match="not a storage failure"):   # other errors pass through, even on a full disk
        with atomic_path(tmp_path / "results.json"):
            raise ValueError("not a storage failure")
    assert not list(tmp_path.iterdir())


def test_an_export_that_fails_half_way_leaves_the_earlier_weights_and_config_as_a_pair(tmp_path, monkeypatch):
    """Both files are written in full before either replaces the earlier export's."""
    import errno

    import torch

    import m2r.export
    from m2r.atomic import StorageError

    monkeypatch.setattr(m2r.export, "checkpoint_at", lambda location, option: SimpleNamespace(path=Path(location)))
    exported = {"width": 8}
    monkeypatch.setattr(m2r.export, "export_state_dict",
                        lambda ref, use_ema: ({"w": torch.full((2,), float(exported["width"]))},
                                              {"model": dict(exported)}))
    out = tmp_path / "model.safetensors"
    m2r.export.export("ckpt", str(out))
    earlier = out.read_bytes(), (tmp_path / "model.yaml").read_text()
    exported["width"] = 16
    import safetensors.torch

    for failing in ("config", "weights"):
        with monkeypatch.context() as patch:
            if failing == "config":
                patch.setattr(m2r.export.OmegaConf, "to_yaml", lambda *a, **k: _raise(errno.ENOSPC))
            else:
                patch.setattr(safetensors.torch, "save_file", lambda *a, **k: _raise(errno.EDQUOT))
            with pytest.raises(StorageError, match=f"writing {out} and {tmp_path / 'model.yaml'} failed"):
                m2r.export.export("ckpt", str(out))
        assert (out.read_bytes(), (tmp_path / "model.yaml").read_text()) == earlier
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "model.yaml"]
    m2r.export.export("ckpt", str(out))
    assert "width: 16" in (tmp_path / "model.yaml").read_text()


def _raise(code):
    raise OSError(code, os.strerror(code))


def test_files_written_together_are_all_flushed_before_the_first_replaces_its_target(tmp_path, monkeypatch):
    """A flush that fails on the second file must leave the first file's earlier version too."""
    import m2r.atomic
    from m2r.atomic import atomic_paths

    for name, text in (("model.safetensors", "earlier weights"), ("model.yaml", "earlier config")):
        (tmp_path / name).write_text(text)
    flushed, real_fsync = [], os.fsync

    def fsync_failing_on_the_second_file(fd):
        flushed.append(fd)
        if len(flushed) == 2:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_fsync(fd)

    monkeypatch.setattr(m2r.atomic.os, "fsync", fsync_failing_on_the_second_file)
    with pytest.raises(OSError, match="Input/output error"):
        with atomic_paths(tmp_path / "model.safetensors", tmp_path / "model.yaml") as (weights, config):
            weights.write_text("new weights")
            config.write_text("new config")
    assert (tmp_path / "model.safetensors").read_text() == "earlier weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "model.yaml"]   # no temp left


def test_an_export_writes_its_companion_files_with_the_weights_or_not_at_all(tmp_path, monkeypatch):
    """Finetuning's best_<metric>.json names the epoch of best_<metric>.safetensors: a failed weights write
    must not leave a new record beside the earlier weights."""
    import errno

    import safetensors.torch
    import torch

    import m2r.export
    from m2r.atomic import StorageError

    monkeypatch.setattr(m2r.export, "checkpoint_at", lambda location, option: SimpleNamespace(path=Path(location)))
    monkeypatch.setattr(m2r.export, "export_state_dict", lambda ref, use_ema: ({"w": torch.ones(2)}, {"model": {}}))
    out, record = tmp_path / "best_psnr.safetensors", tmp_path / "best_psnr.json"
    m2r.export.export("ckpt", str(out), companions={record: '{"epoch": 1}'})
    assert record.read_text() == '{"epoch": 1}'
    monkeypatch.setattr(safetensors.torch, "save_file", lambda *a, **k: _raise(errno.ENOSPC))
    with pytest.raises(StorageError):
        m2r.export.export("ckpt", str(out), companions={record: '{"epoch": 2}'})
    assert record.read_text() == '{"epoch": 1}'
