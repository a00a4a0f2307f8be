"""An installed m2r (`pip install .`, the source deleted, as in a Docker image) used from a directory of
one's own: the training entry points are modules and console scripts, the shipped configs travel in the
wheel and are named `m2r:<path>`, also as the `_base_` of a user's config."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from m2r.config import ConfigError, load_config
from m2r.models.config import ModelConfig

REPO = Path(REPO_ROOT)


def test_a_config_of_your_own_starts_from_a_shipped_one(tmp_path):
    mine = tmp_path / "experiments" / "mine.yaml"
    mine.parent.mkdir()
    mine.write_text("_base_: [m2r:model/tiny.yaml]\ndim: 16\n")
    shipped = load_config(ModelConfig, REPO / "configs/model/tiny.yaml", ["dim=16"])
    assert load_config(ModelConfig, mine) == shipped
    assert load_config(ModelConfig, "m2r:model/tiny.yaml", ["dim=16"]) == shipped


def test_a_missing_base_names_the_file_that_names_it_and_the_shipped_one(tmp_path):
    """A copied demo.yaml keeps `_base_: [../model/tiny.yaml@model]`, which is not beside the copy."""
    copy = tmp_path / "demo.yaml"
    shutil.copy(REPO / "configs/pretrain/demo.yaml", copy)
    from m2r.engine.config import PretrainConfig

    with pytest.raises(ConfigError) as error:
        load_config(PretrainConfig, copy)
    assert str(error.value) == (f"config file not found: {tmp_path}/../model/tiny.yaml (_base_ entry "
                                f"'../model/tiny.yaml' of {copy}); the shipped one is m2r:model/tiny.yaml")



def test_a_missing_shipped_config_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match=r"config file not found: .*model/m2restore-pluss\.yaml; the shipped ones: "
                                          r".*m2r:model/m2restore-plus\.yaml, m2r:model/m2restore\.yaml, "):
        load_config(ModelConfig, "m2r:model/m2restore-pluss.yaml")

def test_the_wheel_holds_the_configs_the_console_scripts_and_the_license_and_no_tests(tmp_path):
    source = tmp_path / "src"   # a copy: an in-tree build would leave build/ in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    for folder in ("m2r", "configs"):
        shutil.copytree(REPO / folder, source / folder, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "-w", str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    wheel = zipfile.ZipFile(next((tmp_path / "dist").glob("m2r-*.whl")))
    names = set(wheel.namelist())
    shipped = {f"m2r/configs/{p.relative_to(REPO / 'configs')}" for p in (REPO / "configs").rglob("*.yaml")}
    assert shipped and shipped <= names
    assert {"m2r/pretrain.py", "m2r/finetune.py"} <= names
    assert not [n for n in names if n.startswith("tests/")]
    assert [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
    assert "License-Expression: Apache-2.0" in wheel.read(next(n for n in names if n.endswith("METADATA"))).decode()
    entry_points = wheel.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for script in ("pretrain", "finetune", "evaluate", "restore", "export", "shards", "summary"):
        assert f"m2r-{script} = m2r.commands:{script}" in entry_points
    import m2r.commands

    assert all(callable(getattr(m2r.commands, script)) for script in ("pretrain", "finetune", "summary"))


def test_pretraining_runs_from_any_directory_on_a_shipped_config(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=REPO_ROOT)
    result = subprocess.run([sys.executable, "-m", "m2r.pretrain", "--config", "m2r:pretrain/tiny-test.yaml",
                             "train.steps=1",
                             "train.warmup_steps=0", "run.image_every=0", "run.val_every=1", "run.dir=run"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stopping at step 1: finished" in result.stdout
    assert (tmp_path / "run" / "checkpoints" / "step00000001").is_dir()
