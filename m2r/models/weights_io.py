"""Reading weight files: the one reader behind official M2Restore checkpoints (`m2r.models.convert`)
and CLIP weights (`m2r.models.clip_prior`).

Failures propagate unchanged: each caller turns them into its own error naming the file.
"""
from pathlib import Path
from typing import Dict

import safetensors.torch
import torch


def load_weights_file(path: Path, weights_only: bool = True) -> Dict:
    """A .safetensors file as a flat tensor dict, any other file as a torch pickle, on the CPU.

    `weights_only` refuses pickles holding more than tensors and containers.
    """
    if path.suffix == ".safetensors":
        return safetensors.torch.load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=weights_only)


def unwrap_state_dict(checkpoint: Dict, wrapper_prefix: str) -> Dict[str, torch.Tensor]:
    """The state dict inside a training checkpoint {"state_dict": ...}, or a bare state dict, with
    the prefix a wrapper module adds (DDP's `module.`, Lightning's `net.`) removed when every key
    carries it."""
    state = checkpoint.get("state_dict", checkpoint)
    if state and all(key.startswith(wrapper_prefix) for key in state):
        return {key[len(wrapper_prefix):]: value for key, value in state.items()}
    return state
