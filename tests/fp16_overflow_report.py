"""What an fp16 run reports after DeepSpeed skips steps, at ZeRO 0, 1 and 2: one process, a tiny linear model
in an fp16 DeepSpeed engine configured as m2r configures it, the step reports of `TrainingRun`.

Steps 1 and 2 overflow (inputs of 1e4: inf gradients once scaled), step 3 does not; steps 2 and 3 are log
steps. Writes run.dir=<argv[1]>/zero<stage> for each stage. DeepSpeed refuses fp16 on a CPU without
fp16 kernels (its sanity check); the loss scaling m2r reads runs in fp32 on the host, so the check is
lifted here. Run by tests/test_monitor.py."""
import datetime
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from m2r import dist
from m2r.config import load_config
from m2r.engine.config import PretrainConfig
from m2r.engine.deepspeed_config import build_deepspeed_config
from m2r.engine.monitor import StepTimer
from m2r.engine.run import TrainingRun

REPO_ROOT = Path(__file__).resolve().parents[1]


def report_steps(stage: int, run_dir: Path) -> None:
    import deepspeed

    cfg = load_config(PretrainConfig, str(REPO_ROOT / "configs/pretrain/tiny-test.yaml"),
                      ["train.precision=fp16", f"train.zero_stage={stage}", "train.grad_accum=1",
                       "run.log_every=2", "run.tensorboard=false", f"run.dir={run_dir}"])
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()),
                                      config=build_deepspeed_config(cfg.train, 1), dist_init_required=False)
    run = SimpleNamespace(cfg=cfg, engine=engine, step=0, run_dir=run_dir, topology=SimpleNamespace(world_size=1))
    run._loss_scaling = lambda: TrainingRun._loss_scaling(run)
    run._stop_if_weights_took_a_non_finite_step = lambda loss: TrainingRun._stop_if_weights_took_a_non_finite_step(
        run, loss)
    TrainingRun._open_monitor(run, total_steps=3)
    timer = StepTimer()
    for run.step, input_scale in enumerate([1e4, 1e4, 1e-2], start=1):
        inputs = input_scale * torch.randn(cfg.train.micro_batch, 4)
        loss = engine(inputs.half()).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
        timer.end_step(cfg.train.micro_batch)
        TrainingRun._log_train_step(run, torch.tensor([loss.item(), loss.item(), 0.0]), 1e-3, timer,
                                    log_step=run.step % 2 == 0 or run.step == 3)
    run.monitor.close()


def main() -> None:
    from deepspeed.accelerator import get_accelerator

    type(get_accelerator()).is_fp16_supported = lambda self: True
    dist.init_distributed(dist.discover_dist_env(), datetime.timedelta(minutes=3))
    for stage in (0, 1, 2):
        report_steps(stage, Path(sys.argv[1]) / f"zero{stage}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
