"""Two-rank expert-parallel checks for the DDER adapter, launched by tests/test_moe.py:

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 tests/dist_moe_parity.py RESULT_JSON CHECKPOINT_DIR

1. Parity: for several cases, DDER with ep_size=2 (experts split over the two ranks, tokens exchanged by
   all-to-all) against ep_size=1 (all experts local), same weights, each rank feeding its own batch, in
   float64. Outputs, balance loss, expert load, input and router gradients must match per rank; expert
   gradients match by global id once the ep_size=1 gradients are summed over ranks.
2. DeepSpeed integration: an engine built around an ep_size=2 DDER writes one checkpoint file per global
   expert, and an ep_size=1 engine loads it back with every expert at its global id.

Rank 0 writes the largest differences (over both ranks) and the checkpoint facts to RESULT_JSON.
"""
import importlib
import json
import os
import sys

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from m2r import dist as m2r_dist  # noqa: E402
from m2r.models.config import MoEConfig  # noqa: E402
from m2r.models.moe import DDER  # noqa: E402

DIM, PROMPT_DIM, NUM_PROMPTS, LAYER_ID, SEED = 8, 12, 6, 1, 7
TAG = "step1"

CASES = {
    "train_noisy_log": dict(moe={}, train=True, shape=(2, DIM, 4, 4)),
    "eval_capacity_linear": dict(moe=dict(eval_capacity_factor=0.6, combine="linear"), train=False,
                                 shape=(2, DIM, 4, 4)),
    # One token per rank: most experts receive no rows, some ranks send nothing to the other.
    "one_token": dict(moe={}, train=True, shape=(1, DIM, 1, 1)),
}


def init_distributed():
    # Skip DeepSpeed's CPU shared-memory op JIT build (40-90 s), unused here (see design/environment.md).
    importlib.import_module("deepspeed.comm.torch")
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")


def build_dder(ep_size, moe_overrides, train, dtype=torch.float64):
    torch.manual_seed(0)   # router and prompt projection come from the ambient RNG: same on every rank
    dder = DDER(DIM, PROMPT_DIM, NUM_PROMPTS, MoEConfig(ep_size=ep_size, **moe_overrides), LAYER_ID, SEED)
    dder.to(dtype).train(train)
    if ep_size > 1:
        dder.set_deepspeed_parallelism()
    return dder


def rank_inputs(shape, rank):
    generator = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    prompt = torch.randn(shape[0], PROMPT_DIM, generator=generator, dtype=torch.float64)
    probs = torch.softmax(torch.randn(shape[0], NUM_PROMPTS, generator=generator, dtype=torch.float64), dim=1)
    output_weights = torch.randn(shape, generator=generator, dtype=torch.float64)
    return (x, prompt, probs), output_weights


def forward_backward(dder, inputs, output_weights, noise_seed):
    x, prompt, probs = (t.clone().requires_grad_(True) for t in inputs)
    torch.manual_seed(noise_seed)   # identical router noise for ep_size 1 and 2
    y, balance_loss, expert_load, dropped = dder(x, prompt, probs)
    ((y * output_weights).sum() + 3.0 * balance_loss).backward()
    return dict(y=y.detach(), balance_loss=balance_loss.detach(), expert_load=expert_load, dropped=dropped,
                x_grad=x.grad, prompt_grad=prompt.grad, probs_grad=probs.grad)


def expert_tensors(dder, grads: bool):
    """{(global id, param name): tensor} for this rank's local experts."""
    tensors = {}
    for local_id, expert in enumerate(dder.deepspeed_moe.experts.deepspeed_experts):
        for name, param in expert.named_parameters():
            tensors[(dder.first_global_expert_id + local_id, name)] = param.grad if grads else param.detach()
    return tensors


