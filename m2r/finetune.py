r"""Finetune M2Restore on AllWeather, CDD-11 or a paired folder, on the pretraining engine (DeepSpeed,
expert parallelism, ZeRO 1/2, bf16/fp16, activation checkpointing, sharded checkpoints).

    deepspeed --num_gpus 8 finetune.py --config configs/finetune/allweather.yaml data.root=/data/allweather \
        init.weights=runs/m2restore/checkpoints model.clip.weights=/path/daclip_ViT-B-32.pt
    torchrun --nproc_per_node 8 finetune.py --config configs/finetune/cdd11-plus.yaml data.root=/data/CDD-11 \
        init.weights=runs/m2restore-plus/checkpoints model.clip.weights=/path/daclip_ViT-B-32.pt
    python finetune.py --config configs/finetune/tiny-test.yaml data.root=/data/allweather model.moe.ep_size=1
    torchrun --nproc_per_node 8 -m m2r.finetune --config m2r:finetune/allweather.yaml ...   # an installed m2r

Starting weights (`init.weights`, used only when the run has no checkpoint of its own yet):
a pretraining checkpoint directory of any world size / ep_size (weights only, experts by global id; its EMA
weights with `init.use_ema=true`), an exported `.safetensors`, an official `.ckpt/.pth/.pt` (through
m2r.models.convert), or nothing (scratch).
Epochs: a DistributedSampler deals every rank the same number of distinct images (drop_last), crops
are drawn from (seed, epoch, index). The learning rate warms up for `train.warmup_epochs` and follows a
cosine to `train.min_lr` at `train.schedule_epochs` (0: `train.epochs`), stepped per optimizer step. A fresh run
first validates its starting weights (step 0, the 'before finetuning' figure, never a best). After every epoch
all ranks validate on centre crops of the test sets (the all-to-all needs every rank), a checkpoint
is saved, and the best checkpoint per metric in `run.best_metrics` is kept under `best_<metric>/`
(hard links to that epoch's checkpoint files, not a second save) and exported as
`best_<metric>.safetensors` for `python -m m2r.evaluate`, with `best_<metric>.yaml` (its network config, read
beside it: copy the two together) and `best_<metric>.json` (value, epoch, step).

`key=value` overrides any config key. A run resumes from its newest checkpoint by default
(`run.resume=latest|none|<path>`); SIGTERM/SIGUSR1 save mid-epoch and exit 0; `run.stop_after_steps=N` or
`run.stop_after_epochs=N` end this process after N steps or epochs, checkpoint first. Resuming at the same
topology continues the epoch exactly. Resuming an older checkpoint takes the bests it recorded: newer best
copies move to `best_<metric>/abandoned/`. See m2r/engine/finetuner.py for the loop; the keys:
m2r/engine/config.py (train, run, init, data), m2r/models/config.py (model).
"""
from m2r.cli import run_main
from m2r.engine.entry import run_training


def main(argv=None) -> int:
    return run_training("finetune", argv, __doc__)


if __name__ == "__main__":
    run_main(main)
