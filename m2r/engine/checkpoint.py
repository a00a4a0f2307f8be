"""Sharded DeepSpeed checkpoints: `step{N:08d}` tags, an atomic `latest`, keep-last-k, exact resume.

A tag directory holds DeepSpeed's files (dense `mp_rank_00_model_states.pt` with our client_state,
`layer_<L>_expert_<E>_...` per global expert, the optimizer state: ZeRO's shards, or at ZeRO 0 one
`expp_rank_<R>_...` per expert-parallel rank), our `meta.json` (step and topology, readable without torch)
and, with EMA on, `ema_rank<R>.pt` files keyed by global expert id
(rank 0's holds the dense weights, each expert shard's first replica its experts). Every rank writes
into `<tag>.partial`; once all have finished and every node has flushed its files to disk, rank 0
adds meta.json, renames the directory to `<tag>` and only then points `latest` at it and deletes old
tags. A tag is complete exactly when it holds meta.json; a crash at any moment leaves the last
complete tag intact.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from omegaconf import OmegaConf

from m2r import dist
from m2r.atomic import (fsync_directory, fsync_tree, storage_failures_named, write_json_atomically,
                        write_text_atomically)
from m2r.config import config_error, save_config

TAG_PATTERN = re.compile(r"^step(\d{8})$")
PARTIAL_SUFFIX = ".partial"     # a tag being written
REPLACED_SUFFIX = ".replaced"   # a tag being replaced by a new save of the same step
DENSE_FILE = "mp_rank_00_model_states.pt"
EXPERT_FILE = re.compile(rf"^layer_(\d+)_expert_(\d+)_{re.escape(DENSE_FILE)}$")   # DeepSpeed's, one per expert
META_FILE = "meta.json"
LATEST_FILE = "latest"        # names the tag a resume takes
CONFIG_FILE = "config.yaml"
RUN_CHECKPOINTS_DIR = "checkpoints"   # a run's checkpoint directory, under run.dir beside metrics.jsonl
PRETRAIN_KIND, FINETUNE_KIND = "pretrain", "finetune"   # which run saved a checkpoint (meta.json's kind)
ABANDONED_DIR = "abandoned"   # newer checkpoints set aside when a run resumes an older one
DEEPSPEED_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")   # copied beside the tags by every ZeRO save


def tag_for(step: int) -> str:
    return f"step{step:08d}"


@dataclass(frozen=True)
class Topology:
    """What a checkpoint's optimizer state is laid out for: DeepSpeed loads it only into a run with the
    same four (ZeRO partitions follow the ranks and expert groups, precision decides its files); into
    another, m2r/engine/zero_state.py re-partitions it."""
    world_size: int
    ep_size: int
    precision: str
    zero_stage: int

    @classmethod
    def of_run(cls, world_size: int, cfg) -> "Topology":
        return cls(world_size, cfg.model.moe.ep_size, cfg.train.precision, cfg.train.zero_stage)

    def describe(self) -> str:
        return f"world size {self.world_size}, ep_size {self.ep_size}, {self.precision}, ZeRO {self.zero_stage}"


@dataclass(frozen=True)
class CheckpointRef:
    root: Path  # the directory holding tags and `latest`
    tag: str

    @property
    def path(self) -> Path:
        return self.root / self.tag

    def meta(self) -> Dict[str, Any]:
        meta_path = self.path / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} is missing: {self.path} is not a complete m2r checkpoint")
        return json.loads(meta_path.read_text())

    def step_tag(self) -> str:
        """The tag of the step this checkpoint saved, to order it among a run's tags: its own name may be any (a
        tag directory given as run.resume)."""
        return tag_for(self.meta()["step"])

    def saved_config(self) -> Dict[str, Any]:
        """The resolved run config saved beside this tag."""
        return OmegaConf.to_container(OmegaConf.load(self.path / CONFIG_FILE))

    def saved_model_config(self) -> Dict[str, Any]:
        return self.saved_config()["model"]

    def topology(self) -> Topology:
        meta = self.meta()
        if "precision" in meta:
            return Topology(meta["world_size"], meta["ep_size"], meta["precision"], meta["zero_stage"])
        train = self.saved_config()["train"]   # saved before meta.json recorded them (2026-11-27)
        return Topology(meta["world_size"], meta["ep_size"], train["precision"], train["zero_stage"])


def checkpoint_kind(meta: Dict[str, Any], saved_config: Dict[str, Any]) -> str:
    """Which run saved a checkpoint, from its meta.json and config.yaml: PRETRAIN_KIND or FINETUNE_KIND.
    meta.json names it since 2026-11-27; before, only a finetune config had `init`."""
    return meta.get("kind") or (FINETUNE_KIND if "init" in saved_config else PRETRAIN_KIND)


def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / META_FILE).is_file()


def tags_in(root: Path) -> List[str]:
    """The `step<N>` directories under root, oldest first (complete or not)."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name))


