"""ZeRO 1/2 optimizer state per parameter: read from a checkpoint's shards, and loaded into a live engine
laid out for another topology.

DeepSpeed's ZeRO files hold, per rank and parameter group, one flat partition of the fp32 master weights
and the AdamW moments, with `param_slice_mappings` naming which parameter fragment sits where. Joining
each parameter's fragments in rank order (within its data-parallel group) gives topology-free state
keyed by parameter name, experts by global id. From that state a run with another world size, ep_size,
ZeRO stage (1 or 2) or precision continues with its optimizer instead of restarting AdamW (whose first
steps, with empty second moments, move the weights far): each rank cuts its new fragments out of it.
Stage 0 keeps torch's optimizer files, keyed by position rather than by name: only its weights carry over.
"""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, NamedTuple, Optional, Set, Tuple

import torch

from m2r import dist
from m2r.engine.checkpoint import CheckpointRef, Topology
from m2r.engine.experts import global_expert_names, with_global_expert_id
from m2r.models.convert import read_checkpoint
from m2r.models.moe import expert_parallel_rank

ZERO_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
MASTER = "fp32"                        # the fp32 master weights' key beside the optimizer's own
MOMENTS = ("exp_avg", "exp_avg_sq")    # torch AdamW's per-element state
# DeepSpeed's dynamic fp16 loss scaler: where it stands (its settings, e.g. the window, stay the run's own)
LOSS_SCALE_PROGRESS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")
ParameterState = Dict[str, torch.Tensor]   # MASTER and, once the optimizer has stepped, MOMENTS and "step"


def why_not_carried(saved: Topology, current: Topology) -> Optional[str]:
    """Why the optimizer state of a checkpoint saved at `saved` cannot follow into `current`; None if it can."""
    if 0 in (saved.zero_stage, current.zero_stage):
        return "ZeRO stage 0 keeps torch's optimizer files, which this loader cannot re-partition"
    return None


def zero_shard_files(path: Path) -> List[Tuple[int, Path]]:
    """(rank, file) of every ZeRO 1/2 optimizer shard in a checkpoint tag, in rank order."""
    return sorted((int(m.group(1)), p) for p in path.iterdir() if (m := ZERO_FILE.match(p.name)))


def _shard_state(path: Path) -> dict:
    # DeepSpeed pickles its config objects beside the tensors: weights_only=True cannot read them.
    shard = read_checkpoint(path, weights_only=False)["optimizer_state_dict"]
    if "param_slice_mappings" not in shard:
        raise ValueError(f"{path}: no param_slice_mappings (not a ZeRO 1/2 shard m2r can read)")
    return shard


def _group_sources(shard: dict, group: int, keys: Iterable[str]) -> Dict[str, torch.Tensor]:
    """The flat tensors of one parameter group that `keys` name (moments and step only once stepped)."""
    sources = {MASTER: shard["single_partition_of_fp32_groups"][group]} if MASTER in keys else {}
    optimizer_state = shard.get("base_optimizer_state", {}).get("state", {}).get(group, {})
    sources.update({key: optimizer_state[key] for key in (*MOMENTS, "step") if key in keys and key in optimizer_state})
    return sources


