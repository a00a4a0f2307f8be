"""An entry point (pretrain.py or finetune.py) whose ranks all receive SIGUSR1, as SLURM's warning
reaches every process of a job step: `start` right after the entry point installs its stop handler
(during start-up), `after-step-N` once the run has taken step N, `resent-after-step-N` then again every
20 ms until the process has ended (SLURM's job script resends it every 5 s). Launched by tests:

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 tests/signalled_run.py start pretrain.py --config ... [key=value ...]
"""
import os
import runpy
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import m2r.dist as dist  # noqa: E402

when, entry = sys.argv[1], sys.argv[2]
if when == "start":
    discover = dist.discover_dist_env

    def signalled_start_up():
        signal.raise_signal(signal.SIGUSR1)
        return discover()

    dist.discover_dist_env = signalled_start_up
else:
    from m2r.engine.finetuner import Finetuner
    from m2r.engine.trainer import Trainer

    run_class = Finetuner if entry == "finetune.py" else Trainer
    signal_step, train_step = int(when.rsplit("-", 1)[1]), run_class.train_step

    def signalled_step(self, *args):
        result = train_step(self, *args)
        if self.step == signal_step:
            signal.raise_signal(signal.SIGUSR1)
            if when.startswith("resent-"):
                subprocess.Popen(["sh", "-c", f"while kill -USR1 {os.getpid()} 2>/dev/null; do sleep 0.02; done"])
        return result

    run_class.train_step = signalled_step
sys.argv = [str(REPO / entry), *sys.argv[3:]]
runpy.run_path(sys.argv[0], run_name="__main__")
