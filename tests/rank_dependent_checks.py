"""Checks whose outcome differs per rank, launched by tests/test_engine_dist.py:

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 tests/rank_dependent_checks.py RESULT_JSON

The tiny network with its experts split over two ranks (ep_size 2) is given weights by global name that lack
rank 1's experts (global ids 2 and 3), as from a checkpoint missing the EMA file of rank 1's expert shard: an
EMA loaded at init.use_ema (`load_trainable_weights`), one resumed (`EMA.load_state_dict`) and an init.weights
file (`local_state_from_global`). Rank 0 writes what each rank got from each ({check: [rank 0's, rank 1's]}):
"done", or the error's type and message. A rank that raised alone would leave the other in its next
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
from m2r import dist  # noqa: E402
from m2r.config import load_config  # noqa: E402
from m2r.engine.experts import global_expert_names  # noqa: E402
from m2r.engine.finetuner import local_state_from_global  # noqa: E402
from m2r.engine.optim import EMA, load_trainable_weights  # noqa: E402
from m2r.models.config import ModelConfig  # noqa: E402
from m2r.models.m2restore import build_model  # noqa: E402

RANK_1_EXPERTS = (".deepspeed_experts.2.", ".deepspeed_experts.3.")


def outcome(check) -> str:
    try:
        check()
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return "done"


def write_outcomes(checks, result_json: str) -> None:
    """Every check run on every rank; rank 0 writes {check: [rank 0's outcome, rank 1's]} to `result_json`."""
    results = {name: dist.all_gather_object(outcome(check)) for name, check in checks.items()}
    if dist.is_rank0():
        Path(result_json).write_text(json.dumps(results))


def main() -> None:
    dist.init_distributed(dist.discover_dist_env(), datetime.timedelta(seconds=30))
    torch.manual_seed(0)
    model = build_model(load_config(ModelConfig, str(REPO / "configs/model/tiny.yaml"), ["moe.ep_size=2"]))
    names = global_expert_names(model)
    state = {names[key]: value for key, value in model.state_dict().items()
             if not any(infix in names[key] for infix in RANK_1_EXPERTS)}
    engine = SimpleNamespace(module=model, optimizer=SimpleNamespace())
    checks = {"init_use_ema": lambda: load_trainable_weights(engine, state, "the EMA of ckpt"),
              "resumed_ema": lambda: EMA(model, 0.5).load_state_dict(state),
              "init_weights_file": lambda: local_state_from_global(model, state)}
    write_outcomes(checks, sys.argv[1])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