def stitched_zero_state(ref: CheckpointRef, ep_size: int, num_experts: int, keys: Iterable[str] = (MASTER,),
                        wanted: Optional[Set[str]] = None) -> Dict[str, ParameterState]:
    """Per parameter (global name, flat, shape not restored): `keys` among MASTER, MOMENTS and "step",
    joined from every rank's fragments in rank order; only the names in `wanted` when given."""
    keys = tuple(keys)
    fragments: Dict[Tuple[str, str], List[Tuple[int, torch.Tensor]]] = defaultdict(list)
    steps: Dict[str, torch.Tensor] = {}
    for rank, path in zero_shard_files(ref.path):
        shard = _shard_state(path)
        first_expert = expert_parallel_rank(rank, ep_size) * (num_experts // ep_size)
        for group, mapping in enumerate(shard["param_slice_mappings"]):
            sources = _group_sources(shard, group, keys)
            for local_name, address in mapping.items():
                name = with_global_expert_id(local_name, first_expert)
                if wanted is not None and name not in wanted:
                    continue
                for key, flat in sources.items():
                    if key == "step":
                        steps[name] = flat
                    else:
                        # a copy: a view would keep the whole shard in memory until the end
                        fragments[name, key].append((rank, flat.narrow(0, address.start, address.numel).clone()))
    state: Dict[str, ParameterState] = defaultdict(dict)
    for (name, key), pieces in fragments.items():
        state[name][key] = torch.cat([piece for _, piece in sorted(pieces, key=lambda p: p[0])])
    for name, step in steps.items():
        state[name]["step"] = step
    return dict(state)


_FAILED = 2.0   # beside 0 and 1 (AdamW state saved or not) in the ranks' agreement


class Resharded(NamedTuple):
    """What `load_resharded_optimizer_state` brought beside the fp32 master weights."""
    adamw: bool         # AdamW's moments and step counts (none saved before the first step)
    loss_scale: bool    # the fp16 loss scale (between fp16 runs)


def load_resharded_optimizer_state(engine, ref: CheckpointRef) -> Resharded:
    """Give this rank's ZeRO optimizer the fp32 master weights, AdamW moments and step counts `ref` saved
    at another topology (and, between fp16 runs, the loss scale), and its module the masters cast to its
    dtype. Call after the weights are loaded (`load_weights_only`): the module then matches the masters
    exactly, as after an optimizer step.

    Collective: every rank learns whether any failed (a damaged shard read on one node) and raises,
    rather than waiting for it in the next collective until the timeout."""
    failure: Optional[Exception] = None
    try:
        stepped, loss_scale = _load_resharded(engine, ref)
    except Exception as error:   # whatever it is, the other ranks must hear of it
        stepped, loss_scale, failure = False, False, error
    outcome = dist.max_over_ranks(_FAILED if failure else float(stepped))
    if outcome == _FAILED:
        raise failure or RuntimeError("another rank could not re-partition the optimizer state (its error "
                                      "names the cause)")
    return Resharded(adamw=outcome > 0, loss_scale=loss_scale)   # the loss scale is the same on every rank


def _load_resharded(engine, ref: CheckpointRef) -> Tuple[bool, bool]:
    """This rank's part of `load_resharded_optimizer_state`: whether the saved optimizer had stepped here,
    and whether the loss scale was carried."""
    zero = engine.optimizer
    saved_moe = ref.saved_config()["model"]["moe"]
    local_to_global = global_expert_names(engine.module)
    param_names = {id(param): local_to_global[name] for name, param in engine.module.named_parameters()}
    state = stitched_zero_state(ref, ref.topology().ep_size, saved_moe["num_experts"], keys=(MASTER, *MOMENTS, "step"),
                                wanted=set(param_names.values()))
    missing = sorted(set(param_names.values()) - set(state))
    if missing:
        raise ValueError(f"{ref.path}: its ZeRO shards lack {len(missing)} parameters of this network, "
                         f"e.g. {missing[:3]}")
    with torch.no_grad():
        for name, param in engine.module.named_parameters():
            master = state[local_to_global[name]][MASTER]
            if master.numel() != param.numel():
                raise ValueError(f"{ref.path}: {local_to_global[name]} has {master.numel()} values, this network "
                                 f"{param.numel()}")
            param.copy_(master.view(param.shape))
        stepped = [_fill_partition(zero, group, flat, state, param_names)
                   for group, flat in enumerate(zero.single_partition_of_fp32_groups)]
    # a rank may hold no fragment of a stepped group: the caller agrees over ranks
    return any(stepped), carry_loss_scale(zero, ref)


def carry_loss_scale(zero, ref: CheckpointRef) -> bool:
    """Between fp16 runs: the saved dynamic loss scale and its counters into this rank's scaler, which
    would otherwise start again from 2^16 and skip steps on overflow until it finds its level. Every rank
    saves the same scaler: the first shard's is read (a second time). Returns whether it was carried."""
    live = getattr(zero, "loss_scaler", None)
    if not getattr(live, "dynamic", False) or ref.topology().precision != "fp16":
        return False
    saved = _shard_state(zero_shard_files(ref.path)[0][1]).get("loss_scaler")
    if not getattr(saved, "dynamic", False):
        return False
    for attribute in LOSS_SCALE_PROGRESS:
        setattr(live, attribute, getattr(saved, attribute))
    return True


def _fill_partition(zero, group: int, flat: torch.Tensor, state: Dict[str, ParameterState],
                    param_names: Dict[int, str]) -> bool:
    """One group's flat fp32 partition and, if the saved optimizer had stepped, its AdamW state;
    returns whether it had."""
    moments = {key: torch.zeros_like(flat) for key in MOMENTS}
    steps = set()
    for param in zero.bit16_groups[group]:
        mapping = param._hp_mapping
        if mapping is None:   # no fragment of this parameter in this rank's partition
            continue
        saved = state[param_names[id(param)]]
        source, target = mapping.lp_fragment_address, mapping.hp_fragment_address
        for key, buffer in ((MASTER, flat.data), *moments.items()):
            if key in saved:
                buffer.narrow(0, target.start, target.numel).copy_(saved[key].narrow(0, source.start, source.numel))
        steps.add(float(saved["step"]) if "step" in saved else None)
    if not steps or steps == {None}:
        return False   # saved before its first optimizer step: AdamW starts fresh, as it would have
    if len(steps) > 1:   # fragments at different counts, or some never stepped
        raise ValueError(f"parameter group {group}: the saved step counts disagree ({sorted(map(str, steps))})")
    zero.optimizer.state[flat] = {"step": torch.tensor(steps.pop(), dtype=torch.float32), **moments}
    return True