def max_diff(a, b):
    """Largest absolute difference; a gradient missing on one side only counts as infinite."""
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def parity_case(case, rank):
    inputs, output_weights = rank_inputs(case["shape"], rank)
    single = build_dder(1, case["moe"], case["train"])
    split = build_dder(2, case["moe"], case["train"])
    ref = forward_backward(single, inputs, output_weights, noise_seed=50 + rank)
    got = forward_backward(split, inputs, output_weights, noise_seed=50 + rank)
    diffs = {name: max_diff(ref[name], got[name]) for name in ref}

    for name, param in split.named_parameters():
        if "deepspeed_moe" not in name:
            diffs[f"grad {name}"] = max_diff(dict(single.named_parameters())[name].grad, param.grad)
    single_expert_grads = expert_tensors(single, grads=True)
    for grad in single_expert_grads.values():
        dist.all_reduce(grad)       # ep_size=1 experts saw only this rank's batch: sum over ranks
    single_weights = expert_tensors(single, grads=False)
    for key, grad in expert_tensors(split, grads=True).items():
        diffs[f"grad expert {key[0]} {key[1]}"] = max_diff(single_expert_grads[key], grad)
    for key, weight in expert_tensors(split, grads=False).items():
        diffs[f"weight expert {key[0]} {key[1]}"] = max_diff(single_weights[key], weight)
    return diffs


def max_over_ranks(diffs):
    """Same keys on both ranks except the expert ones: gather dicts and merge by max."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, diffs)
    merged = {}
    for rank_diffs in gathered:
        for key, value in rank_diffs.items():
            merged[key] = max(value, merged.get(key, 0.0))
    return merged


class AdapterHolder(nn.Module):
    """A DDER one level down, as in the network, with a loss the engine can backpropagate."""

    def __init__(self, dder):
        super().__init__()
        self.adapter = dder

    def forward(self, x, prompt, probs):
        y, balance_loss, _, _ = self.adapter(x, prompt, probs)
        return y.square().mean() + balance_loss


def build_engine(ep_size):
    model = AdapterHolder(build_dder(ep_size, {}, train=True, dtype=torch.float32))
    param_group = {"params": list(model.parameters()), "name": "adapter"}
    optimizer = torch.optim.AdamW(split_params_into_different_moe_groups_for_optimizer(param_group), lr=0.01)
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 1}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def checkpoint_round_trip(checkpoint_dir, rank):
    """Train one step at ep_size=2, save, load into an ep_size=1 engine; compare experts by global id."""
    saver = build_engine(ep_size=2)
    inputs, _ = rank_inputs((2, DIM, 4, 4), rank)
    saver.backward(saver(*(t.float() for t in inputs)))
    saver.step()
    saver.save_checkpoint(checkpoint_dir, tag=TAG)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, expert_tensors(saver.module.adapter, grads=False))
    saved_experts = {key: value for part in gathered for key, value in part.items()}

    loader = build_engine(ep_size=1)
    before_load_diff = experts_max_diff(saved_experts, loader.module.adapter)
    loader.load_checkpoint(checkpoint_dir, tag=TAG, load_module_only=True)
    tag_dir = os.path.join(checkpoint_dir, TAG)
    return dict(files=sorted(os.listdir(tag_dir)),
                main_module_keys=list(read_checkpoint_file(tag_dir, "mp_rank_00_model_states.pt")["module"]),
                expert4_keys=sorted(read_checkpoint_file(tag_dir, "layer_0_expert_4_mp_rank_00_model_states.pt")),
                before_load_max_diff=before_load_diff,
                reload_max_diff=experts_max_diff(saved_experts, loader.module.adapter))


def read_checkpoint_file(tag_dir, name):
    return torch.load(os.path.join(tag_dir, name), map_location="cpu", weights_only=False)


def experts_max_diff(saved_experts, dder):
    return max(max_diff(saved_experts[key], value) for key, value in expert_tensors(dder, grads=False).items())


def main():
    result_path, checkpoint_dir = sys.argv[1], sys.argv[2]
    init_distributed()
    rank = dist.get_rank()
    parity = {name: max_over_ranks(parity_case(case, rank)) for name, case in CASES.items()}
    checkpoint = checkpoint_round_trip(checkpoint_dir, rank)
    checkpoint.update(max_over_ranks({key: checkpoint[key] for key in ("before_load_max_diff", "reload_max_diff")}))
    if rank == 0:
        with open(result_path, "w") as f:
            json.dump(dict(parity=parity, checkpoint=checkpoint), f, indent=1)
    dist.barrier()
    m2r_dist.destroy_process_group()


if __name__ == "__main__":
    main()
