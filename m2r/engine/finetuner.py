"""Finetuning on paired datasets (AllWeather, CDD-11, a folder) on the pretraining engine.

The `finetune.py` entry point (m2r/finetune.py, whose docstring lists the commands) runs
`Finetuner(cfg, env, stop_request).fit()` through m2r/engine/entry.py.
The resumable distributed sampler and the epoch loop live here; the config schema (`FinetuneConfig`)
in m2r/engine/config.py.
"""
from __future__ import annotations

import hashlib
import itertools
import math
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader, DistributedSampler

from m2r import dist, stop_signals
from m2r.config import ConfigError, config_error, require
from m2r.data.augment import center_crop
from m2r.data.stream import require_the_same_set_on_every_rank
from m2r.engine.bests import align_best_with_resume, best_checkpoints, export_best
from m2r.engine.checkpoint import (FINETUNE_KIND, CheckpointRef, checkpoint_at, load_ema_states, load_weights_only,
                                   own_files_lacking)
from m2r.engine.config import allowed_model_changes, validate_finetune_config
from m2r.engine.deepspeed_config import images_per_step
from m2r.engine.experts import global_expert_names
from m2r.engine.monitor import StepTimer
from m2r.engine.optim import LRSchedule, load_trainable_weights
from m2r.engine.rng import capture_rng_state, rank_seed
from m2r.engine.run import StepResult, TrainingRun, leaves_no_new_run_dir_if_refused
from m2r.engine.validate import validation_metrics
from m2r.eval.datasets import (DatasetLayoutError, PairedImages, evaluation_sets, read_pair, to_chw_uint8,
                               train_pairs, training_list_file)
from m2r.export import config_path_for, stored_model_config
from m2r.models.config import require_same_network
from m2r.models.convert import CheckpointMismatch, check_fits, load_official_checkpoint, read_checkpoint


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start its epoch after `skip` samples (mid-epoch resume)."""

    skip = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self) -> int:
        # a dataset shrunk since the checkpoint can leave fewer samples than were dealt: the epoch is done
        return max(0, super().__len__() - self.skip)


def samples_per_step(train) -> int:
    """The samples one rank trains on per optimizer step: the micro-batches of one accumulation."""
    return train.micro_batch * train.grad_accum


def optimizer_steps_in(sampler: ResumableSampler, train) -> int:
    """Optimizer steps in what `sampler` deals this rank (an epoch, or its rest after `skip`): whole
    micro-batches (the loader drops the last partial one), whole accumulations of them."""
    return len(sampler) // samples_per_step(train)


def training_set_id(pairs, root: str) -> Dict[str, Any]:
    """What decides which image each place of an epoch deals: how many pairs and which, in their order
    (paths relative to data.root: the same dataset at another mount is the same)."""
    names = "\n".join(f"{os.path.relpath(pair.lq, root)}\t{os.path.relpath(pair.gt, root)}" for pair in pairs)
    return {"pairs": len(pairs), "sha256": hashlib.sha256(names.encode()).hexdigest()}


def init_weights_kind(weights: Optional[str]) -> Optional[str]:
    """init.weights as rank 0 sees it (call through `dist.on_rank0`: whether it is a directory decides
    which collectives every rank runs): None (scratch), "dir" (a pretraining checkpoint directory, loaded
    into the engine) or "file" (.safetensors or official, loaded into the model before the engine)."""
    if not weights:
        return None
    path = Path(weights)
    if not path.exists():
        raise FileNotFoundError(f"init.weights={weights}: no such file or directory")
    return "dir" if path.is_dir() else "file"


def validation_folder(data) -> str:
    """The key naming the folder the validation sets are read from, as errors name it: data.val_root, else
    data.root (the key the user left unset decides which)."""
    return f"data.val_root={data.val_root}" if data.val_root else f"data.root={data.root} (data.val_root unset)"


def validation_batches(data, val_sets) -> List[Dict[str, torch.Tensor]]:
    """Centre crops of the first images of each set, batched per set; type_id = set index. An image smaller than
    the crop is refused: validation would score an upscaled copy of it."""
    batches = []
    for set_index, pairs in enumerate(val_sets.values()):
        crops = []
        for pair in pairs[: data.val_images_per_set]:
            images = read_pair(pair)
            height, width = images[0].shape[:2]
            require(min(height, width) >= data.val_crop, "data.val_crop", data.val_crop,
                    f"is larger than the validation image {pair.lq} ({width}x{height}); use at most "
                    f"{min(height, width) // 8 * 8}")
            crops.append(tuple(to_chw_uint8(center_crop(image, data.val_crop)) for image in images))
        for start in range(0, len(crops), data.val_batch_size):
            chunk = crops[start:start + data.val_batch_size]
            batches.append({"lq": torch.stack([c[0] for c in chunk]), "gt": torch.stack([c[1] for c in chunk]),
                            "type_id": torch.full((len(chunk),), set_index, dtype=torch.int64)})
    return batches


def local_state_from_global(model, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A full state dict (experts by global id) -> this rank's keys (its local experts); refused on every rank when
    any rank's weights are missing from it: call it on every rank."""
    names = global_expert_names(model)
    missing = sorted(g for g in names.values() if g not in state)
    problem = dist.problem_of_any_rank(f"init.weights lacks {len(missing)} weights of this model, e.g. {missing[:3]}"
                                       if missing else None)
    if problem:
        raise ConfigError(problem)
    return {local: state[global_name] for local, global_name in names.items()}


