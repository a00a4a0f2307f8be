"""Shard builder and inspector: `python -m m2r.shards build|inspect` (see shards/README.md)."""
