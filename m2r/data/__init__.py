"""Data: synthetic degradations, shard format and the deterministic training stream."""
from m2r.data.config import DataConfig
from m2r.data.stream import TrainStream, build_train_stream, build_val_set

__all__ = ["DataConfig", "TrainStream", "build_train_stream", "build_val_set"]
