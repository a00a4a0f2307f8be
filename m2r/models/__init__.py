"""The M2Restore network and its parts.

Entry points: `m2r.models.m2restore.build_model(cfg)` (the network), `m2r.models.convert`
(official checkpoints), `python -m m2r.models.summary` (parameter counts). Nothing is imported
here, so that reading `m2r.models.config` does not pull in DeepSpeed and open_clip.
"""
