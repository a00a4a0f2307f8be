"""What every `python -m m2r.<tool>` shares: its name in --help, examples that read as typed, a user's
mistake as one `error:` line with exit status 2."""
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from m2r import evaluate, export, restore


def run_python(args, cwd, **env_extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="", **env_extra)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("tool, args, message", [
    ("shards", ["build", "--src", "{tmp}", "--out", "{tmp}/out", "--degradations", "cdd12"],
     "error: --degradations 'cdd12': unknown preset"),
    ("export", ["{tmp}/no-run", "{tmp}/model.safetensors"], "error: checkpoint='{tmp}/no-run'"),
    ("evaluate", ["--weights", "{tmp}/w.safetensors", "--dataset", "cdd11", "--root", "{tmp}/no-data",
                  "--out", "{tmp}/results"], "error: missing CDD-11 folder"),
    ("restore", ["--weights", "{tmp}/w.safetensors", "{tmp}/no-photo.png", "--out", "{tmp}/restored"],
     "error: input {tmp}/no-photo.png does not exist"),
    ("models.summary", ["--config", "configs/model/tiny.yaml", "dimm=3"], "error: config error in override 'dimm=3'"),
    ("models.summary", ["--config", "configs/model/tiny.yaml", "moe.top_k=9"],
     "error: config error: key 'moe.top_k': value 9 must be in [1, moe.num_experts=4]"),
    ("data.gallery", ["--image", "skimage:nope", "--out", "{tmp}/g.png"],
     "error: --image skimage:nope: scikit-image has no sample photo named 'nope'"),
    # a key of the other entry point's configs says so; a bad value of a shared key does not
    ("pretrain", ["--config", "configs/finetune/tiny-test.yaml", "run.dir={tmp}/run"],
     "error: config error in configs/finetune/tiny-test.yaml: key 'data.dataset': Key 'dataset' not in 'DataConfig' "
     "(data.dataset is a key of finetune.py's configs, not of pretrain.py's)\n"),
    ("finetune", ["--config", "configs/finetune/tiny-test.yaml", "run.save_every=1", "run.dir={tmp}/run"],
     "error: config error in override 'run.save_every=1': key 'run.save_every': Key 'save_every' not in "
     "'FinetuneRunConfig'. Did you mean: 'log_every'? (run.save_every is a key of pretrain.py's configs, not of "
     "finetune.py's)\n"),
    ("pretrain", ["--config", "configs/pretrain/tiny-test.yaml", "train.crop=abc", "run.dir={tmp}/run"],
     "error: config error in override 'train.crop=abc': key 'train.crop': Value 'abc' of type 'str' could not be "
     "converted to Integer\n"),
])
def test_a_users_mistake_is_one_line_and_exit_status_2(tmp_path, tool, args, message):
    result = run_python(["-m", f"m2r.{tool}", *(a.format(tmp=tmp_path) for a in args)], REPO_ROOT)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(message.format(tmp=tmp_path)) and "Traceback" not in result.stderr


@pytest.mark.parametrize("tool, show_help", [("export", lambda: export.main(["--help"])),
                                             ("evaluate", lambda: evaluate.parse_args(["--help"])),
                                             ("restore", lambda: restore.parse_args(["--help"]))])
def test_help_names_the_command_to_type(tool, show_help, capsys):
    with pytest.raises(SystemExit):
        show_help()
    assert capsys.readouterr().out.startswith(f"usage: python -m m2r.{tool} ")


@pytest.mark.parametrize("module", ["m2r.evaluate", "m2r.restore", "m2r.finetune"])
def test_docstring_examples_keep_their_line_continuations(module):
    """The docstrings are the --help text; a non-raw backslash-newline would join the example's lines."""
    import importlib

    assert " \\\n" in importlib.import_module(module).__doc__


@pytest.mark.parametrize("args, message", [(["--tile", "12"], "argument --tile: 12 is not 0 (whole images) or a "
                                                              "multiple of 8 of at least 16"),
                                           (["--tile", "64", "--overlap", "64"],
                                            "--overlap 64 must be below --tile 64"),
                                           (["--limit", "-1"], "argument --limit: '-1' is not a whole number >= 0"),
                                           (["--limit", "two"], "argument --limit: 'two' is not a whole number >= 0")])
