"""Convert between official M2Restore checkpoints and our state dicts.

The official network is a Lightning module attribute `net`, so its checkpoints hold
{"state_dict": {"net.<key>": tensor, ...}, ...}. Our names equal the official ones except:

    official                          ours
    mcdb{i}.fc.*                      dder{i}.prompt_proj.*
    mcdb{i}.model.el.{g}.*            dder{i}.deepspeed_moe.experts.deepspeed_experts.{g}.*
    mcdb{i}.model.{w_g,w_n,gate_boost,degra_proj.*}   dder{i}.router.*   (gate_boost: 0-dim <-> (1,))
    mcdb{i}.model.{mean,std}          dropped: constant N(0, 1) buffers of the official router
    fre{i}.*                          aflb{i}.*
    latent.*                          bottleneck.*
    daclip.*                          dropped: the frozen CLIP prior loads from its own file

Experts: official expert g is global expert g. Our state dicts name experts by global id when
ep_size == 1 (and in files merged by `m2r.engine.experts`); a rank of an ep_size > 1 model holds
global experts [ep_rank * n_local, (ep_rank + 1) * n_local) as local ids 0..n_local-1, and
`official_to_m2r(..., ep_size, ep_rank)` keeps and renumbers exactly those.
"""
import pickle
import re
import zipfile
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from m2r.models.weights_io import load_weights_file, unwrap_state_dict

EXPERT_PATH = "deepspeed_moe.experts.deepspeed_experts"
DROPPED_PREFIXES = ("daclip.",)
ROUTER_BUFFERS = {"mean": 0.0, "std": 1.0}

# (official prefix, our prefix), most specific first; {level} and {expert} stand for integers.
_RENAMES: List[Tuple[str, str]] = [
    ("mcdb{level}.fc.", "dder{level}.prompt_proj."),
    ("mcdb{level}.model.el.{expert}.", "dder{level}.%s.{expert}." % EXPERT_PATH),
    ("mcdb{level}.model.", "dder{level}.router."),
    ("fre{level}.", "aflb{level}."),
    ("latent.", "bottleneck."),
]
# The official router's beta is 0-dim; ours is shape (1,) (DeepSpeed cannot broadcast 0-dim params).
_GATE_BOOST = re.compile(r"dder\d+\.router\.gate_boost")
_ROUTER_BUFFER = re.compile(r"mcdb(\d+)\.model\.(mean|std)")
_OUR_EXPERT = re.compile(rf"(dder\d+\.{re.escape(EXPERT_PATH)}\.)(\d+)(\..+)")


def _prefix_regex(template: str) -> "re.Pattern":
    pattern = re.escape(template).replace(r"\{level\}", r"(?P<level>\d+)")
    return re.compile(pattern.replace(r"\{expert\}", r"(?P<expert>\d+)"))


def _rename(key: str, official_to_ours: bool) -> str:
    """Apply the first rename whose source prefix matches `key`; other keys are unchanged."""
    for official, ours in _RENAMES:
        source, target = (official, ours) if official_to_ours else (ours, official)
        match = _prefix_regex(source).match(key)
        if match:
            return target.format(**match.groupdict()) + key[match.end():]
    return key


def _is_dropped(official_key: str) -> bool:
    return official_key.startswith(DROPPED_PREFIXES) or _ROUTER_BUFFER.fullmatch(official_key) is not None


class CheckpointMismatch(ValueError):
    """A checkpoint does not fit the model; the message lists the offending keys."""


def unwrap_official_state_dict(checkpoint: Dict) -> Dict[str, torch.Tensor]:
    """The network's state dict from a Lightning checkpoint, a {"state_dict": ...} or a bare dict,
    with Lightning's `net.` prefix removed."""
    return unwrap_state_dict(checkpoint, "net.")


def official_to_m2r(checkpoint: Dict, ep_size: int = 1, ep_rank: int = 0) -> Dict[str, torch.Tensor]:
    """Official state dict (or Lightning checkpoint) -> our key layout for expert-parallel rank
    `ep_rank` of `ep_size`. DA-CLIP keys and the constant router buffers are dropped."""
    converted = {}
    for key, value in unwrap_official_state_dict(checkpoint).items():
        if _is_dropped(key):
            continue
        ours = _rename(key, official_to_ours=True)
        converted[ours] = value.reshape(1) if _GATE_BOOST.fullmatch(ours) else value
    return _keep_local_experts(converted, ep_size, ep_rank) if ep_size > 1 else converted