def complete_tags(root: Path) -> List[str]:
    return [tag for tag in tags_in(root) if is_complete(root / tag)]


def newest_checkpoint(root: Path) -> Optional[CheckpointRef]:
    """The tag `latest` names, when it is the newest complete tag; else the newest complete tag, with a
    warning (`latest` lost, a crash while replacing a tag, or one between publishing a tag and pointing
    `latest` at it: a resume from an older run's checkpoint sets the newer tags aside, so a complete tag
    newer than `latest` is always one a save published); None if there is none."""
    pointer = root / LATEST_FILE
    named = pointer.read_text().strip() if pointer.is_file() else ""
    complete = complete_tags(root)
    if named and complete and complete[-1] == named:
        return CheckpointRef(root, named)
    if named in complete:
        dist.print0(f"WARNING: {pointer} names {named!r}, but {complete[-1]} is newer and complete (a save "
                    f"stopped before updating {pointer.name}); resuming from {complete[-1]} (to resume an older "
                    "checkpoint, pass its directory as run.resume)")
        return CheckpointRef(root, complete[-1])
    if not complete:
        if named:   # a run that had saved: starting it from scratch is not for us to decide
            raise FileNotFoundError(f"{pointer} names {named!r}, but {root} holds no complete checkpoint "
                                    f"(a step<N> directory with {META_FILE}); to start afresh, choose a new "
                                    f"run.dir or remove {root}")
        return None
    problem = f"names {named!r}, which is not a complete checkpoint" if named else "is missing or empty"
    dist.print0(f"WARNING: {pointer} {problem}; resuming from the newest complete checkpoint, {complete[-1]}")
    return CheckpointRef(root, complete[-1])


def resolve_resume(resume: str, run_checkpoints: Path) -> Optional[CheckpointRef]:
    """`latest` -> the run's newest checkpoint (None if there is none); `none` -> None, refused where
    the run already has checkpoints; a path -> that checkpoint directory (its newest checkpoint) or
    that tag directory."""
    if resume == "none":
        if tags_in(run_checkpoints):
            raise config_error("run.resume", f"'none' starts a new run, but {run_checkpoints} "
                               f"holds this run's checkpoints ({tags_in(run_checkpoints)[-1]} the newest), which "
                               "the new one would mix with: choose a new run.dir, or remove them")
        return None
    if resume == "latest":
        return newest_checkpoint(run_checkpoints)
    if not Path(resume).exists():   # e.g. `run.resume=no`, which YAML reads as the word 'False'
        raise FileNotFoundError(f"run.resume={resume!r}: no such file or directory; run.resume takes 'latest', "
                                "'none' or the path of a checkpoint directory or tag directory")
    return checkpoint_at(resume, "run.resume")


def checkpoint_at(location: str, option: str) -> CheckpointRef:
    """The checkpoint a path names: a checkpoint directory (its newest complete tag) or one tag
    directory; errors call the path `option`."""
    path = Path(location)
    if (path / LATEST_FILE).is_file() or tags_in(path):
        ref = newest_checkpoint(path)
        if ref is None:
            raise FileNotFoundError(f"{option}={location!r}: no complete checkpoint (a step<N> directory "
                                    f"holding {META_FILE}) in {path}")
        return ref
    if (path / DENSE_FILE).is_file():
        return CheckpointRef(path.parent, path.name)
    raise FileNotFoundError(f"{option}={location!r}: neither a checkpoint directory with a 'latest' file "
                            f"nor a tag directory holding {DENSE_FILE}")


def agreed_resume(resume: str, run_checkpoints: Path) -> Optional[CheckpointRef]:
    """`resolve_resume` as rank 0 sees it, on every rank (a shared filesystem may lag on the others),
    its error too."""
    return dist.on_rank0(lambda: resolve_resume(resume, run_checkpoints))


