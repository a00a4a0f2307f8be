"""An entry point (pretrain.py or finetune.py) that receives SIGUSR1 on every rank during start-up,
right after installing its stop handler, as SLURM's warning may arrive. Launched by tests:

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 tests/signal_at_start.py pretrain.py --config ... [key=value ...]
"""
import runpy
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import m2r.dist as dist  # noqa: E402

discover = dist.discover_dist_env


def signalled_start_up():
    signal.raise_signal(signal.SIGUSR1)
    return discover()


dist.discover_dist_env = signalled_start_up
sys.argv = [str(REPO / sys.argv[1]), *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