def test_tiling_and_limit_values_are_checked_before_anything_runs(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.parse_args(["--weights", "w.safetensors", "--dataset", "cdd11", "--root", "r", "--out", "o", *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("kind, key, hint", [
    # keys whose default is None are keys all the same
    ("pretrain", "data.val_root", " (data.val_root is a key of finetune.py's configs, not of pretrain.py's)"),
    ("pretrain", "data.list_file", " (data.list_file is a key of finetune.py's configs, not of pretrain.py's)"),
    ("finetune", "data.shards", " (data.shards is a key of pretrain.py's configs, not of finetune.py's)"),
    ("finetune", "data.val_shards", " (data.val_shards is a key of pretrain.py's configs, not of finetune.py's)"),
    ("finetune", "model.clip.weights", ""),   # both have it (None by default): a bad value, not a wrong entry point
    ("pretrain", "train.nope", ""),           # neither has it
])
def test_a_key_of_the_other_entry_points_configs_is_named_so_whatever_its_default(kind, key, hint):
    from m2r.engine.entry import _other_kind_hint

    name = key.rsplit(".", 1)[1]
    assert _other_kind_hint(kind, f"config error: key '{key}': Key '{name}' not in 'DataConfig'") == hint


def test_a_run_dir_in_use_by_another_run_is_refused(tmp_path):
    """Two runs on one run.dir would prune, resume and overwrite each other's checkpoints; a requeued
    SLURM job replaces the lock its earlier run left (NFS keeps a crashed node's locks for a while)."""
    import fcntl

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    pretrain = ["pretrain.py", "--config", "configs/pretrain/tiny-test.yaml", f"run.dir={run_dir}", "train.steps=1",
                "train.warmup_steps=0", "run.image_every=0"]
    with open(run_dir / ".lock", "w") as held:   # as the other run's rank 0 holds it
        fcntl.lockf(held, fcntl.LOCK_EX)
        held.write("pid 12345 on node7, SLURM job 99 restart 0\n")
        held.flush()
        refused = run_python(pretrain, REPO_ROOT, SLURM_JOB_ID="99", SLURM_RESTART_COUNT="0")
        requeued = run_python(pretrain, REPO_ROOT, SLURM_JOB_ID="99", SLURM_RESTART_COUNT="1")
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.startswith(f"error: config error: key 'run.dir': {run_dir} is in use by another run "
                                     "(pid 12345 on node7, SLURM job 99 restart 0)")
    assert requeued.returncode == 0, requeued.stderr
    assert "was left locked by an earlier run of this job" in requeued.stdout
    assert (run_dir / ".lock").read_text().endswith("SLURM job 99 restart 1\n")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="fp16 runs on a GPU")
def test_fp16_without_a_gpu_is_a_config_error_not_deepspeeds_traceback(tmp_path):
    result = run_python(["pretrain.py", "--config", "configs/pretrain/tiny-test.yaml", "train.precision=fp16",
                         f"run.dir={tmp_path / 'run'}"], REPO_ROOT)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: config error: key 'train.precision': value 'fp16' needs a CUDA GPU")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the kernels may run on a GPU")
def test_the_mamba_ssm_scan_without_a_gpu_is_refused_before_the_run_writes_anything(tmp_path):
    result = run_python(["pretrain.py", "--config", "configs/pretrain/tiny-test.yaml", "model.scan_backend=mamba_ssm",
                         "model.moe.ep_size=1", f"run.dir={tmp_path / 'run'}"], REPO_ROOT)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: config error: key 'model.scan_backend': 'mamba_ssm' cannot run")
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_a_wrong_shard_path_stops_pretraining_before_the_network_is_built(tmp_path):
    """As finetuning lists its pairs first: at full size the network, CLIP and the engine take minutes to start."""
    result = run_python(["pretrain.py", "--config", "configs/pretrain/tiny-test.yaml", "data.source=shards",
                         f"data.shards={tmp_path / 'typo'}", f"run.dir={tmp_path / 'run'}"], REPO_ROOT)
    assert result.returncode == 2, result.stderr
    assert f"data.shards={tmp_path / 'typo'} is neither a directory nor a .tar file" in result.stderr
    assert "MoE dispatch" not in result.stdout   # printed as the network is built


@pytest.mark.parametrize("entry, overrides, message", [
    # each found once rank 0 has created and locked run.dir: as the data is built, as the resume is resolved
    ("pretrain", ["data.source=shards", "data.shards={tmp}/typo"], "data.shards={tmp}/typo is neither"),
    ("pretrain", ["run.resume={tmp}/typo"], "error: run.resume='{tmp}/typo': no such file or directory"),
    ("finetune", ["model.moe.ep_size=1", "data.root={tmp}/typo"], "error: {tmp}/typo: none of"),
], ids=["pretrain-data", "pretrain-resume", "finetune-data"])
def test_a_refused_start_leaves_behind_no_run_dir_it_created(tmp_path, entry, overrides, message):
    """Not even one holding only its lock file, nor the parents it created for it (tmp_path, there before,
    stays): the start wrote nothing."""
    def fill(text):
        return text.format(tmp=tmp_path)

    result = run_python([f"{entry}.py", "--config", f"configs/{entry}/tiny-test.yaml", *map(fill, overrides),
                         f"run.dir={tmp_path / 'new' / 'run'}"], REPO_ROOT)
    assert result.returncode == 2, result.stderr
    assert fill(message) in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("holder, job, restart, replace", [
    ("pid 7 on n1, SLURM job 111 restart 0", "111", "1", True),    # this job's earlier run: stale
    ("pid 7 on n1, SLURM job 111 restart 0", "222", "1", False),   # another job's run: never taken over
    ("pid 7 on n1, SLURM job 111 restart 1", "111", "1", False),   # this very restart (a duplicate launch)
    ("pid 7 on n1, not under SLURM", "111", "1", False),
])
def test_only_an_earlier_restart_of_this_job_counts_as_a_stale_lock(monkeypatch, holder, job, restart, replace):
    """Taking over another job's (or a concurrent duplicate's) live run.dir lock would let two runs prune
    and overwrite each other's checkpoints."""
    from m2r.engine import run_lock

    monkeypatch.setenv("SLURM_JOB_ID", job)
    monkeypatch.setenv("SLURM_RESTART_COUNT", restart)
    assert run_lock._earlier_run_of_this_job(holder) is replace


@pytest.mark.parametrize("holder, job, restart, replace", [
    ("pid 7 on n1, SLURM job 111 restart 9", "111", "10", True),
    ("pid 7 on n1, SLURM job 111 restart 10", "111", "11", True),    # requeued ten times and more
    ("pid 7 on n1, SLURM job 111 restart 11", "111", "11", False),
])
def test_a_stale_lock_is_recognised_after_any_number_of_restarts(monkeypatch, holder, job, restart, replace):
    from m2r.engine import run_lock

    monkeypatch.setenv("SLURM_JOB_ID", job)
    monkeypatch.setenv("SLURM_RESTART_COUNT", restart)
    assert run_lock._earlier_run_of_this_job(holder) is replace


def test_a_full_disk_is_a_users_error_one_line_with_exit_status_2():
    from m2r.atomic import StorageError
    from m2r.cli import user_errors

    assert issubclass(StorageError, user_errors())


def test_the_model_summary_takes_keys_as_training_configs_name_them(capsys):
    from m2r.models import summary

    summary.main(["--config", "configs/model/tiny.yaml", "model.moe.top_k=1"])
    prefixed = capsys.readouterr().out
    summary.main(["--config", "configs/model/tiny.yaml", "moe.top_k=1"])
    # the same lines (the first call also announces a decision, once per process)
    assert prefixed.endswith(capsys.readouterr().out) and "trainable_params: 470354" in prefixed


def test_the_tools_import_deepspeed_without_its_accelerator_warning():
    """DeepSpeed prints 'Setting accelerator to CPU' (on stdout) from every process unless told."""
    env = {key: value for key, value in os.environ.items() if key != "DS_ACCELERATOR"}
    result = subprocess.run([sys.executable, "-c", "import m2r.models.moe"], cwd=REPO_ROOT, capture_output=True,
                            text=True, env=dict(env, CUDA_VISIBLE_DEVICES=""), timeout=120)
    assert result.returncode == 0 and "Setting accelerator" not in result.stdout + result.stderr


@pytest.mark.parametrize("script", ["launch/pretrain.sbatch", "launch/finetune.sbatch"])
def test_an_sbatch_script_run_outside_the_repository_says_where_to_submit_from(script, tmp_path):
    result = subprocess.run(["bash", os.path.join(REPO_ROOT, script)], capture_output=True, text=True, timeout=30,
                            env=dict(os.environ, M2R_ROOT=str(tmp_path), CONFIG="configs/finetune/tiny-test.yaml"))
    assert result.returncode == 2
    assert f"error: launch/train_job.sh not found in {tmp_path}: submit from the repository root or set M2R_ROOT" \
        in result.stderr


@pytest.mark.parametrize("script, kind", [("launch/pretrain.sbatch", "pretrain"),
                                          ("launch/finetune.sbatch", "finetune")])
def test_an_sbatch_script_given_a_missing_config_names_a_shipped_one_of_its_own_kind(script, kind):
    """The hint names the entry point's own configs: m2r:pretrain/... given to finetuning would fail again."""
    result = subprocess.run(["bash", os.path.join(REPO_ROOT, script)], capture_output=True, text=True, timeout=30,
                            env=dict(os.environ, M2R_ROOT=str(REPO_ROOT), SLURM_JOB_ID="1", CONFIG="no-such.yaml"))
    assert result.returncode == 2
    assert f"CONFIG='no-such.yaml' not found in {REPO_ROOT} (a shipped one: m2r:{kind}/<x>.yaml)" in result.stderr


@pytest.mark.parametrize("argv", [
    ["train.lr=1", "--config", "c.yaml", "train.steps=2"],
    ["--config", "c.yaml", "train.lr=1", "--local_rank=0", "train.steps=2"],   # the deepspeed launcher's argument
])
def test_overrides_count_on_both_sides_of_the_options(argv):
    """argparse's plain parse refused the second group as 'unrecognized arguments' after taking the first."""
    from m2r.cli import parse_entry_args

    args = parse_entry_args(argv, "d", "h")
    assert (args.config, args.overrides) == ("c.yaml", ["train.lr=1", "train.steps=2"])


def test_a_second_config_file_is_refused_not_silently_dropped(capsys):
    """argparse kept the last --config: a user expecting the two merged trained with one of them."""
    from m2r.cli import parse_entry_args

    with pytest.raises(SystemExit) as exit_:
        parse_entry_args(["--config", "base.yaml", "--config", "mine.yaml"], "d", "h")
    assert exit_.value.code == 2
    assert "--config given 2 times (base.yaml, mine.yaml)" in capsys.readouterr().err
