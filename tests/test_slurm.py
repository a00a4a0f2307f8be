"""launch/*.sbatch on a real SLURM cluster: 2 emulated nodes x 1 rank, CPU, gloo, the tiny configs.

The cluster (munge, slurmctld, one slurmd per node) is started by tests/slurm/cluster.py for this
module and torn down after it; without root or SLURM packages that apt-get can install, every test
here skips with the reason. The jobs run pretrain.py / finetune.py from this checkout with this
interpreter.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict

import pytest
import torch

from finetune_layouts import build_allweather
from m2r.eval.loading import load_inference_model
from slurm.cluster import SlurmCluster, SlurmUnavailable

pytestmark = pytest.mark.dist

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = "configs/pretrain/tiny-test.yaml"
STEPS = 30
PRETRAIN_OVERRIDES = f"train.steps={STEPS} run.image_every=0"
TINY_FINETUNE_CONFIG = "configs/finetune/tiny-test.yaml"  # 2 epochs, micro-batch 2 per rank
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
# Two emulated nodes, one CPU rank each; --gpus-per-node=0 overrides the script's GPU request.
TWO_CPU_NODES = ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1")


@pytest.fixture(scope="module")
def cluster():
    try:
        slurm = SlurmCluster(nodes=2, cpus_per_node=4).start()
    except SlurmUnavailable as error:
        pytest.skip(f"no throwaway SLURM cluster on this machine: {error}")
    yield slurm
    slurm.stop()


@dataclass
class Job:
    """One submission of a launch script and where its outputs land."""

    cluster: SlurmCluster
    job_id: int
    work: Path

    @property
    def run_dir(self) -> Path:
        return self.work / "run"

    def job_log(self) -> str:
        return "".join(path.read_text() for path in self.work.glob("*.out"))

    def trainer_logs_tail(self, chars: int = 3000) -> str:
        logs = sorted(self.work.glob("logs/*.log"))
        return "".join(f"--- {path.name}:\n{path.read_text()[-chars:]}" for path in logs)

    def restart_log(self, restart: int) -> str:
        (path,) = (self.work / "logs").glob(f"*-{self.job_id}.restart{restart}.log")
        return path.read_text()

    def losses(self) -> Dict[int, float]:
        """step -> loss from metrics.jsonl, which a restart continues from its checkpoint's step."""
        records = [json.loads(line) for line in (self.run_dir / "metrics.jsonl").read_text().splitlines()]
        train = [record for record in records if "loss" in record]
        steps = [record["step"] for record in train]
        assert len(steps) == len(set(steps)), f"a step was logged twice (replayed after resume?): {steps}"
        return {record["step"]: record["loss"] for record in train}

    def last_step_logged(self) -> int:
        metrics = self.run_dir / "metrics.jsonl"
        if not metrics.exists():
            return 0
        complete_lines = metrics.read_text().split("\n")[:-1]  # the trainer may be mid-line
        return max((json.loads(line).get("step", 0) for line in complete_lines), default=0)

    def wait_for_step(self, step: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.last_step_logged() < step:
            state = self.cluster.job_fields(self.job_id).get("JobState")
            if state in FINAL_STATES or time.monotonic() > deadline:
                raise AssertionError(f"job {self.job_id} ({state}) never logged step {step}\n{self.job_log()}")
            time.sleep(0.2)

    def wait_until_final(self, timeout: float) -> Dict[str, str]:
        try:
            return self.cluster.wait_for_state(self.job_id, FINAL_STATES, timeout)
        except TimeoutError as error:
            raise AssertionError(f"{error}\n--- job log:\n{self.job_log()}") from None


def submit(cluster: SlurmCluster, work: Path, script: str = "launch/pretrain.sbatch", config: str = TINY_CONFIG,
           overrides: str = PRETRAIN_OVERRIDES, nodes=TWO_CPU_NODES, **knobs: str) -> Job:
    """Submit `script` with `config`; the run writes to `work`/run, its logs to `work`/logs."""
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHON=sys.executable, CONFIG=config, LOG_DIR=str(work / "logs"),
               OVERRIDES=f"run.dir={work / 'run'} {overrides}",
               OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", **knobs)
    job_id = cluster.submit(script, *nodes, f"--output={work}/%x-%j.out", env=env, cwd=str(REPO_ROOT))
    return Job(cluster, job_id, work)


def assert_completed(job: Job, fields: Dict[str, str]) -> None:
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), \
        f"job {job.job_id}: {fields['JobState']} {fields['ExitCode']}\n{job.job_log()}\n{job.trainer_logs_tail()}"


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory) -> Job:
    job = submit(cluster, tmp_path_factory.mktemp("uninterrupted"))
    assert_completed(job, job.wait_until_final(timeout=150))
    return job


