r"""Finetune M2Restore on AllWeather, CDD-11 or a paired folder, on the pretraining engine (DeepSpeed,
expert parallelism, ZeRO 1/2, bf16/fp16, activation checkpointing, sharded checkpoints).

    deepspeed --num_gpus 8 finetune.py --config configs/finetune/allweather.yaml data.root=/data/allweather \
        init.weights=runs/m2restore/checkpoints model.clip.weights=/path/daclip_ViT-B-32.pt
    torchrun --nproc_per_node 8 finetune.py --config configs/finetune/cdd11-plus.yaml data.root=/data/CDD-11 \
        init.weights=runs/m2restore-plus/checkpoints model.clip.weights=/path/daclip_ViT-B-32.pt
    python finetune.py --config configs/finetune/tiny-test.yaml data.root=/data/allweather model.moe.ep_size=1
    torchrun --nproc_per_node 8 -m m2r.finetune --config m2r:finetune/allweather.yaml ...   # an installed m2r

Starting weights (`init.weights`, used only when the run has no checkpoint of its own yet):
a pretraining checkpoint directory of any world size / ep_size (weights only, experts by global id),
an exported `.safetensors`, an official `.ckpt/.pth/.pt` (through m2r.models.convert), or nothing (scratch).
Epochs: a DistributedSampler deals every rank the same number of distinct images (drop_last), crops
are drawn from (seed, epoch, index). The learning rate warms up for `train.warmup_epochs` and follows a
cosine to `train.min_lr` at `train.schedule_epochs`, stepped per optimizer step. After every epoch
all ranks validate on centre crops of the test sets (the all-to-all needs every rank), a checkpoint
is saved, and the best checkpoint per metric in `run.best_metrics` is kept under `best_<metric>/`
and exported as `best_<metric>.safetensors` for `python -m m2r.evaluate`. SIGTERM/SIGUSR1 save
mid-epoch; resuming at the same topology continues the epoch exactly.
"""
import sys

from m2r import dist, stop_signals
from m2r.cli import parse_entry_args, run_main
from m2r.config import load_config


def main(argv=None) -> int:
    args = parse_entry_args(sys.argv[1:] if argv is None else argv, __doc__, "configs/finetune/<name>.yaml")
    stop_request = stop_signals.StopRequest()   # before the slow start-up, which a stop signal must not kill
    env = dist.discover_dist_env()

    from m2r.engine.config import FinetuneConfig
    from m2r.engine.finetuner import Finetuner

    cfg = load_config(FinetuneConfig, args.config, args.overrides)
    exit_code = Finetuner(cfg, env, stop_request).fit()
    # SLURM's job script resends its warning until the step ends, and Python's shutdown gives USR1 back its
    # default action (end the process): a resend then would fail a run that stopped cleanly.
    stop_signals.ignore_stop_signals()
    dist.destroy_process_group()
    return exit_code


if __name__ == "__main__":
    run_main(main)
