"""Activation memory of one training forward, per activation-checkpointing mode, measured on any device.

    python bench/activation_memory.py --json runs/bench/activation_memory.json   # faithful + plus, batch 4
    python bench/activation_memory.py --batch 1 ...                              # on a machine with < 32 GB
    python bench/activation_memory.py --smoke                                    # tiny model, seconds

Counts the bytes autograd keeps for backward (`torch.autograd.graph.saved_tensors_hooks`, each storage
once; the inputs that recomputed blocks keep) during one forward at 224x224 under bf16 autocast: the activation part of training's
peak memory, which the GPU's allocator adds to the weights, gradients and optimizer state (listed
beside it) and to transient workspace. No GPU needed, so the memory target can be reasoned about
where none is at hand; torch.compile's partitioner may store less (it recomputes cheap operations).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from m2r.config import load_config  # noqa: E402
from m2r.models.config import ModelConfig  # noqa: E402
from m2r.models.m2restore import CHECKPOINT_MODES, build_model  # noqa: E402

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


def saved_bytes(model, lq: torch.Tensor, mode: str) -> int:
    model.set_activation_checkpointing(mode)
    saved = SavedTensorBytes(model.parameters())
    def keep_inputs(_module, args) -> None:   # a recomputed block saves nothing inside, but its
        for arg in args:                      # inputs stay alive until its backward
            if isinstance(arg, torch.Tensor):
                saved.keep(arg)

    hooks = [module.register_forward_pre_hook(keep_inputs)
             for module in model.modules() if getattr(module, "recompute_in_backward", False)]
    with saved, torch.autocast(lq.device.type, dtype=torch.bfloat16):
        output = model(lq)
    for hook in hooks:
        hook.remove()
    del output
    return saved.total


def measure(config: str, overrides, batch: int, crop: int, device: torch.device) -> dict:
    cfg = load_config(ModelConfig, REPO / "configs" / "model" / f"{config}.yaml", list(overrides))
    model = build_model(cfg).to(device).train()
    lq = torch.rand(batch, 3, crop, crop, generator=torch.Generator().manual_seed(0)).to(device)
    trainable = sum(p.numel() for p in model.parameters())
    clip = sum(p.numel() * p.element_size() for p in model.clip_prior.parameters())
    result = {"config": config, "batch": batch, "crop": crop,
              "weights_grads_adamw_gb": trainable * ADAMW_BYTES_PER_PARAM / 1e9, "frozen_clip_gb": clip / 1e9}
    for mode in CHECKPOINT_MODES:
        result[f"saved_activations_gb/{mode}"] = saved_bytes(model, lq, mode) / 1e9
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
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        runs = [("tiny", (), 2, 64)]
    else:
        from bench.train_speed import write_random_clip

        weights = write_random_clip(Path(args.clip_weights))
        runs = [(name, (f"clip.weights={weights}",), args.batch, 224) for name in ("m2restore", "m2restore-plus")]
    results = {"device": str(device), "torch": torch.__version__, "runs": []}
    for config, overrides, batch, crop in runs:
        results["runs"].append(measure(config, overrides, batch, crop, device))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