def test_pretrain_sbatch_trains_on_two_nodes_to_the_configured_step(uninterrupted):
    fields = uninterrupted.cluster.job_fields(uninterrupted.job_id)
    assert fields["NodeList"] == "node[1-2]" and fields["Requeue"] == "1"
    log = uninterrupted.restart_log(0)
    assert "world size 2" in log and "launcher srun" in log
    assert f"stopping at step {STEPS}: finished" in log
    assert sorted(uninterrupted.losses()) == list(range(1, STEPS + 1))
    assert (uninterrupted.run_dir / "checkpoints" / f"step{STEPS:08d}").is_dir()


@pytest.mark.parametrize("scancel_flags", [("--batch",), ()], ids=["to the batch shell", "to the ranks only"])
def test_warning_signal_checkpoints_requeues_and_resumes_with_identical_losses(cluster, uninterrupted, tmp_path,
                                                                                scancel_flags):
    """`--batch`: what `#SBATCH --signal=B:USR1@300` makes slurmctld do near the time limit, sent now; the
    script's trap forwards it. Without: the ranks alone get it, and tell the script through M2R_STOP_FILE."""
    job = submit(cluster, tmp_path)
    job.wait_for_step(2, timeout=120)
    cluster.run("scancel", *scancel_flags, "--signal=USR1", str(job.job_id))

    fields = job.wait_until_final(timeout=180)
    assert_completed(job, fields)
    assert fields["Restarts"] == "1"
    first, second = job.restart_log(0), job.restart_log(1)
    assert "received SIGUSR1" in first and "saved checkpoint" in first
    resumed_at = int(re.search(r"resumed from \S+ at step (\d+)", second).group(1))
    assert 2 <= resumed_at < STEPS, f"the signal should land mid-run, resumed at step {resumed_at}"
    assert f"stopping at step {STEPS}: finished" in second
    assert "requeueing job" in job.job_log()
    assert job.losses() == uninterrupted.losses()


def test_deepspeed_launcher_alternative_matches_srun(cluster, uninterrupted, tmp_path):
    """Two ranks on one node: one launcher for the node, although the job has two tasks per node
    (srun inside the job inherits SLURM_NTASKS)."""
    one_node = ("--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1")
    job = submit(cluster, tmp_path, nodes=one_node, LAUNCHER="deepspeed")
    assert_completed(job, job.wait_until_final(timeout=150))
    assert re.fullmatch(r"node[12] slots=2\n", (job.work / "logs" / f"m2r-pretrain-{job.job_id}.hostfile").read_text())
    assert job.losses() == uninterrupted.losses()
    assert "launcher deepspeed" in job.restart_log(0)


def test_finetune_sbatch_continues_the_pretraining_job_and_exports_the_best_weights(cluster, uninterrupted, tmp_path):
    # 8 training pairs over 2 ranks x micro-batch 2: 2 steps per epoch, 4 steps in the config's 2 epochs.
    dataset = build_allweather(tmp_path / "allweather", train=8)
    pretrained = uninterrupted.run_dir / "checkpoints"
    job = submit(cluster, tmp_path / "job", "launch/finetune.sbatch", config=TINY_FINETUNE_CONFIG,
                 overrides=f"data.root={dataset} init.weights={pretrained}")
    assert_completed(job, job.wait_until_final(timeout=120))

    log = job.restart_log(0)
    assert "world size 2 | launcher" in log and "| ep_size 2: 2 per rank" in log
    assert "saved with world size 2, ep_size 1" in log
    assert "2 steps/epoch x 2 epochs = 4 steps" in log
    assert sorted(job.losses()) == [1, 2, 3, 4]
    meta = json.loads((job.run_dir / "checkpoints/step00000004/meta.json").read_text())
    assert (meta["world_size"], meta["ep_size"]) == (2, 2)
    for metric in ("psnr", "ssim"):
        assert json.loads((job.run_dir / f"best_{metric}.json").read_text())["epoch"] in (1, 2)
        # Both ranks' experts merged into one file that a single process loads strictly.
        load_inference_model(str(job.run_dir / f"best_{metric}.safetensors"), torch.device("cpu"))
