"""Atomic writes (temp file, fsync, rename, fsync of the folder), and the file mode m2r.export gives its
weights (safetensors writes 0600 files): the arithmetic here, an export's mode in test_engine_dist."""
import os
from pathlib import Path

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
