"""Data: synthetic degradations, shard format and the deterministic training stream.

The stream is imported on first use, so reading the `data:` config schema (`m2r.data.config`)
does not pull in PIL, scipy or scikit-image.
"""
from m2r.data.config import DataConfig

__all__ = ["DataConfig", "TrainStream", "build_train_stream", "build_val_set"]


def __getattr__(name):
    if name in ("TrainStream", "build_train_stream", "build_val_set"):
        from m2r.data import stream
        return getattr(stream, name)
    raise AttributeError(f"module 'm2r.data' has no attribute {name!r}")