def set_aside_newer_tags(ref: CheckpointRef, run_checkpoints: Path) -> List[str]:
    """A run resumed from a checkpoint older than its own newest (one of its own, or another run's) abandons its
    newer ones: they move to `<checkpoints>/abandoned/` (kept for the user, out of pruning's and the `latest`
    fallback's sight, which would otherwise take the newest tag of the abandoned branch). Another run's directory
    is left as it is. Returns the tags moved, newer than the step `ref` saved."""
    return set_aside_tags_after(Path(run_checkpoints), ref.step_tag())


def complete_tags_before(ref: CheckpointRef) -> List[str]:
    """The complete tags beside `ref` saved at an earlier step than `ref`, oldest first."""
    return [tag for tag in complete_tags(ref.root) if tag < ref.step_tag()]


def set_aside_tags_after(root: Path, tag: str) -> List[str]:
    """The tags of `root` newer than `tag` moved to `<root>/abandoned/`; returns the tags moved."""
    newer = [newer_tag for newer_tag in tags_in(root) if newer_tag > tag]
    abandoned = root / ABANDONED_DIR
    for newer_tag in newer:
        abandoned.mkdir(exist_ok=True)
        target = abandoned / newer_tag
        while target.exists():   # abandoned twice
            target = target.with_name(target.name + "+")
        os.replace(root / newer_tag, target)
    if newer:
        fsync_directory(root)
        fsync_directory(abandoned)   # the moved tags' entries too: kept for the user
    return newer


def expert_file(layer: int, expert: int) -> str:
    """DeepSpeed's file of one expert (global id) of the MoE layer numbered `layer` in module order (`EXPERT_FILE`)."""
    return f"layer_{layer}_expert_{expert}_{DENSE_FILE}"


def missing_experts_problem(ref: CheckpointRef, missing: List[str]) -> str:
    """The problem of a checkpoint missing the files of the experts named in `missing` ("layer L expert E")."""
    return (f"{ref.path} lacks the files of {len(missing)} experts ({', '.join(missing[:4])}): "
            "the checkpoint is incomplete")


def own_files_lacking(engine, ref: CheckpointRef, exact: bool) -> Optional[str]:
    """Which of the files a rank alone reads from `ref` it lacks, and on which rank, the same on every rank (None:
    none): its experts' and, at an `exact` load (DeepSpeed's own, optimizer included), its part of the optimizer
    state. DeepSpeed's FileNotFoundError would stop that rank alone, the others going on into their next
    collective. Call it on every rank before loading `ref`."""
    from m2r.models.moe import DDER

    layers = [layer for layer in engine.module.modules() if isinstance(layer, DDER)]   # DeepSpeed numbers them so
    missing = [f"layer {index} expert {layer.first_global_expert_id + local}"
               for index, layer in enumerate(layers) for local in range(layer.num_local_experts)
               if not (ref.path / expert_file(index, layer.first_global_expert_id + local)).is_file()]
    problem = missing_experts_problem(ref, missing) if missing else None
    optimizer_file = own_optimizer_file(engine, ref, layers) if exact else None
    if problem is None and optimizer_file is not None and not optimizer_file.is_file():
        problem = (f"{ref.path} lacks {optimizer_file.name}, this rank's part of the optimizer state: the "
                   "checkpoint is incomplete")
    return dist.problem_of_any_rank(problem)


def own_optimizer_file(engine, ref: CheckpointRef, layers: List[torch.nn.Module]) -> Optional[Path]:
    """The optimizer file DeepSpeed's exact load of `ref` reads on this rank alone, named by DeepSpeed: under ZeRO
    its partition's, else, with MoE `layers`, its expert-parallel rank's (None: the optimizer is in the dense
    file every rank reads)."""
    if engine.zero_optimization():
        return Path(engine._get_zero_ckpt_name(str(ref.root), ref.tag))
    if layers and engine.optimizer is not None:
        return Path(engine._get_optimizer_ckpt_name(str(ref.root), ref.tag, layers[0].ep_rank))
    return None


def load_weights_only(engine, ref: CheckpointRef) -> Dict[str, Any]:
    """Model weights (experts by global id, any topology) without optimizer or scheduler; returns the client state."""
    _, client = engine.load_checkpoint(str(ref.root), tag=ref.tag, load_module_only=True,
                                       load_optimizer_states=False, load_lr_scheduler_states=False)
    return client


