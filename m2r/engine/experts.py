"""Name parameters by global expert id, so that state saved at one expert-parallel size loads at another.

DeepSpeed's native MoE keeps `num_experts / ep_size` local experts per rank under
`...deepspeed_moe.experts.deepspeed_experts.<local id>.`; the global id is
`ep_rank * num_local_experts + local id` (the same rule DeepSpeed's checkpoint files use).
"""
import re
from typing import Dict

from torch import nn

EXPERT_INFIX = ".deepspeed_moe.experts.deepspeed_experts."
_LOCAL_ID = re.compile(re.escape(EXPERT_INFIX) + r"(\d+)\.")


def global_expert_names(module: nn.Module) -> Dict[str, str]:
    """Map every state_dict key of `module` to its topology-independent name (identity for dense keys).
    Works before `deepspeed.initialize` too: a DDER knows its expert-parallel rank from construction."""
    from m2r.models.moe import DDER

    names = {key: key for key in module.state_dict()}
    for prefix, layer in module.named_modules():
        if not isinstance(layer, DDER):
            continue
        layer_prefix = f"{prefix}." if prefix else ""
        for key in names:
            if key.startswith(layer_prefix):
                names[key] = layer_prefix + with_global_expert_id(key[len(layer_prefix):],
                                                                  layer.first_global_expert_id)
    return names


def with_global_expert_id(key: str, first_global_id: int) -> str:
    """`...deepspeed_experts.<local id>.` -> `...deepspeed_experts.<first_global_id + local id>.`;
    keys of no expert are returned unchanged."""
    match = _LOCAL_ID.search("." + key)
    if not match:
        return key
    global_id = first_global_id + int(match.group(1))
    return key.replace(f"{EXPERT_INFIX[1:]}{match.group(1)}.", f"{EXPERT_INFIX[1:]}{global_id}.", 1)
