"""Work that fails on one rank alone, at start-up and at each save, launched by tests/test_engine_dist.py:

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 tests/rank0_only_failures.py RESULT_JSON

Rank 0's own work: a run.dir whose config.yaml is a directory stops rank 0 as it opens its reports
(`TrainingRun._open_monitor`: the config, metrics.jsonl, TensorBoard), and a checkpoint directory whose `latest.tmp`
is one stops it as a save starts (`CheckpointManager.save` removes what earlier saves left). Each rank's own read:
a finetuning's validation images, read by each rank from its node's copy, of which rank 1's lacks one
(`Finetuner._val_batches`). Rank 0 writes what each rank got from each ({check: [rank 0's, rank 1's]}): "done", or
the error's type and message. A rank that went on alone would wait in its next collective, paired with the other's
next one; the gloo timeout (10 s) ends such a wait.
"""
import datetime
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from m2r import dist  # noqa: E402
from m2r.config import load_config  # noqa: E402
from m2r.engine.checkpoint import CheckpointManager, Topology  # noqa: E402
from m2r.engine.config import FinetuneConfig, PretrainConfig  # noqa: E402
from m2r.engine.finetuner import Finetuner  # noqa: E402
from m2r.engine.run import TrainingRun  # noqa: E402
from m2r.eval.datasets import evaluation_sets  # noqa: E402
from fake_engine import FakeEngine  # noqa: E402
from finetune_layouts import build_allweather  # noqa: E402
from rank_dependent_checks import write_outcomes  # noqa: E402


def read_validation_images(root: Path) -> None:
    cfg = load_config(FinetuneConfig, str(REPO / "configs/finetune/tiny-test.yaml"),
                      [f"data.root={root}", "data.val_crop=32"])
    val_sets = evaluation_sets("allweather", root, ["raindrop_a"])
    if dist.rank() == 1:   # this node's copy lacks the set's first degraded image
        val_sets = {name: [replace(pairs[0], lq=root / "lost.png"), *pairs[1:]] for name, pairs in val_sets.items()}
    Finetuner._val_batches(SimpleNamespace(cfg=cfg), val_sets)


def main() -> None:
    dist.init_distributed(dist.discover_dist_env(), datetime.timedelta(seconds=10))
    run_dir = Path(sys.argv[1]).parent / "run"
    if dist.is_rank0():
        (run_dir / "config.yaml").mkdir(parents=True)
        (run_dir / "checkpoints" / "latest.tmp").mkdir(parents=True)
        build_allweather(run_dir.parent / "allweather")
    dist.barrier()
    cfg = load_config(PretrainConfig, str(REPO / "configs/pretrain/tiny-test.yaml"),
                      [f"run.dir={run_dir}", "run.tensorboard=false"])
    topology = Topology(2, 1, "fp32", 1)
    run = SimpleNamespace(cfg=cfg, run_dir=run_dir, step=0, topology=topology, engine=SimpleNamespace(skipped_steps=0))
    checkpoints = CheckpointManager(run_dir / "checkpoints", keep_last=2)
    checks = {"reports_opened": lambda: TrainingRun._open_monitor(run, total_steps=6),
              "save_started": lambda: checkpoints.save(FakeEngine(), 1, topology, {"step": 1}, cfg),
              "validation_read": lambda: read_validation_images(run_dir.parent / "allweather")}
    write_outcomes(checks, sys.argv[1])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
