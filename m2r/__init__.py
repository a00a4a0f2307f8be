"""m2r: distributed training of M2Restore (all-in-one image restoration) on DeepSpeed.

Modules: `m2r.config` (typed configs), `m2r.models` (network, CLIP prior, MoE, scan),
`m2r.data` (degradations, streams), `m2r.shards` (building shards), `m2r.engine` (DeepSpeed training
and finetuning loops, checkpoints), `m2r.eval` (metrics, test-set layouts, tiled inference),
`m2r.dist` (ranks and process groups), `m2r.cli` (what the entry points share). Tools:
`m2r.export` (merge sharded checkpoints), `m2r.evaluate` (benchmark scores), `m2r.restore` (restore files).
"""
__version__ = "0.1.0"
