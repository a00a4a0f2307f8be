"""The file mode m2r.export gives its weights (safetensors writes 0600 files): the arithmetic here,
an export's mode in test_engine_dist."""
import os

import pytest

from m2r.atomic import default_file_mode


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield
    os.umask(previous)


def test_the_default_mode_is_0666_less_the_umask(umask_027):
    assert default_file_mode() == 0o640

