"""Typed schema of the `data` config section (OmegaConf structured dataclass)."""
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from m2r.config import choice


@dataclass
class DataConfig:
    source: str = choice("builtin", "shards")  # "builtin" (scikit-image sample photos, no files) | "shards"
    shards: Optional[str] = None     # shard directory (with manifest.json) or brace pattern of .tar files
    val_shards: Optional[str] = None  # held-out shards; None = the builtin held-out photos
    preset: str = choice("cdd11", "allweather", "five-task")  # "cdd11" | "allweather" | "five-task"
    weights: Dict[str, float] = field(default_factory=dict)  # mixture weight per type; empty = uniform
    workers: int = 2                 # DataLoader worker processes per rank (0 = in the main process)
    shuffle_buffer: int = 512        # undecoded samples shuffled together per round
    scale_range: List[float] = field(default_factory=lambda: [1.0, 1.0])  # random zoom-out before crop
    val_samples_per_type: int = 2    # validation crops per degradation type
    val_batch_size: int = 4
    seed_offset: int = 0             # added to the run seed, to draw a different data stream
