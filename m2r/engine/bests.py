"""Finetuning's best checkpoints: per metric of run.best_metrics, the best epoch's checkpoint kept under
`<run.dir>/best_<metric>/` (hard links to that epoch's files, the last two bests) and its weights exported
as `best_<metric>.safetensors` with `best_<metric>.yaml` and the record `best_<metric>.json`; and, when a
run resumes an older step, both made what that step recorded again."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from m2r.atomic import json_text
from m2r.engine.checkpoint import (ABANDONED_DIR, FINETUNE_KIND, LATEST_FILE, CheckpointManager, CheckpointRef,
                                   complete_tags, is_complete, remove_tag, set_aside_tags_after, tag_for, tags_in)
from m2r.export import export
from m2r.models.convert import CheckpointMismatch



def best_checkpoints(run_dir: Path, name: str) -> CheckpointManager:
    """best_<name>/: the checkpoints of the last two bests of that metric."""
    return CheckpointManager(run_dir / f"best_{name}", keep_last=2, kind=FINETUNE_KIND)


def best_export_files(run_dir: Path, name: str) -> List[Path]:
    """The export of best <name>: weights, network config, and last (as `export` replaces them) the record of
    what they are. A kill among the renames leaves files of two bests: `export_holds` judges the record and the
    weights' source together."""
    return [run_dir / f"best_{name}.safetensors", run_dir / f"best_{name}.yaml", run_dir / f"best_{name}.json"]


def exported_best(run_dir: Path, name: str) -> Optional[Dict[str, Any]]:
    """What best_<name>.json says its export holds; None without one."""
    record = best_export_files(run_dir, name)[-1]
    return json.loads(record.read_text()) if record.is_file() else None


def export_best(ref: CheckpointRef, run_dir: Path, name: str, record: Dict[str, Any], use_ema: bool) -> None:
    """The weights of `ref` that were validated (the EMA ones when there is an EMA) as best_<name>.safetensors,
    with `record` (value, epoch, step) as best_<name>.json."""
    weights, _, record_file = best_export_files(run_dir, name)
    export(str(ref.path), str(weights), use_ema=use_ema, companions={record_file: json_text(record)})


def align_best_with_resume(run_dir: Path, checkpoints_root: Path, name: str,
                           recorded: Optional[Dict[str, Any]], resumed: CheckpointRef) -> List[str]:
    """Rank 0, at a resume of `resumed`: best_<name>/ and its export as that checkpoint recorded the best
    (`recorded`; None before the first validation). Best copies newer than the recorded best belong to steps the
    run no longer follows, else `checkpoint_at(best_<name>)` would take the newest: copies of an epoch whose
    checkpoint was never saved (a kill while the epoch kept its bests; it is trained or validated again) are
    removed, the others (an older tag resumed) set aside; an export of their weights gives way to the recorded
    best's. Each change is atomic and judged from the disk, so the next start finishes what a kill interrupted.
    Returns what changed."""
    best_dir = run_dir / f"best_{name}"
    # A copy staged complete (meta.json) but not yet renamed when the kill came is published here, not by the next
    # best's `keep_copy` (which would keep it beside that best, pruning the recorded one): then judged as any tag.
    if best_dir.is_dir():
        best_checkpoints(run_dir, name).remove_leftovers()
    # Every best of this branch is at most the recorded one's step: a newer copy, even one at the resumed step
    # itself (a kill while the epoch ending there kept its bests, that step then saved again), is not of it.
    floor = tag_for(recorded["step"]) if recorded else ""
    never_saved = never_saved_copies(best_dir, checkpoints_root, floor, resumed)
    for tag in never_saved:
        remove_tag(best_dir / tag)
    moved = set_aside_tags_after(best_dir, floor)
    point_latest_at_newest(best_dir)
    changes = [f"{', '.join(never_saved)} removed (their epochs' checkpoints were never saved)"] if never_saved else []
    if moved:
        changes.append(f"{', '.join(moved)} moved to {best_dir / ABANDONED_DIR} (delete them when no longer needed)")
    if not export_holds(run_dir, name, recorded):
        changes += export_recorded_best(run_dir, checkpoints_root, name, recorded)
    return changes


