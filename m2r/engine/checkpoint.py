"""Sharded DeepSpeed checkpoints: `step{N:08d}` tags, an atomic `latest`, keep-last-k, exact resume.

A tag directory holds DeepSpeed's files (dense `mp_rank_00_model_states.pt` with our client_state,
`layer_<L>_expert_<E>_...` per global expert, ZeRO optimizer shards), our `meta.json` (step and
topology, readable without torch) and, with EMA on, one `ema_rank<R>.pt` per rank keyed by global
expert id. `latest` is written only after every rank finished, and old tags are deleted only then.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from m2r import dist
from m2r.config import save_config

TAG_PATTERN = re.compile(r"^step(\d{8})$")
DENSE_FILE = "mp_rank_00_model_states.pt"
META_FILE = "meta.json"
CONFIG_FILE = "config.yaml"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


@dataclass(frozen=True)
class Topology:
    world_size: int
    ep_size: int

    def describe(self) -> str:
        return f"world size {self.world_size}, ep_size {self.ep_size}"


@dataclass(frozen=True)
class CheckpointRef:
    root: Path  # the directory holding tags and `latest`
    tag: str

    @property
    def path(self) -> Path:
        return self.root / self.tag

    def meta(self) -> Dict[str, Any]:
        meta_path = self.path / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} is missing: {self.path} is not a complete m2r checkpoint")
        return json.loads(meta_path.read_text())

    def topology(self) -> Topology:
        meta = self.meta()
        return Topology(meta["world_size"], meta["ep_size"])


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


def reseed(seed: int, rank: int, step: int) -> None:
    """Fresh torch RNG when no saved state applies: distinct per rank (gate noise) and per starting step."""
    torch.manual_seed(seed * 1000 + rank + 7919 * step)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def resolve_resume(resume: str, run_checkpoints: Path) -> Optional[CheckpointRef]:
    """`latest` -> the run's newest checkpoint (None if there is none); `none` -> None;
    a path -> that checkpoint directory (its `latest`) or that tag directory."""
    if resume == "none":
        return None
    if resume == "latest":
        latest = run_checkpoints / "latest"
        return CheckpointRef(run_checkpoints, latest.read_text().strip()) if latest.is_file() else None
    path = Path(resume)
    if (path / "latest").is_file():
        return CheckpointRef(path, (path / "latest").read_text().strip())
    if (path / DENSE_FILE).is_file():
        return CheckpointRef(path.parent, path.name)
    raise FileNotFoundError(f"run.resume={resume!r}: neither a checkpoint directory with a 'latest' file "
                            f"nor a tag directory holding {DENSE_FILE}")


def agreed_resume(resume: str, run_checkpoints: Path) -> Optional[CheckpointRef]:
    """`resolve_resume` as rank 0 sees it, on every rank (a shared filesystem may lag on the others)."""
    ref = resolve_resume(resume, run_checkpoints) if dist.is_rank0() else None
    return dist.broadcast_object(ref)


def load_weights_only(engine, ref: CheckpointRef) -> Dict[str, Any]:
    """Model weights (experts by global id, any topology) without optimizer or scheduler; returns the client state."""
    _, client = engine.load_checkpoint(str(ref.root), tag=ref.tag, load_module_only=True,
                                       load_optimizer_states=False, load_lr_scheduler_states=False)
    return client


class CheckpointManager:
    """Save and prune under `root`; every rank calls `save` (DeepSpeed's save is collective)."""

    def __init__(self, root: Path, keep_last: int):
        if keep_last < 2:
            raise ValueError(f"keep_last={keep_last}: keep at least 2 checkpoints")
        self.root = Path(root)
        self.keep_last = keep_last

    def save(self, engine, step: int, topology: Topology, client_state: Dict[str, Any], config,
             ema_state: Optional[Dict[str, torch.Tensor]] = None) -> CheckpointRef:
        """Every rank calls it. The tag becomes `latest` only once complete on every rank; the
        resolved `config` is written beside it as config.yaml."""
        ref = CheckpointRef(self.root, tag_for(step))
        engine.save_checkpoint(str(self.root), tag=ref.tag, client_state=client_state, save_latest=False)
        if ema_state is not None:
            torch.save(ema_state, ref.path / f"ema_rank{dist.rank():05d}.pt")
        # DeepSpeed's save ends in a barrier; this one also covers the EMA files.
        dist.barrier()
        if dist.is_rank0():
            save_config(config, ref.path / CONFIG_FILE)
            meta = {"step": step, "world_size": topology.world_size, "ep_size": topology.ep_size,
                    "ema": ema_state is not None}
            _write_atomically(ref.path / META_FILE, json.dumps(meta, indent=1))
            _write_atomically(self.root / "latest", ref.tag)
            self._prune(keep=ref.tag)
        dist.barrier()
        return ref

    def tags(self) -> List[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name))

    def _prune(self, keep: str) -> None:
        others = [tag for tag in self.tags() if tag != keep]
        for tag in others[: max(0, len(others) - (self.keep_last - 1))]:
            shutil.rmtree(self.root / tag, ignore_errors=True)


def load_ema_states(ref: CheckpointRef) -> Dict[str, torch.Tensor]:
    """Every rank's EMA file merged: dense weights agree across ranks, experts are keyed by global id."""
    merged: Dict[str, torch.Tensor] = {}
    for path in sorted(ref.path.glob("ema_rank*.pt")):
        merged.update(torch.load(path, map_location="cpu", weights_only=True))
    return merged
