"""Validation at ep_size 2 over batches the ranks cannot share evenly, launched by tests/test_engine_dist.py:

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 tests/uneven_validation.py RESULT_JSON

Two validation sets of 3 and 1 images in batches of 2 give batches of 2, 1 and 1 images: the first round's
two ranks send different numbers of tokens through every MoE all-to-all, the second round's rank 1 runs the
padding forward; a set of one image alone gives one batch for two ranks. Each case is scored by the tiny
network with its experts split over the two ranks and with every expert local (same weights); rank 0 writes
both results to RESULT_JSON. A rank left waiting in a collective fails after 30 s (the gloo timeout).
"""
import datetime
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from m2r import dist  # noqa: E402
from m2r.config import load_config  # noqa: E402
from m2r.engine.validate import validation_metrics  # noqa: E402
from m2r.models.config import ModelConfig  # noqa: E402
from m2r.models.m2restore import build_model  # noqa: E402
from m2r.models.moe import DDER  # noqa: E402

SIDE = 32


def tiny_network(ep_size: int):
    torch.manual_seed(0)   # the router, prompts and tiny CLIP draw from the ambient RNG: the same on every rank
    model = build_model(load_config(ModelConfig, str(REPO / "configs/model/tiny.yaml"), [f"moe.ep_size={ep_size}"]))
    for module in model.modules():
        if isinstance(module, DDER) and ep_size > 1:
            module.set_deepspeed_parallelism()   # what deepspeed.initialize does
    return model.eval()


def batches(set_sizes, batch_size: int):
    generator = torch.Generator().manual_seed(5)
    out = []
    for set_index, size in enumerate(set_sizes):
        for start in range(0, size, batch_size):
            count = min(batch_size, size - start)
            gt = torch.randint(0, 256, (count, 3, SIDE, SIDE), generator=generator, dtype=torch.uint8)
            noise = torch.randint(-20, 21, gt.shape, generator=generator)
            out.append({"lq": (gt.int() + noise).clamp(0, 255).to(torch.uint8), "gt": gt,
                        "type_id": torch.full((count,), set_index, dtype=torch.int64)})
    return out


def main() -> None:
    dist.init_distributed(dist.discover_dist_env(), datetime.timedelta(seconds=30))
    split, local = tiny_network(2), tiny_network(1)
    results = {}
    for case, set_sizes in {"3_and_1_in_batches_of_2": (3, 1), "one_image": (1,)}.items():
        val = batches(set_sizes, 2)
        names = [f"set{i}" for i in range(len(set_sizes))]
        results[case] = {"ep2": validation_metrics(split, val, torch.device("cpu"), torch.float32, names),
                         "ep1": validation_metrics(local, val, torch.device("cpu"), torch.float32, names),
                         "batches": len(val)}
    if dist.is_rank0():
        Path(sys.argv[1]).write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