class Finetuner(TrainingRun):
    KIND = FINETUNE_KIND
    POSITION = "the position in the epoch"

    @leaves_no_new_run_dir_if_refused
    def __init__(self, cfg, env: dist.DistEnv, stop_request: Optional[stop_signals.StopRequest] = None):
        super().__init__(cfg, env, validate_finetune_config, stop_request)
        self._build_data(env)
        model = self._build_model()
        # A resumed run does not load init.weights (its pretraining checkpoints may be gone by then).
        init_kind = dist.on_rank0(lambda: init_weights_kind(cfg.init.weights)) if self.resume_ref is None else None
        if init_kind == "file":
            self._load_init_weights(model)
        elif init_kind is None and self.resume_ref is None:
            dist.print0("init: no init.weights: the network starts from random weights")
        # checked before the engine is built: a refusal then costs no minutes of engine start at 64 GPUs
        init_checkpoint = self._checked_init_checkpoint(cfg.init.weights) if init_kind == "dir" else None
        self._start_engine(model)
        self.epoch, self.samples_into_epoch, self.best, self.steps_this_run = 0, 0, {}, 0
        if init_checkpoint is not None:
            self._load_pretraining_checkpoint(*init_checkpoint)
        self._start_ema()   # from the initial weights; a resume replaces it with the saved one
        saved_rng = self._resume(self.resume_ref) if self.resume_ref is not None else None
        self._seed_rng(saved_rng)
        self._count_steps_to_the_end()
        self._open_monitor(self.total_steps)
        if dist.is_rank0():   # the summary reads the data root again: only where it is printed
            dist.print0(self.startup_summary())

    # ----------------------------------------------------------------------------- setup
    def _build_data(self, env: dist.DistEnv) -> None:
        data, train = self.cfg.data, self.cfg.train
        # Rank 0 lists (and checks) the pairs for everybody: ranks listing a shared folder themselves could
        # disagree (a stale NFS listing, a copy in progress) on the steps per epoch, and the one that runs
        # out first would wait in a collective for the others forever.
        pairs = dist.on_rank0(lambda: train_pairs(data.dataset, data.root, data.list_file, train.crop))
        groups = sorted({pair.group for pair in pairs})
        self.train_set_id = training_set_id(pairs, data.root)
        self.train_set = PairedImages(pairs, groups, crop=train.crop, seed=train.seed, augment=data.augment)
        self.sampler = ResumableSampler(self.train_set, num_replicas=env.world_size, rank=env.rank, shuffle=True,
                                        seed=train.seed, drop_last=True)
        # The generator is reseeded every epoch (`run_epoch`): a loader without one draws its workers'
        # base seed from the global torch RNG, and a resumed run would draw it after restoring that RNG.
        self.loader = DataLoader(self.train_set, batch_size=train.micro_batch, sampler=self.sampler,
                                 num_workers=data.workers, drop_last=True, persistent_workers=False,
                                 pin_memory=self.device.type == "cuda",   # asynchronous copies to the GPU
                                 generator=torch.Generator(), worker_init_fn=stop_signals.ignore_stop_signals)
        self.steps_per_epoch = optimizer_steps_in(self.sampler, train)
        if self.steps_per_epoch == 0:
            raise ConfigError(f"data.root={data.root}: {len(pairs)} training images give no optimizer step per "
                              f"epoch at {env.world_size} ranks x micro_batch {train.micro_batch} x grad_accum "
                              f"{train.grad_accum}")
        self.schedule = LRSchedule(train.lr, train.min_lr, warmup_steps=train.warmup_epochs * self.steps_per_epoch,
                                   steps=(train.schedule_epochs or train.epochs) * self.steps_per_epoch)
        val_sets = dist.on_rank0(self._validation_sets)
        self.val_names = list(val_sets)
        # a set smaller than data.val_images_per_set validates on all it has: the summary says how many
        self.val_counts = [min(len(pairs), data.val_images_per_set) for pairs in val_sets.values()]
        self.val_batches = self._val_batches(val_sets)

    def _validation_sets(self):
        """The validation sets data.val_sets names (all by default) under data.val_root, else data.root; a
        layout error names the keys, since the one the user left unset (data.val_root) decides the folder."""
        data = self.cfg.data
        try:
            return evaluation_sets(data.dataset, data.val_root or data.root, list(data.val_sets) or None)
        except DatasetLayoutError as error:
            sets = f"data.val_sets={list(data.val_sets)}"
            raise DatasetLayoutError(f"validation sets ({validation_folder(data)}, {sets}): {error}") from None

    def _val_batches(self, val_sets) -> List[Dict[str, torch.Tensor]]:
        """`validation_batches`, read by each rank from its own copy of the folder: a read failing on one node
        fails on every rank, and a set read otherwise on one is refused."""
        batches = dist.failing_together(lambda: validation_batches(self.cfg.data, val_sets))
        require_the_same_set_on_every_rank(batches, validation_folder(self.cfg.data))
        return batches

    def _load_init_weights(self, model) -> None:
        """An init.weights file (.safetensors, official) into the model, before DeepSpeed wraps it (a
        pretraining checkpoint directory loads after: `_load_pretraining_checkpoint`)."""
        path = Path(self.cfg.init.weights)
        if path.suffix == ".safetensors":
            saved_model = stored_model_config(path)
            if saved_model is None:
                dist.print0(f"init: no model config in {config_path_for(path)}: the network of {path} is not "
                            "checked")
            else:
                self._require_init_network(saved_model, str(path))
            state = local_state_from_global(model, read_checkpoint(path))
            check_fits(model, state, source=str(path))
            model.load_state_dict(state, strict=True)
        else:
            self._require_init_network({}, f"{path} (an official checkpoint: the official network, the schema's "
                                           "defaults)")
            dropped = load_official_checkpoint(model, path)
            dist.print0(f"init: official checkpoint {path} converted ({len(dropped)} DA-CLIP/buffer keys dropped)")
        dist.print0(f"init: weights from {path}")

    def _checked_init_checkpoint(self, directory: str) -> Tuple[CheckpointRef, bool]:
        """(the pretraining checkpoint init.weights names, whether it holds an EMA), its network checked against
        this one's and, with init.use_ema, its EMA required; rank 0's reads decide for every rank."""
        ref = dist.on_rank0(lambda: checkpoint_at(directory, "init.weights"))
        self._require_init_network(dist.on_rank0(ref.saved_model_config), str(ref.path))
        has_ema = dist.on_rank0(lambda: bool(ref.meta().get("ema")))
        if self.cfg.init.use_ema and not has_ema:
            raise config_error("init.use_ema", f"{ref.path} (init.weights) holds no EMA weights: its run had "
                               "train.ema_decay=0; set init.use_ema=false to start from its trained weights")
        return ref, has_ema

    def _load_pretraining_checkpoint(self, ref: CheckpointRef, has_ema: bool) -> None:
        """A pretraining checkpoint's weights into the engine (any topology: experts by global id), the trained ones
        or, with init.use_ema, its EMA."""
        use_ema = self.cfg.init.use_ema
        lacking = own_files_lacking(self.engine, ref, exact=False)
        if lacking:
            raise CheckpointMismatch(f"init.weights: {lacking}; give it a complete pretraining checkpoint")
        load_weights_only(self.engine, ref)
        saved = f"saved with {ref.topology().describe()}; optimizer fresh"
        if use_ema:
            load_trainable_weights(self.engine, load_ema_states(ref), f"the EMA of {ref.path}")
            dist.print0(f"init: EMA weights from {ref.path} (init.use_ema; {saved})")
            return
        dist.print0(f"init: weights from {ref.path} ({saved})")
        if has_ema:   # its validation scored the EMA, not these weights
            dist.print0(f"init: note: {ref.path} also holds EMA weights (train.ema_decay), which its validation "
                        "scored; this run starts from the trained weights. To start from the EMA: "
                        "init.use_ema=true")

    def _require_init_network(self, saved_model, source: str) -> None:
        require_same_network(saved_model, self.cfg.model, "init.weights", source,
                             "Set those keys as the checkpoint has them, or name them in "
                             "init.allow_model_changes=[...] to change them on purpose.",
                             allowed=allowed_model_changes(self.cfg.init))

    def _resume(self, ref: CheckpointRef) -> Optional[Dict[str, Any]]:
        """Continue from `ref`; returns this rank's saved RNG state when the ranks are laid out as they
        were (same world size and ep_size), None otherwise (the epoch then restarts)."""
        client, saved_rng = self._load_checkpoint(ref)
        self.epoch, self.best = client["epoch"], client["best"]
        if self._position_kept_elsewhere(client):
            # a stop signal at the epoch's last step left only its validation: at any topology it is done next
            self.samples_into_epoch = self.sampler.num_samples
        elif saved_rng is not None:  # the epoch continues where it stopped
            self.samples_into_epoch = client["samples_into_epoch"]
            self._check_training_set(client, ref)
        self._check_validation_sets(client, ref)
        self._restore_ema(ref)
        epochs = self.cfg.train.epochs
        where = self._epoch_name() if self.epoch < epochs else f"after epoch {self.epoch}"
        dist.print0(f"resumed from {ref.path}: {where}, step {self.step}")
        if self.epoch >= epochs:
            dist.print0(f"train.epochs={epochs} is reached already (the checkpoint is after epoch {self.epoch})")
        dist.on_rank0(self._align_bests_with_resume)
        return saved_rng

    def _validation_set_sizes(self) -> Dict[str, int]:
        return dict(zip(self.val_names, self.val_counts))

    def _check_validation_sets(self, client: Dict[str, Any], ref: CheckpointRef) -> None:
        """The validation sets found (a folder's set subfolders, AllWeather's sets present) may differ from the
        saved run's with the same config: the bests it recorded were scored on the others."""
        saved = client.get("val_sets")   # absent from checkpoints saved before 2026-11-28
        now = self._validation_set_sizes()
        if saved is None or saved == now:
            return
        bests = ", ".join(f"{name} {best['value']:.4f}" for name, best in self.best.items()) or "none yet"
        dist.print0(f"WARNING: the validation sets changed since {ref.tag}: {saved} -> {now} (images per set): its "
                    f"bests ({bests}) were scored on the others, and a new best must beat them")

    def _position_kept_elsewhere(self, client: Dict[str, Any]) -> bool:
        """An epoch whose last step was trained (`_epoch_trained_now`) is validated next at any topology
        (checkpoints saved before 2026-11-28 do not say)."""
        return bool(client.get("epoch_trained"))

    def _check_training_set(self, client: Dict[str, Any], ref: CheckpointRef) -> None:
        """The sampler deals an epoch in an order drawn from the number of images: once images are added or
        removed (a new list file, a folder that changed), the saved place in the epoch points into another
        order, and continuing there would train some images twice and others not at all in this epoch. The epoch
        then starts again from its first image."""
        saved = client.get("train_set")   # absent from checkpoints saved before 2026-11-28
        if saved is None or saved == self.train_set_id:
            return
        dist.print0(f"resume: the training set changed since {ref.tag}: {saved['pairs']} -> "
                    f"{self.train_set_id['pairs']} pairs" + ("" if saved["pairs"] != self.train_set_id["pairs"]
                                                             else " (other images or another order)"))
        if self.samples_into_epoch > 0:
            dist.print0(f"WARNING: {self._epoch_name()} starts again from its first image (its images are dealt in "
                        "another order now: continuing at the saved place would train some twice and skip others); "
                        "the learning rate goes back to the epoch's start")
            self.samples_into_epoch = 0

    def _align_bests_with_resume(self) -> None:
        """Rank 0: the bests on disk made those the resumed checkpoint recorded (`align_best_with_resume`)."""
        for name in self.cfg.run.best_metrics:
            changes = align_best_with_resume(self.run_dir, self.checkpoints.root, name, self.best.get(name),
                                             self.resume_ref)
            if changes:
                dist.print0(f"resume: best {name} as recorded at step {self.step}: {'; '.join(changes)}")

    def startup_summary(self) -> str:
        train, world = self.cfg.train, self.topology.world_size
        return "\n".join([
            f"finetune: {self.cfg.run.dir} | {self.cfg.data.dataset} {self.cfg.data.root} | "
            f"{len(self.train_set)} training pairs in {self._training_folder()} | world size {world} | "
            f"launcher {self.launcher}",
            f"  batch: micro {train.micro_batch} x accum {train.grad_accum} x {world} ranks = global "
            f"{images_per_step(train, world)} | crop {train.crop} | "
            f"{self.steps_per_epoch} steps/epoch x {train.epochs} epochs = {self._schedule_length()} steps | "
            + self.schedule.describe(self._schedule_length()),
            *self._network_lines(),
            *self._speed_settings(),
            f"  validation sets (images of each, at most data.val_images_per_set={self.cfg.data.val_images_per_set}): "
            f"{', '.join(f'{name} {count}' for name, count in zip(self.val_names, self.val_counts))} "
            "(type ids in that order)",
        ])

    def _training_folder(self) -> str:
        """Where the training inputs are (the folder of every one of them): which of a layout's candidate
        folders was taken, e.g. a test set's when data.root points at one by mistake; and the list file
        that chose them, when one did (a stale one trains on fewer images than the folder holds)."""
        folder = os.path.commonpath([str(pair.lq.parent) for pair in self.train_set.pairs])
        data = self.cfg.data
        listed = training_list_file(data.dataset, data.root, data.list_file)
        return folder + (f" (listed in {listed})" if listed is not None else "")

    # ----------------------------------------------------------------------------- training
    def train_step(self, batches, timer: StepTimer) -> StepResult:
        micro_batches = (self._next_batch(batches, timer) for _ in range(self.cfg.train.grad_accum))
        return self._optimizer_step(micro_batches, self.schedule, self.schedule_position())

    def schedule_position(self) -> int:
        """The optimizer step the learning-rate schedule (counted in this run's steps per epoch) is at: the
        epochs done and the steps into this one. The step count is not it once the steps per epoch change
        (a resume at another world size, micro batch or accumulation): the schedule would go back into its
        warmup, or be cut short, with the run's last epoch far from train.min_lr."""
        return self.epoch * self.steps_per_epoch + self.samples_into_epoch // samples_per_step(self.cfg.train)

    def _count_steps_to_the_end(self) -> None:
        """`total_steps`: the step the last epoch ends at, for the console's step N/total, its ETA and the last
        step's line. After a resume that changed the steps per epoch the step count and the schedule's position
        part: say so."""
        train = self.cfg.train
        later_epochs = max(0, train.epochs - self.epoch - 1)
        self.total_steps = self.step + (self._steps_left_in_epoch() + later_epochs * self.steps_per_epoch
                                        if self.epoch < train.epochs else 0)
        # said at every resume of such a run, not only the one that changed them; a finished run trains nothing
        if self.step != self.schedule_position() and self.epoch < train.epochs:
            dist.print0(f"resume: {self.steps_per_epoch} steps per epoch here, other than before: step {self.step} "
                        f"is step {self.schedule_position()} of the learning-rate schedule, which goes on from "
                        f"{self._epoch_name()}'s place on it; the run ends at step {self.total_steps}")

    def _schedule_length(self) -> int:
        """The whole run in the schedule's steps (this run's steps per epoch): `total_steps` counts the steps
        taken, which part from them after a resume that changed the steps per epoch."""
        return self.cfg.train.epochs * self.steps_per_epoch

    def run_epoch(self) -> Optional[str]:
        """Train one epoch (or its rest); returns why it stopped early, None when it finished."""
        train = self.cfg.train
        self.sampler.set_epoch(self.epoch)
        self.train_set.set_epoch(self.epoch)
        self.sampler.skip = self.samples_into_epoch
        self.loader.generator.manual_seed(rank_seed(train.seed, dist.rank(), self.epoch))
        batches = iter(self.loader)
        timer = StepTimer()
        try:
            steps = optimizer_steps_in(self.sampler, train)
            for index in range(steps):
                result = self.train_step(batches, timer)
                self.samples_into_epoch += samples_per_step(train)
                signalled = self._report_step(result, timer)
                self.steps_this_run += 1
                # run.stop_after_steps at the epoch's last step stops after its validation (`_train_epochs`), as
                # pretraining's does after the validation due at its step; a signal's time goes to the save alone
                planned = None if index == steps - 1 else self._planned_stop_reason(self.steps_this_run, False)
                if reason := signalled or planned:
                    return reason
        finally:
            stop_signals.shut_down_workers(batches)
        self.epoch += 1
        self.samples_into_epoch = 0
        return None

    # ----------------------------------------------------------------------------- validation, checkpoints
    def validate(self) -> Dict[str, float]:
        with self._validation_weights():
            metrics = validation_metrics(self.engine, self.val_batches, self.device, self.input_dtype,
                                         self.val_names)
        self.monitor.log_val(self.step, metrics)
        return metrics

    def _client_state(self) -> Dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "samples_into_epoch": self.samples_into_epoch,
                "epoch_trained": self._epoch_trained_now(), "train_set": self.train_set_id, "best": self.best,
                "val_sets": self._validation_set_sizes(),
                "rng_states": dist.all_gather_object(capture_rng_state())}

    def _epoch_trained_now(self) -> bool:
        """Whether the epoch under way has had its last step (no whole accumulation of micro-batches is left)."""
        return self._steps_left_in_epoch() == 0

    def _steps_left_in_epoch(self) -> int:
        """Optimizer steps in the rest of the epoch under way (`optimizer_steps_in` its sampler from there)."""
        return max(0, self.sampler.num_samples - self.samples_into_epoch) // samples_per_step(self.cfg.train)

    def save_checkpoint(self, before_publish: Optional[Callable[[Path, Dict[str, Any]], None]] = None
                        ) -> CheckpointRef:
        return self._save_checkpoint(self._client_state(), before_publish)

    def record_bests(self, metrics: Dict[str, float]) -> List[str]:
        """The metrics of run.best_metrics that this validation improved, now recorded in `best`."""
        improved = []
        for name in self.cfg.run.best_metrics:
            if not math.isfinite(metrics[name]):   # diverged (NaN): never the best, nor above the next one
                self.monitor.print(f"WARNING: validation {name} is {metrics[name]} at epoch {self.epoch}: "
                                   "not a best")
                continue
            if metrics[name] <= self.best.get(name, {}).get("value", float("-inf")):
                continue
            self.best[name] = {"value": metrics[name], "epoch": self.epoch, "step": self.step}
            improved.append(name)
        return improved

    def _keep_bests(self, names: List[str], staged: Path, meta: Dict[str, Any]) -> None:
        """Rank 0, with this epoch's checkpoint in `staged` but not yet complete (`meta`, its meta.json, is
        written after: a crash here leaves the previous epoch the latest, to be trained again and its bests
        kept again): for each improved metric, the checkpoint kept under best_<metric>/ (hard links, not a
        second save) and its weights exported."""
        for name in names:
            ref = best_checkpoints(self.run_dir, name).keep_copy(staged, self.step, meta)
            export_best(ref, self.run_dir, name, self.best[name], use_ema=self.ema is not None)
            self.monitor.print(f"new best {name} {self.best[name]['value']:.4f} at epoch {self.epoch}: {ref.path}")

    def _epoch_name(self) -> str:
        """The epoch under way, counted from 1 as best_<metric>.json counts the epochs done."""
        return f"epoch {self.epoch + 1} of {self.cfg.train.epochs}"

    def fit(self) -> int:
        """Train until the last epoch, a stop signal or a run.stop_after_* limit; the last step trained is
        always in a checkpoint. Returns the exit code (0)."""
        # A stop signal received during start-up stops the run here: it holds nothing new to save.
        reason = self.stop_request.agreed_reason() or self._train_epochs()
        self._finish(reason, finished=self.epoch >= self.cfg.train.epochs)
        return 0

    def _train_epochs(self) -> str:
        """Epochs, each validated and saved at its end, after a validation of the starting weights (the
        'before finetuning' figure, as pretraining's step 0; never a best); why they stopped."""
        if self.step == 0:
            self.validate()
        epochs_this_run = 0
        while self.epoch < self.cfg.train.epochs:
            if reason := self.run_epoch():
                self.save_checkpoint()
                return f"{reason} in {self._epoch_name()}"
            improved = self.record_bests(self.validate())
            self.save_checkpoint(before_publish=lambda staged, meta: self._keep_bests(improved, staged, meta))
            epochs_this_run += 1
            if self.cfg.run.stop_after_epochs and epochs_this_run >= self.cfg.run.stop_after_epochs:
                return f"run.stop_after_epochs={self.cfg.run.stop_after_epochs} reached"
            if self.epoch < self.cfg.train.epochs and \
                    (reason := self._planned_stop_reason(self.steps_this_run, finished=False)):
                return f"{reason} at the end of epoch {self.epoch} of {self.cfg.train.epochs}"
        return "finished"
