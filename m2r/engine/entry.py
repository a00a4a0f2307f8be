"""What the two training entry points (m2r/pretrain.py, m2r/finetune.py) share: their start-up, in order."""
import re
import sys
from typing import Optional, Sequence

from omegaconf import OmegaConf

from m2r import dist, stop_signals
from m2r.cli import parse_entry_args
from m2r.config import ConfigError, load_config

OTHER_KIND = {"pretrain": "finetune", "finetune": "pretrain"}
_ABSENT = object()   # `_has_key`: not in the schema


def run_training(kind: str, argv: Optional[Sequence[str]], description: str) -> int:
    """`--config FILE [key=value ...]` (argv; None: the command line) -> the run of `kind` ('pretrain': a
    Trainer, 'finetune': a Finetuner) to its end; returns its exit code."""
    args = parse_entry_args(sys.argv[1:] if argv is None else argv, description, f"configs/{kind}/<name>.yaml")
    stop_request = stop_signals.StopRequest()   # before the slow start-up, which a stop signal must not kill
    env = dist.discover_dist_env()
    schema, run_class = _schema_and_run(kind)
    try:
        cfg = load_config(schema, args.config, args.overrides)
    except ConfigError as error:
        raise ConfigError(f"{error}{_other_kind_hint(kind, str(error))}") from None
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


def _other_kind_hint(kind: str, message: str) -> str:
    """Where the refused key is unknown here but one of the other entry point's: its config given to this one,
    or a habit from it (run.save_every in a finetune, which saves every epoch)."""
    refused = re.search(r"key '([^']+)'", message)
    other = OTHER_KIND[kind]
    if refused is None or not _has_key(other, refused.group(1)) or _has_key(kind, refused.group(1)):
        return ""
    return f" ({refused.group(1)} is a key of {other}.py's configs, not of {kind}.py's)"


def _has_key(kind: str, key: str) -> bool:
    schema, _ = _schema_and_run(kind)
    # a key whose default is None (data.val_root, data.shards, init.weights) is a key all the same
    return OmegaConf.select(OmegaConf.structured(schema), key, default=_ABSENT) is not _ABSENT
