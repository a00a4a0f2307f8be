"""The console scripts `pip install` puts on PATH (pyproject's [project.scripts]): `m2r-pretrain` runs
`python -m m2r.pretrain`, and so on. Under a launcher use the module form (`torchrun -m m2r.pretrain`,
`deepspeed --module m2r.pretrain`), or give the launcher the script: `deepspeed $(which m2r-pretrain) ...`."""
from importlib import import_module

from m2r.cli import run_main


def _run(module: str):
    run_main(import_module(module).main)


def pretrain():
    _run("m2r.pretrain")


def finetune():
    _run("m2r.finetune")


def evaluate():
    _run("m2r.evaluate")


def restore():
    _run("m2r.restore")


def export():
    _run("m2r.export")


def shards():
    _run("m2r.shards.__main__")


def summary():
    _run("m2r.models.summary")
