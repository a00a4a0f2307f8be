"""Activation memory of one training forward, per activation-checkpointing mode, measured on any device.

    python bench/activation_memory.py --json runs/bench/activation_memory.json   # faithful + plus, batch 4
    python bench/activation_memory.py --batch 1 ...                              # on a machine with < 32 GB
    python bench/activation_memory.py --smoke                                    # tiny model, seconds
    python bench/activation_memory.py --batch 1 --compile inductor --configs m2restore --modes none full_res
                                        # what torch.compile's partitioner keeps (~4 min per mode on 2 cores)

Counts the bytes autograd keeps for backward (`torch.autograd.graph.saved_tensors_hooks`, each storage
once; the inputs that recomputed blocks keep) during one forward at 224x224 under bf16 autocast: the
activation part of training's peak memory, which the GPU's allocator adds to the weights, gradients and
optimizer state (listed beside it) and to transient workspace. No GPU needed, so the memory target can be reasoned about
where none is at hand. With `--compile`, the training forward is compiled as `train.compile` does, and
the count is what the compiled graph saves (its partitioner recomputes cheap operations and decides
what the recomputed blocks keep). The Mamba scan here is ours (no CUDA): on a GPU mamba_ssm's kernel
keeps far less for the bottleneck.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from m2r.atomic import write_json_atomically  # noqa: E402
from m2r.config import load_config  # noqa: E402
from m2r.models.config import CHECKPOINT_MODES, ModelConfig  # noqa: E402
from m2r.models.m2restore import build_model  # noqa: E402

ADAMW_BYTES_PER_PARAM = 4 + 4 + 8   # fp32 weight, its gradient, two moments


class SavedTensorBytes(torch.autograd.graph.saved_tensors_hooks):
    """Sums the bytes of every distinct storage autograd saves while active, parameters excluded
    (they are counted with the weights)."""

    def __init__(self, parameters):
        self.storages = {}
        self.parameter_storages = {p.untyped_storage().data_ptr() for p in parameters}
        super().__init__(self._pack, lambda tensor: tensor)

    def _pack(self, tensor):
        self.keep(tensor)
        return tensor

    def keep(self, tensor) -> None:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.parameter_storages:
            self.storages[storage.data_ptr()] = storage.nbytes()

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def saved_bytes(model, lq: torch.Tensor, mode: str, compiled: bool) -> int:
    model.set_activation_checkpointing(mode)
    saved = SavedTensorBytes(model.parameters())
    def keep_inputs(_module, args) -> None:   # a recomputed block saves nothing inside, but its
        for arg in args:                      # inputs stay alive until its backward
            if isinstance(arg, torch.Tensor):
                saved.keep(arg)

    # A compiled graph saves the recomputed blocks' inputs itself (and its hooks run only while tracing).
    hooks = [] if compiled else [module.register_forward_pre_hook(keep_inputs)
                                 for module in model.modules() if getattr(module, "recompute_in_backward", False)]
    with saved, torch.autocast(lq.device.type, dtype=torch.bfloat16):
        output = model(lq)
    for hook in hooks:
        hook.remove()
    del output
    return saved.total


def measure(config: str, overrides, batch: int, crop: int, device: torch.device, modes, compile_backend: str) -> dict:
    cfg = load_config(ModelConfig, REPO / "configs" / "model" / f"{config}.yaml", list(overrides))
    model = build_model(cfg).to(device).train()
    if compile_backend:
        model.use_channels_last()
        model.compile_training_forward(compile_backend)
    lq = torch.rand(batch, 3, crop, crop, generator=torch.Generator().manual_seed(0)).to(device)
    trainable = sum(p.numel() for p in model.parameters())
    clip = sum(p.numel() * p.element_size() for p in model.clip_prior.parameters())
    result = {"config": config, "overrides": list(overrides), "batch": batch, "crop": crop,
              "compile": compile_backend or None,
              "weights_grads_adamw_gb": trainable * ADAMW_BYTES_PER_PARAM / 1e9, "frozen_clip_gb": clip / 1e9}
    for mode in modes:
        result[f"saved_activations_gb/{mode}"] = saved_bytes(model, lq, mode, bool(compile_backend)) / 1e9
        print(f"  {config} AC({mode}): {result[f'saved_activations_gb/{mode}']:.2f} GB saved", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model at 64x64")
    parser.add_argument("--clip-weights", default="/tmp/m2r-bench/daclip_random.pt",
                        help="DA-CLIP-sized weights (bench/train_speed.py writes random ones there)")
    parser.add_argument("--batch", type=int, default=4,
                        help="images per forward (activations scale linearly with it: measure at 1 where "
                             "memory is short, the faithful network at 4 keeps about 20 GB)")
    parser.add_argument("--configs", nargs="+", default=["m2restore", "m2restore-plus"])
    parser.add_argument("--modes", nargs="+", default=list(CHECKPOINT_MODES), choices=CHECKPOINT_MODES)
    parser.add_argument("--compile", default="", help="torch.compile backend for the training forward "
                        "(inductor, as train.compile); compiled without gate noise, with the speed settings "
                        "the benchmark's compiled variants use")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        runs = [("tiny", (), 2, 64)]
    else:
        from bench.train_speed import DETERMINISTIC, FAST_FAITHFUL, write_random_clip

        weights = write_random_clip(Path(args.clip_weights))
        compiled = FAST_FAITHFUL + DETERMINISTIC if args.compile else ()
        runs = [(name, (f"clip.weights={weights}", *compiled), args.batch, 224) for name in args.configs]
    results = {"device": str(device), "torch": torch.__version__, "runs": []}
    for config, overrides, batch, crop in runs:
        results["runs"].append(measure(config, overrides, batch, crop, device, args.modes, args.compile))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomically(args.json, results)


if __name__ == "__main__":
    main()