def dropped_official_keys(checkpoint: Dict) -> List[str]:
    """The official keys `official_to_m2r` drops (DA-CLIP and the router's constant buffers)."""
    return [key for key in unwrap_official_state_dict(checkpoint) if _is_dropped(key)]


def _keep_local_experts(state: Dict, ep_size: int, ep_rank: int) -> Dict[str, torch.Tensor]:
    expert_ids = {int(m.group(2)) for m in map(_OUR_EXPERT.fullmatch, state) if m}
    num_experts = max(expert_ids) + 1
    if num_experts % ep_size:
        raise CheckpointMismatch(f"{num_experts} experts per DDER cannot be split over ep_size={ep_size}")
    num_local = num_experts // ep_size
    first = ep_rank * num_local
    kept = {}
    for key, value in state.items():
        match = _OUR_EXPERT.fullmatch(key)
        if match is None:
            kept[key] = value
        elif first <= int(match.group(2)) < first + num_local:
            kept[f"{match.group(1)}{int(match.group(2)) - first}{match.group(3)}"] = value
    return kept


def m2r_to_official(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Our state dict, experts named by global id, -> the official key layout (without DA-CLIP and
    without the `net.` prefix); the official router's constant buffers are restored."""
    converted = {_rename(key, official_to_ours=False): value.reshape(()) if _GATE_BOOST.fullmatch(key)
                 else value for key, value in state_dict.items()}
    mcdb_prefixes = sorted({key.split(".", 1)[0] for key in converted if re.match(r"mcdb\d+\.", key)})
    for mcdb in mcdb_prefixes:
        for name, value in ROUTER_BUFFERS.items():
            converted[f"{mcdb}.model.{name}"] = torch.tensor([value])
    return converted


def read_checkpoint(path, weights_only: bool = True) -> Dict:
    """A checkpoint file: .safetensors, or a torch pickle (weights_only unless told otherwise).

    A file that does not load raises CheckpointMismatch naming it: torch, pickle and safetensors
    report damaged or foreign bytes with messages that do not (`KeyError: 101` for a text file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return load_weights_file(path, weights_only)
    except pickle.UnpicklingError as exc:
        # A torch.save archive that the weights-only unpickler refuses holds other objects; any
        # other file it refuses is not a torch checkpoint at all.
        if weights_only and zipfile.is_zipfile(path):
            raise CheckpointMismatch(f"{path} holds more than tensors and containers ({exc}); if you "
                                     "trust the file, load it with weights_only=False") from None
        raise _unreadable(path, exc) from exc
    except Exception as exc:  # what each format raises for foreign or damaged bytes varies widely
        raise _unreadable(path, exc) from exc


def _unreadable(path: Path, exc: Exception) -> CheckpointMismatch:
    return CheckpointMismatch(f"{path} is not a readable checkpoint (a .safetensors file or a torch.save "
                              f"file): {type(exc).__name__}: {exc}")


def load_official_checkpoint(model: torch.nn.Module, path, weights_only: bool = True) -> List[str]:
    """Load an official checkpoint into `model` (an M2Restore) strictly; returns the dropped keys.

    Experts are taken for the model's expert-parallel rank. Any missing, unexpected or misshapen
    key raises CheckpointMismatch listing them.
    """
    checkpoint = read_checkpoint(path, weights_only)
    ep_size, ep_rank = model.dder1.ep_size, model.dder1.ep_rank
    converted = official_to_m2r(checkpoint, ep_size, ep_rank)
    check_fits(model, converted, source=str(path))
    model.load_state_dict(converted, strict=True)
    return dropped_official_keys(checkpoint)


SHOWN_KEYS = 6   # of each kind of mismatch: a network of another size differs in hundreds


def check_fits(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointMismatch naming the missing, unexpected and wrongly shaped keys (the first few of each,
    and how many)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshapen = sorted(f"{key}: {tuple(state_dict[key].shape)} vs model {tuple(expected[key].shape)}"
                       for key in set(expected) & set(state_dict)
                       if state_dict[key].shape != expected[key].shape)
    if missing or unexpected or misshapen:
        parts = [f"{label} ({len(keys)}): {', '.join(keys[:SHOWN_KEYS])}"
                 + (f", and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else "")
                 for label, keys in (("missing", missing), ("unexpected", unexpected),
                                     ("wrong shape", misshapen)) if keys]
        raise CheckpointMismatch(f"{source} does not fit the model; " + "; ".join(parts))
