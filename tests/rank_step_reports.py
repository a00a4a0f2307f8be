"""The step reports of `TrainingRun` on two ranks whose steps differ, launched by tests/test_engine_dist.py:

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 tests/rank_step_reports.py RESULT_JSON

fp32 at ZeRO 0 with a training capacity (dropped fractions reported) and run.log_every=2, on an engine stub:
rank 0's steps are finite, rank 1's loss is NaN from step 3 on. Rank 0 writes each rank's outcome, the steps
reported and the error that stopped them. A rank that stopped alone would leave the other in its next
collective; the gloo timeout (30 s) ends such a wait.
"""
import datetime
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from m2r import dist, stop_signals  # noqa: E402
from m2r.config import load_config  # noqa: E402
from m2r.engine.config import PretrainConfig  # noqa: E402
from m2r.engine.monitor import NullMonitor, StepTimer  # noqa: E402
from m2r.engine.run import StepResult, TrainingRun  # noqa: E402

NAN_FROM_STEP = 3


class Run(TrainingRun):
    """The reporting of a run, without a network: an engine stub and a monitor that keeps what it is given."""

    def __init__(self):
        self.cfg = load_config(PretrainConfig, str(REPO / "configs/pretrain/tiny-test.yaml"),
                               ["train.precision=fp32", "train.zero_stage=0", "model.moe.capacity_factor=1.0",
                                "run.log_every=2"])
        self.stop_request, self.step, self.total_steps = stop_signals.StopRequest(), 0, 6
        self.engine = SimpleNamespace(get_global_grad_norm=lambda: None, skipped_steps=0)
        self.reported = []
        self.monitor = NullMonitor()
        self.monitor.log_train = lambda step, scalars, log_step: self.reported.append(step)

    def step_result(self) -> StepResult:
        self.step += 1
        loss = float("nan") if dist.rank() == 1 and self.step >= NAN_FROM_STEP else 1.0
        as_report = dict(dtype=torch.float64)
        return StepResult(torch.tensor([loss, 0.5, 0.1], **as_report), torch.full((3, 4), 0.25, **as_report), 1e-3,
                          torch.tensor([0.1, 0.0, 0.2], **as_report))


def main() -> None:
    dist.init_distributed(dist.discover_dist_env(), datetime.timedelta(seconds=30))
    run, outcome = Run(), "finished"
    try:
        while run.step < run.total_steps:
            run._report_step(run.step_result(), StepTimer())
    except FloatingPointError as error:
        outcome = str(error).split(":")[0]
    results = dist.all_gather_object({"reported": run.reported, "outcome": outcome})
    if dist.is_rank0():
        Path(sys.argv[1]).write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
