"""Test helper: build the trainer (which resumes), then save its weights keyed by global expert id and,
under ZeRO 1/2, its optimizer's state as DeepSpeed writes it into a checkpoint (OUT.pt.zero.rank<R>).

    python tests/engine_dump_resumed.py OUT.pt --config CONFIG [key=value ...]
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m2r import dist  # noqa: E402
from m2r.config import load_config  # noqa: E402
from m2r.engine.config import PretrainConfig  # noqa: E402
from m2r.engine.experts import global_expert_names  # noqa: E402
from m2r.engine.trainer import Trainer  # noqa: E402


def main(out: str, argv) -> None:
    assert argv[0] == "--config", "usage: engine_dump_resumed.py OUT.pt --config CONFIG [key=value ...]"
    env = dist.discover_dist_env()
    trainer = Trainer(load_config(PretrainConfig, argv[1], argv[2:]), env)
    module = trainer.engine.module
    names = global_expert_names(module)
    torch.save({names[key]: value for key, value in module.state_dict().items()}, f"{out}.rank{env.rank}")
    if trainer.cfg.train.zero_stage > 0:
        torch.save({"optimizer_state_dict": trainer.engine.optimizer.state_dict()}, f"{out}.zero.rank{env.rank}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