class CheckpointManager:
    """Save and prune under `root`; every rank calls `save` (DeepSpeed's save is collective)."""

    def __init__(self, root: Path, keep_last: int, kind: Optional[str] = None):
        if keep_last < 2:
            raise ValueError(f"keep_last={keep_last}: keep at least 2 checkpoints")
        self.root = Path(root)
        self.keep_last = keep_last
        self.kind = kind   # "pretrain" | "finetune", recorded in meta.json: which runs may resume it

    def save(self, engine, step: int, topology: Topology, client_state: Dict[str, Any], config,
             ema_state: Optional[Dict[str, torch.Tensor]] = None,
             before_publish: Optional[Callable[[Path, Dict[str, Any]], None]] = None) -> CheckpointRef:
        """Every rank calls it. The tag becomes `latest` only once complete on every rank; the
        resolved `config` is written beside it as config.yaml. `before_publish(staged tag dir, meta)` runs
        on rank 0 once every file of the tag but meta.json is on disk (finetuning keeps its best copies
        there, `keep_copy(staged, step, meta)`): the tag is not complete yet, so a crash during it leaves
        the previous tag the latest, also for `remove_leftovers`, which publishes a complete `.partial`."""
        ref = CheckpointRef(self.root, tag_for(step))
        staging = CheckpointRef(self.root, ref.tag + PARTIAL_SUFFIX)
        # one broadcast, where a barrier would do, so that what fails here on rank 0 is raised on every rank
        dist.on_rank0(self.remove_leftovers)
        with storage_failures_named([staging.path], who=f"rank {dist.rank()}: ", judge_by_space_left=True):
            engine.save_checkpoint(str(self.root), tag=staging.tag, client_state=client_state, save_latest=False)
            if ema_state:   # the ranks holding a part of the EMA (see TrainingRun._ema_state)
                torch.save(ema_state, staging.path / f"ema_rank{dist.rank():05d}.pt")
        dist.barrier()   # every rank's files are written (DeepSpeed's save ends in one too, not the EMA's)
        if dist.is_local_rank0():   # this node's writes are on disk before the tag can count as complete
            fsync_tree(staging.path)
        dist.barrier()
        meta = {"step": step, "world_size": topology.world_size, "ep_size": topology.ep_size,
                "precision": topology.precision, "zero_stage": topology.zero_stage, "ema": ema_state is not None,
                **({"kind": self.kind} if self.kind else {})}
        dist.on_rank0(lambda: self._complete(staging.path, ref, meta, config, before_publish))
        return ref

    def keep_copy(self, tag_dir: Path, step: int, meta: Dict[str, Any]) -> CheckpointRef:
        """Rank 0: the checkpoint staged in `tag_dir` by another root's `save` (its `before_publish`: every
        file but meta.json written) kept here as the tag of `step`, then pruned to keep_last. Its files are
        hard links (copies on a filesystem without them): the same bytes, written once; `meta` is written
        here, last, as the copy's own meta.json."""
        ref = CheckpointRef(self.root, tag_for(step))
        staged = self.root / (ref.tag + PARTIAL_SUFFIX)
        self.remove_leftovers()
        shutil.copytree(tag_dir, staged, copy_function=link_or_copy, ignore=shutil.ignore_patterns(META_FILE))
        # Every file on disk before meta.json makes the tag complete: the linked ones are (`save` flushed them
        # before calling `before_publish`), copies flush themselves, the entries need their folder (tags are flat).
        fsync_directory(staged)
        write_json_atomically(staged / META_FILE, meta)
        self._publish(staged, ref)
        self._prune(keep=ref.tag)
        return ref

    def point_latest_at(self, ref: CheckpointRef) -> None:
        """Rank 0: `latest` names the tag a run resumes from its own checkpoints (it lagged behind a newer
        complete tag, or named one set aside), so that the next start does not warn again."""
        pointer = self.root / LATEST_FILE
        if Path(ref.root).resolve() == self.root.resolve() and \
                (not pointer.is_file() or pointer.read_text().strip() != ref.tag):
            write_text_atomically(pointer, ref.tag)

    def remove_leftovers(self) -> None:
        """Rank 0 (which holds the run.dir lock, so no other run writes here): what failed or interrupted
        saves left, perhaps at another world size: `<tag>.partial` and `<tag>.replaced` directories (on a
        full disk, each failed save would otherwise add one), `latest.tmp`, and DeepSpeed's scripts. A
        `.partial` holding meta.json is complete (a crash just before its rename): it is published instead
        when its tag is missing."""
        for staged in self.root.glob(f"step*{PARTIAL_SUFFIX}"):
            tag = staged.with_name(staged.name[:-len(PARTIAL_SUFFIX)])
            if is_complete(staged) and not tag.exists():
                os.replace(staged, tag)
                fsync_directory(self.root)
            else:
                shutil.rmtree(staged, ignore_errors=True)
        for path in self.root.glob(f"step*{REPLACED_SUFFIX}"):
            shutil.rmtree(path, ignore_errors=True)
        # DeepSpeed's scripts cannot read MoE checkpoints; m2r.export can
        for name in (f"{LATEST_FILE}.tmp", *DEEPSPEED_SCRIPTS):
            (self.root / name).unlink(missing_ok=True)

    def _complete(self, staged: Path, ref: CheckpointRef, meta: Dict[str, Any], config,
                  before_publish: Optional[Callable[[Path, Dict[str, Any]], None]]) -> None:
        """Rank 0, once every rank's files are on disk: config, `before_publish`, meta.json, publish, prune."""
        for script in DEEPSPEED_SCRIPTS:   # copied beside the tags by this save
            (self.root / script).unlink(missing_ok=True)
        save_config(config, staged / CONFIG_FILE)
        if before_publish is not None:   # before meta.json: a crash in it must leave an incomplete .partial
            before_publish(staged, meta)
        write_json_atomically(staged / META_FILE, meta)
        self._publish(staged, ref)
        self._prune(keep=ref.tag)

    def _publish(self, staged: Path, ref: CheckpointRef) -> None:
        """Rename the finished tag into place, then point `latest` at it. A step saved again (a
        finetune resumed at the end of an epoch saves that step once more) replaces the old tag only
        now; should a crash fall between the two renames, `latest` names a missing tag and resume
        takes the newest complete one (keep_last >= 2 keeps one)."""
        replaced = ref.path.with_name(ref.tag + REPLACED_SUFFIX)
        if ref.path.exists():
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(ref.path, replaced)
        os.replace(staged, ref.path)
        fsync_directory(self.root)
        write_text_atomically(self.root / LATEST_FILE, ref.tag)
        shutil.rmtree(replaced, ignore_errors=True)

    def tags(self) -> List[str]:
        return tags_in(self.root)

    def _prune(self, keep: str) -> None:
        """Keep the newest `keep_last` complete tags; delete older ones and incomplete step directories
        (what crashed saves left in staging went when this save started: `remove_leftovers`)."""
        tags = self.tags()
        complete = {tag for tag in tags if is_complete(self.root / tag)}
        older = [tag for tag in tags if tag != keep and tag in complete]
        doomed = [self.root / tag for tag in older[: max(0, len(older) - (self.keep_last - 1))]]
        doomed += [self.root / tag for tag in tags if tag not in complete]
        for path in doomed:
            remove_tag(path)


def remove_tag(path: Path) -> None:
    """Delete a tag directory, meta.json first: rmtree takes the files in directory order, and a kill part way
    must not leave a tag that counts as complete while its weights are gone (a resume or export would take it)."""
    try:   # best effort, as pruning always was: a failure here must not stop the training
        if (path / META_FILE).is_file():
            (path / META_FILE).unlink()
            fsync_directory(path)
    except OSError:
        pass
    shutil.rmtree(path, ignore_errors=True)


def link_or_copy(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """A hard link of `source` at `target`; a copy, flushed to disk, where the filesystem has none (or they
    would cross filesystems). Checkpoint files are never changed in place, so a link is as good as a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
        with open(target, "rb") as handle:
            os.fsync(handle.fileno())


def load_ema_states(ref: CheckpointRef) -> Dict[str, torch.Tensor]:
    """The EMA files merged: dense weights from rank 0's, experts (keyed by global id) from the ranks
    of one expert-parallel group (older checkpoints, a full copy per rank, merge the same way)."""
    merged: Dict[str, torch.Tensor] = {}
    for path in sorted(ref.path.glob("ema_rank*.pt")):
        merged.update(torch.load(path, map_location="cpu", weights_only=True))
    return merged
