"""Random number generators across a resume: saved with a checkpoint and restored exactly, or, where
no saved state applies (another topology), seeded afresh per rank and starting step."""
from __future__ import annotations

import random
from typing import Any, Dict

import numpy as np
import torch


def capture_rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def rank_seed(seed: int, rank: int, counter: int) -> int:
    """A seed distinct per rank and per counter (a starting step, an epoch)."""
    return seed * 1000 + rank + 7919 * counter


def reseed(seed: int, rank: int, step: int) -> None:
    """Fresh torch RNG when no saved state applies: distinct per rank (gate noise) and per starting step."""
    torch.manual_seed(rank_seed(seed, rank, step))
