"""What the two training entry points (m2r/pretrain.py, m2r/finetune.py) share: their start-up, in order."""
import sys
from typing import Optional, Sequence

from m2r import dist, stop_signals
from m2r.cli import parse_entry_args
from m2r.config import load_config


def run_training(kind: str, argv: Optional[Sequence[str]], description: str) -> int:
    """`--config FILE [key=value ...]` (argv; None: the command line) -> the run of `kind` ('pretrain': a
    Trainer, 'finetune': a Finetuner) to its end; returns its exit code."""
    args = parse_entry_args(sys.argv[1:] if argv is None else argv, description, f"configs/{kind}/<name>.yaml")
    stop_request = stop_signals.StopRequest()   # before the slow start-up, which a stop signal must not kill
    env = dist.discover_dist_env()
    schema, run_class = _schema_and_run(kind)
    cfg = load_config(schema, args.config, args.overrides)
    exit_code = run_class(cfg, env, stop_request).fit()
    # SLURM's job script resends its warning until the step ends, and Python's shutdown gives USR1 back its
    # default action (end the process): a resend then would fail a run that stopped cleanly.
    stop_signals.ignore_stop_signals()
    dist.destroy_process_group()
    return exit_code


def _schema_and_run(kind: str):
    from m2r.engine.config import FinetuneConfig, PretrainConfig

    if kind == "pretrain":
        from m2r.engine.trainer import Trainer

        return PretrainConfig, Trainer
    from m2r.engine.finetuner import Finetuner

    return FinetuneConfig, Finetuner
