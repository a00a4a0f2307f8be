"""Pretrain M2Restore on DeepSpeed (expert parallel MoE, ZeRO 1/2, bf16/fp16, sharded checkpoints).

    deepspeed --num_gpus 2 pretrain.py --config configs/pretrain/demo.yaml          # the CPU demo
    deepspeed [--num_gpus N] pretrain.py --config configs/pretrain/<x>.yaml [key=value ...]
    torchrun --nproc_per_node N pretrain.py --config configs/pretrain/<x>.yaml [key=value ...]
    srun --kill-on-bad-exit=1 --ntasks-per-node=8 python pretrain.py --config ...    # one task per GPU
    python pretrain.py --config configs/pretrain/tiny-test.yaml                      # one process

The same from an installed m2r, in any directory (`m2r:` names a shipped config, m2r/config.py):

    deepspeed --num_gpus 2 --module m2r.pretrain --config m2r:pretrain/demo.yaml
    torchrun --nproc_per_node N -m m2r.pretrain --config my-run.yaml [key=value ...]
    m2r-pretrain --config my-run.yaml                                                # one process

`key=value` overrides any config key, e.g. `train.steps=100 model.moe.ep_size=2 run.resume=none`.
The learning rate warms up for `train.warmup_steps` and follows a cosine to `train.min_lr` at
`train.steps`; for a short run of a recipe keep `train.steps` and set `run.stop_after_steps=N` (a
checkpoint, then exit 0). A run resumes from its newest checkpoint by default; SIGTERM or SIGUSR1 saves
a checkpoint and exits 0. See m2r/engine/trainer.py for the loop; the keys: m2r/engine/config.py
(train, run), m2r/models/config.py (model), m2r/data/config.py (data).
"""
from m2r.cli import run_main
from m2r.engine.entry import run_training


def main(argv=None) -> int:
    return run_training("pretrain", argv, __doc__)


if __name__ == "__main__":
    run_main(main)
