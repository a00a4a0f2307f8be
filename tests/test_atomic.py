"""Atomic writes leave files with the permissions of any newly created file."""
import os
import stat

import pytest

from m2r.atomic import atomic_path, write_text_atomically


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield 0o027
    os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_file_its_writer_created_private_gets_the_usual_permissions(tmp_path, umask_027):
    """As safetensors' save_file does: the temp file is created 0600; readers on a shared cluster
    need 0o666 less the umask (here 0640)."""
    target = tmp_path / "model.safetensors"
    with atomic_path(target) as tmp:
        os.close(os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600))
    assert mode(target) == 0o640


def test_text_files_and_rewrites_get_them_too(tmp_path, umask_027):
    target = tmp_path / "config.yaml"
    write_text_atomically(target, "a: 1\n")
    assert mode(target) == 0o640
    target.chmod(0o600)
    write_text_atomically(target, "a: 2\n")
    assert mode(target) == 0o640 and target.read_text() == "a: 2\n"
