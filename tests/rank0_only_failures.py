"""Rank 0's own work at start-up and at each save, failing on rank 0 alone, launched by tests/test_engine_dist.py:

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 tests/rank0_only_failures.py RESULT_JSON

A run.dir whose config.yaml is a directory stops rank 0 as it opens its reports (`TrainingRun._open_monitor`: the
config, metrics.jsonl, TensorBoard), and a checkpoint directory whose `latest.tmp` is one stops it as a save starts
(`CheckpointManager.save` removes what earlier saves left). Rank 0 writes what each rank got from each ({check:
[rank 0's, rank 1's]}): "done", or the error's type and message. A rank that went on alone would wait in its next
collective, paired with rank 0's next one; the gloo timeout (10 s) ends such a wait.
"""
import datetime
import sys
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from m2r import dist  # noqa: E402
from m2r.config import load_config  # noqa: E402
from m2r.engine.checkpoint import CheckpointManager, Topology  # noqa: E402
from m2r.engine.config import PretrainConfig  # noqa: E402
from m2r.engine.run import TrainingRun  # noqa: E402
from fake_engine import FakeEngine  # noqa: E402
from rank_dependent_checks import write_outcomes  # noqa: E402


def main() -> None:
    dist.init_distributed(dist.discover_dist_env(), datetime.timedelta(seconds=10))
    run_dir = Path(sys.argv[1]).parent / "run"
    if dist.is_rank0():
        (run_dir / "config.yaml").mkdir(parents=True)
        (run_dir / "checkpoints" / "latest.tmp").mkdir(parents=True)
    dist.barrier()
    cfg = load_config(PretrainConfig, str(REPO / "configs/pretrain/tiny-test.yaml"),
                      [f"run.dir={run_dir}", "run.tensorboard=false"])
    topology = Topology(2, 1, "fp32", 1)
    run = SimpleNamespace(cfg=cfg, run_dir=run_dir, step=0, topology=topology, engine=SimpleNamespace(skipped_steps=0))
    checkpoints = CheckpointManager(run_dir / "checkpoints", keep_last=2)
    checks = {"reports_opened": lambda: TrainingRun._open_monitor(run, total_steps=6),
              "save_started": lambda: checkpoints.save(FakeEngine(), 1, topology, {"step": 1}, cfg)}
    write_outcomes(checks, sys.argv[1])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
