"""m2r: distributed training of M2Restore (all-in-one image restoration) on DeepSpeed.

Modules: `m2r.config` (typed configs), `m2r.models` (network, CLIP prior, MoE, scan),
`m2r.data` (degradations, shards, streams), `m2r.engine` (DeepSpeed training loop, checkpoints),
`m2r.dist` (ranks and process groups), `m2r.export` (merge sharded checkpoints).
"""
__version__ = "0.1.0"
