"""Typed schema of the `data` config section (OmegaConf structured dataclass)."""
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from m2r.config import choice, require

SOURCES = ("builtin", "shards")
PRESET_NAMES = ("cdd11", "allweather", "five-task")   # the keys of m2r.data.presets.PRESETS (checked at its import)


@dataclass
class DataConfig:
    source: str = choice(*SOURCES)   # "builtin" (scikit-image sample photos, no files) | "shards"
    shards: Optional[str] = None     # shard directory (with manifest.json) or brace pattern of .tar files
    val_shards: Optional[str] = None  # held-out shards; None = the builtin held-out photos
    preset: str = choice(*PRESET_NAMES)  # degradation types and their mixture: m2r/data/presets.py
    weights: Dict[str, float] = field(default_factory=dict)  # mixture weight per type; empty = uniform
    workers: int = 2                 # DataLoader worker processes per rank (0 = in the main process)
    shuffle_buffer: int = 512        # undecoded samples shuffled together per round
    scale_range: List[float] = field(default_factory=lambda: [1.0, 1.0])  # random zoom-out before crop
    val_samples_per_type: int = 2    # validation crops per degradation type
    val_batch_size: int = 4
    seed_offset: int = 0             # added to the run seed, to draw a different data stream


def check_data_settings(data) -> None:
    """The pretraining `data` keys beyond their types, checked before any rank starts work (and again
    by the stream, for callers that build one directly)."""
    from m2r.data.presets import mixture_probabilities   # numpy: the schema itself stays light to import

    require(data.source in SOURCES, "data.source", data.source, f"must be one of {list(SOURCES)}")
    require(data.source != "shards" or bool(data.shards), "data.shards", data.shards,
            "must name a shard directory or pattern when data.source=shards")
    require(data.shuffle_buffer >= 1, "data.shuffle_buffer", data.shuffle_buffer,
            "must be at least 1 (samples shuffled per round)")
    scale = list(data.scale_range)
    require(len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1, "data.scale_range", scale,
            "must be [low, high] with 0 < low <= high <= 1")
    require(data.val_samples_per_type > 0, "data.val_samples_per_type", data.val_samples_per_type, "must be positive")
    mixture_probabilities(data.preset, dict(data.weights))   # the preset exists, the weights name its types