def never_saved_copies(best_dir: Path, checkpoints_root: Path, floor: str, resumed: CheckpointRef) -> List[str]:
    """The copies in best_dir newer than `floor` whose epoch's checkpoint was surely never saved: newer than every
    tag the run keeps (pruning takes the oldest first, so a best copy outlives its epoch's tag) and not set aside
    by a resume of an older one (as `tag`, `tag+`...); or at `resumed`'s step when it is one of the run's own
    tags, whose save recorded every best it kept: such a copy is of that step saved again and never published (a
    stop saved an epoch's last step before its validation; resumed, the epoch end kept its bests, then a kill).
    Where the run keeps none (a resume from another run.dir into one whose checkpoints were removed), none is
    judged unsaved."""
    kept = complete_tags(checkpoints_root)
    if not kept:
        return []
    abandoned = checkpoints_root / ABANDONED_DIR
    set_aside = {path.name.rstrip("+") for path in abandoned.iterdir()} if abandoned.is_dir() else set()
    # another run's checkpoint at the step of this run's newest tag says nothing of this run's copy at that step
    resumed_here = resumed.tag if Path(resumed.root).resolve() == checkpoints_root.resolve() else None
    return [tag for tag in tags_in(best_dir)
            if tag > floor and (tag == resumed_here or (tag > kept[-1] and tag not in set_aside))]


def export_holds(run_dir: Path, name: str, recorded: Optional[Dict[str, Any]]) -> bool:
    """Whether the export of best <name> on disk is that of `recorded` (None: there is none). The record alone
    cannot say: `export` renames the weights first and the record last, so a kill between them leaves new weights
    beside the old record, which may be the recorded one; the weights name the checkpoint they come from."""
    if recorded is None:
        return not any(path.exists() for path in best_export_files(run_dir, name))
    return (exported_best(run_dir, name) == recorded
            and exported_weights_tag(run_dir, name) == tag_for(recorded["step"]))


def exported_weights_tag(run_dir: Path, name: str) -> Optional[str]:
    """The tag of the checkpoint best_<name>.safetensors was exported from (its `source` metadata); None without
    the file."""
    from safetensors import safe_open

    weights = best_export_files(run_dir, name)[0]
    if not weights.is_file():
        return None
    try:
        with safe_open(str(weights), framework="pt") as handle:
            source = (handle.metadata() or {}).get("source")
    except Exception:   # not a readable safetensors file: not the recorded best's export either
        return None
    return Path(source).name if source else None


def point_latest_at_newest(best_dir: Path) -> None:
    """best_dir's `latest` names its newest tag (it may name one just set aside), or is removed with the last."""
    kept = complete_tags(best_dir)
    if kept:
        CheckpointManager(best_dir, keep_last=2).point_latest_at(CheckpointRef(best_dir, kept[-1]))
    else:
        (best_dir / LATEST_FILE).unlink(missing_ok=True)


def export_recorded_best(run_dir: Path, checkpoints_root: Path, name: str,
                         recorded: Optional[Dict[str, Any]]) -> List[str]:
    """The export made again from the recorded best's checkpoint, or removed where none is kept (no abandoned
    weights under the name of the best); the next better epoch is exported as usual."""
    source = recorded_best_checkpoint(run_dir, checkpoints_root, name, recorded) if recorded else None
    why = f"its checkpoint ({tag_for(recorded['step'])}) is no longer kept" if recorded else "none was recorded yet"
    if source is not None:
        # A damaged copy (or one missing a file): the export waits for the next best, training goes on.
        try:
            export_best(source, run_dir, name, recorded, use_ema=bool(source.meta().get("ema")))
            return [f"best_{name}.safetensors exported again from {source.path}"]
        except (CheckpointMismatch, FileNotFoundError) as exc:
            why = f"{source.path} cannot be exported: {str(exc).splitlines()[0]}"
    removed = [path for path in best_export_files(run_dir, name) if path.exists()]
    for path in removed:
        path.unlink()
    return [f"best_{name}.safetensors removed until the next best ({why})"] if removed else []


def recorded_best_checkpoint(run_dir: Path, checkpoints_root: Path, name: str,
                             recorded: Dict[str, Any]) -> Optional[CheckpointRef]:
    """The recorded best's checkpoint in best_<name>/, linked there from the run's checkpoints when only they hold it
    (newer, abandoned bests pruned its copy); None when neither does."""
    tag = tag_for(recorded["step"])
    if is_complete(run_dir / f"best_{name}" / tag):
        return CheckpointRef(run_dir / f"best_{name}", tag)
    source = CheckpointRef(checkpoints_root, tag)
    if not is_complete(source.path):
        return None
    return best_checkpoints(run_dir, name).keep_copy(source.path, recorded["step"], source.meta())
