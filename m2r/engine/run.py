"""What the pretraining `Trainer` and the `Finetuner` share: start-up, the DeepSpeed engine, resume, step reports.

`TrainingRun.__init__` starts the process group, checks the config and agrees on the checkpoint to
resume. A subclass then builds, in its own order, its data and `_build_model` -> `_start_engine` ->
`_start_ema` -> its resume through `_load_checkpoint` (and `_restore_ema`) -> `_seed_rng` ->
`_open_monitor` (a start refused before that leaves no new run.dir behind: `leaves_no_new_run_dir_if_refused`);
its loop's `train_step` runs `_optimizer_step` (forward and backward of each micro-batch, the optimizer step, the
EMA) and reports each step through `_report_step`, which also agrees on the stop signals.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import time
import warnings
from pathlib import Path
from typing import IO, Any, Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
from omegaconf import OmegaConf

from m2r import dist, stop_signals
from m2r.atomic import write_text_atomically
from m2r.config import config_error, flatten, require, save_config
from m2r.engine.checkpoint import (ABANDONED_DIR, RUN_CHECKPOINTS_DIR, CheckpointManager, CheckpointRef, Topology,
                                   agreed_resume, checkpoint_kind, complete_tags, complete_tags_before,
                                   load_ema_states, load_weights_only, own_files_lacking, set_aside_newer_tags)
from m2r.engine.config import PRECISIONS, collective_timeout, with_absolute_paths
from m2r.engine.deepspeed_config import (build_deepspeed_config, gradient_accumulation_dtype,
                                         gradient_reduction_dtype, images_per_step, precision_notes)
from m2r.engine.loss import LossTerms, restoration_loss
from m2r.engine.monitor import Monitor, NullMonitor, StepTimer
from m2r.engine.optim import (EMA, LRSchedule, apply_optimizer_settings, build_optimizer, learning_rate,
                              set_learning_rate, trainable_by_global_name)
from m2r.engine.rng import reseed, restore_rng_state
from m2r.engine.run_lock import check_every_rank_sees, hold_run_dir_lock, make_missing_dirs, remove_unused_run_dir
from m2r.engine.zero_state import load_resharded_optimizer_state, why_not_carried
from m2r.eval.image_io import to_unit_float
from m2r.models.config import model_defaults, require_same_network
from m2r.models.convert import CheckpointMismatch
from m2r.models.moe import is_first_expert_replica
from m2r.models.scan import resolve_scan_backend

# Settings of one process, expected to differ between the runs that continue one another.
PER_PROCESS_KEYS = frozenset({"run.resume", "run.stop_after_steps", "run.stop_after_epochs",
                              "run.collective_timeout_minutes"})
STOP_FILE_VARIABLE = "M2R_STOP_FILE"   # see TrainingRun._tell_the_job_script
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
assert tuple(PRECISION_DTYPES) == PRECISIONS, "train.precision's choices and their dtypes must agree"


def set_math_flags(train) -> None:
    """The process-wide CUDA math settings of `train` (cuDNN autotuning, TF32 matmuls): training's, and
    `m2r.evaluate --pretrain-val`'s, which recomputes a run's validation as the run computed it."""
    torch.backends.cudnn.benchmark = train.cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = train.tf32_matmul


def micro_step(engine, batch: Dict[str, torch.Tensor], device: torch.device, input_dtype: torch.dtype,
               train, balance_weight: float):
    """Forward, loss, backward and DeepSpeed step on one uint8 micro-batch (DeepSpeed applies the
    optimizer at the accumulation boundary). Returns the network output and the loss terms
    (`LossTerms.stacked`) on the device: callers copy once per optimizer step, not per micro-batch."""
    output = engine(to_unit_float(batch["lq"], device, input_dtype))
    terms = restoration_loss(output, to_unit_float(batch["gt"], device, torch.float32), train, balance_weight)
    engine.backward(terms.total)
    engine.step()
    return output, terms.stacked()


class StepResult(NamedTuple):
    """One optimizer step on this rank: mean loss terms (`LossTerms.NAMES`), mean expert loads (adapter
    level x expert) and, with a training capacity (model.moe.capacity_factor > 0), the mean fraction of
    assignments it dropped per adapter level (else None), float64 on the device, and the learning rate it
    ran at."""
    terms: torch.Tensor
    loads: torch.Tensor
    lr: float
    dropped: Optional[torch.Tensor] = None


class OptimizerCarry(NamedTuple):
    """What a resume at another topology brought of the saved optimizer."""
    masters: bool      # the fp32 master weights
    adamw: bool        # AdamW's moments and step counts
    why_not: str = ""  # why AdamW's state did not come
    loss_scale: bool = False   # the fp16 loss scale


def model_keys_added_since(saved: Dict[str, Any], current: Dict[str, Any], tag: str) -> List[str]:
    """The model keys a checkpoint's (flat) config lacks, added to m2r since it was saved (it ran at their
    defaults), that this run sets otherwise: a runtime key such as moe.load_with_clip_bias (on in the plus
    config) is not refused, so its change is named."""
    defaults, added = model_defaults(), []
    for key, value in current.items():
        name = key[len("model."):]
        if key.startswith("model.") and key not in saved and name in defaults and value != defaults[name]:
            added.append(f"{key} {defaults[name]!r} (the default; not in {tag}'s config) -> {value!r}")
    return added


def cuda_flags(device: torch.device) -> str:
    """cuDNN autotuning and TF32 matmuls as applied; on a CPU they change nothing, so they are not shown."""
    if device.type != "cuda":
        return ""
    backends = torch.backends
    return f"cudnn_benchmark {backends.cudnn.benchmark} | tf32_matmul {backends.cuda.matmul.allow_tf32} | "


# The DeepSpeed release whose bf16 ZeRO step was read to skip a step on an invalid grad norm (0.19.8); older 0.19
# ones may clip with the norm's -1 sentinel and step on NaN gradients instead.
NORM_CHECKED_SINCE = "0.19.8"


def skip_the_redundant_overflow_scan(zero_optimizer) -> bool:
    """Under bf16, DeepSpeed's ZeRO 1/2 optimizer scans every gradient for inf/NaN before each step (13 small
    kernels per parameter tensor, about 11,000 for M2Restore's 845, an all-reduce, then a host sync), and then
    checks the global grad norm, which is invalid whenever a gradient is (its -1 sentinel for inf/NaN): the scan
    only costs time. Without it a step with a non-finite gradient is still skipped, by that norm check, which
    `check_grad_overflow` keeps on (tests/test_host_syncs.py), in the DeepSpeed releases seen to have that check
    (`NORM_CHECKED_SINCE`; pyproject.toml lets an older 0.19 in). Returns whether the scan is skipped."""
    import deepspeed
    from packaging.version import Version

    settings = ("dtype", "check_grad_overflow", "compute_grad_norm", "cpu_offload", "check_overflow")
    dtype, check, norm, offload, scan = (getattr(zero_optimizer, name, None) for name in settings)
    redundant = dtype == torch.bfloat16 and check is True and norm is True and offload is False and callable(scan) \
        and Version(deepspeed.__version__) >= Version(NORM_CHECKED_SINCE)
    if redundant:   # step() sets `overflow = False` before it calls check_overflow
        zero_optimizer.check_overflow = lambda partition_gradients=True: None
    return redundant


def older_checkpoint_advice(ref: CheckpointRef) -> str:
    """What to resume instead of `ref`, whose files are damaged or missing: the newest complete tag before it."""
    older = complete_tags_before(ref)
    return f"resume an older one with run.resume={ref.root / older[-1]}" if older else "no older one is kept"


def applies_non_finite_steps(train) -> bool:
    """Whether DeepSpeed's optimizer applies a step whose gradients are inf/NaN: fp32 at ZeRO 0 alone (ZeRO 1/2 and
    fp16's loss scaler skip such steps)."""
    return (train.precision, train.zero_stage) == ("fp32", 0)


def leaves_no_new_run_dir_if_refused(init: Callable[..., None]) -> Callable[..., None]:
    """For the `__init__` of a `TrainingRun` subclass: a start it refuses (raises) before anything is written leaves
    behind no directory rank 0 created for run.dir (`_lock_run_dir`), only one that was there before."""
    @functools.wraps(init)
    def start(self, *args, **kwargs) -> None:
        try:
            init(self, *args, **kwargs)
        except BaseException:
            remove_unused_run_dir(self._new_dirs)
            raise
    return start


def describe_non_finite_weights(per_rank: Sequence[int], here: Sequence[str]) -> str:
    """What `TrainingRun._refuse_non_finite_weights` found: how many weight tensors each rank holds that are no longer
    finite (`per_rank`, by rank) and a few of this rank's (`here`, by global name)."""
    names = ", ".join(here[:3]) + (", ..." if len(here) > 3 else "")
    if len(per_rank) == 1:
        return f"{per_rank[0]} weight tensors are no longer finite ({names})"
    ranks = [index for index, count in enumerate(per_rank) if count]
    tally = ", ".join(f"{per_rank[index]} on rank {index}" for index in ranks[:3]) + (", ..." if len(ranks) > 3 else "")
    mine = f"; this rank's: {names}" if here else ""
    return f"weight tensors are no longer finite on {len(ranks)} of the {len(per_rank)} ranks ({tally}){mine}"


class TrainingRun:
    KIND: str                      # "pretrain" | "finetune": which checkpoints it may resume
    POSITION: str                  # the run's place in its data, as the topology warning names it
    cfg: Any                       # PretrainConfig or FinetuneConfig (OmegaConf, read-only)
    device: torch.device
    topology: Topology
    run_dir: Path
    stop_request: stop_signals.StopRequest
    input_dtype: torch.dtype       # what the network's input is cast to (train.precision)
    checkpoints: CheckpointManager
    resume_ref: Optional[CheckpointRef]  # the checkpoint run.resume names, as rank 0 resolved it; None = fresh
    engine: Any                    # deepspeed.DeepSpeedEngine around M2Restore (from `_start_engine`)
    optimizer: torch.optim.Optimizer
    step: int                      # optimizer steps completed
    total_steps: int               # steps of the whole run (from `_open_monitor`)
    monitor: NullMonitor           # (from `_open_monitor`)
    _skipped_steps_logged: int     # DeepSpeed's count of skipped steps at the last log step (from `_open_monitor`)
    ema: Optional[EMA]             # (from `_start_ema`)
    launcher: str                  # what started the ranks (m2r.dist.DistEnv.launcher)
    activation_checkpointing: str  # train.activation_checkpointing as applied, auto resolved (from `_build_model`)
    _run_lock: Optional[IO]        # rank 0 only: the run.dir lock file, open for the whole run (None: no locks)
    _new_dirs: Sequence[Path] = ()  # rank 0, holding the lock: the directories it made for run.dir (`_lock_run_dir`)

    def __init__(self, cfg, env: dist.DistEnv, validate_config: Callable[[Any, int], None],
                 stop_request: Optional[stop_signals.StopRequest] = None):
        self.cfg = cfg
        self.stop_request = stop_request or stop_signals.StopRequest()
        # ZeRO calls a collective that torch deprecates, every step: noise for our users.
        warnings.filterwarnings("ignore", message=".*all_gather_into_tensor", category=FutureWarning)
        self.device = dist.init_distributed(env, collective_timeout(cfg.run))
        validate_config(cfg, env.world_size)
        require(cfg.train.precision != "fp16" or self.device.type == "cuda", "train.precision", "fp16",
                "needs a CUDA GPU (DeepSpeed's loss scaling); on CPU use bf16 or fp32")
        resolve_scan_backend(cfg.model.scan_backend, self.device)   # refuses mamba_ssm where it cannot run
        set_math_flags(cfg.train)
        self.topology = Topology.of_run(env.world_size, cfg)
        self._warn_if_expert_groups_span_hosts()
        self.launcher = env.launcher
        self.run_dir = Path(cfg.run.dir)
        dist.on_rank0(self._lock_run_dir)
        self.checkpoints = CheckpointManager(self.run_dir / RUN_CHECKPOINTS_DIR, cfg.run.keep_last, self.KIND)
        dist.on_rank0(self.checkpoints.remove_leftovers)   # before anything is written: a full disk's first relief
        check_every_rank_sees(self.run_dir)
        self.input_dtype = PRECISION_DTYPES[cfg.train.precision]
        self.resume_ref = agreed_resume(cfg.run.resume, self.checkpoints.root)
        if self.resume_ref is not None:
            dist.on_rank0(lambda: self._check_resumable(self.resume_ref))
            self._set_aside_newer_checkpoints(self.resume_ref)
            dist.on_rank0(lambda: self.checkpoints.point_latest_at(self.resume_ref))
        self.step = 0

    def _warn_if_expert_groups_span_hosts(self) -> None:
        """Each MoE layer's all-to-all runs within an expert-parallel group, every step: across hosts it
        crosses the network (an ep_size that does not divide the ranks per node, or ranks placed cyclically)."""
        ep_size = self.topology.ep_size
        spans = dist.groups_spanning_hosts(ep_size) if ep_size > 1 else []
        if spans:
            first, hosts = spans[0]
            dist.print0(f"WARNING: {len(spans)} expert-parallel group(s) of {ep_size} ranks span hosts (ranks "
                        f"{first}-{first + ep_size - 1} on {', '.join(hosts)}): each MoE layer's all-to-all crosses "
                        "the network every step; an ep_size that divides the ranks per node, ranks placed in "
                        "blocks (srun --distribution=block), keeps each group within a node")

    def _lock_run_dir(self) -> None:
        """Rank 0 holds the run.dir lock for the whole run (m2r/engine/run_lock.py)."""
        created = make_missing_dirs(self.run_dir)
        self._run_lock = hold_run_dir_lock(self.run_dir)
        if self._run_lock is not None:   # without it, another run may be using what this one created
            self._new_dirs = created

    def _set_aside_newer_checkpoints(self, ref: CheckpointRef) -> None:
        moved = dist.on_rank0(lambda: set_aside_newer_tags(ref, self.checkpoints.root))
        if moved:
            dist.print0(f"resume: {ref.tag} is older than this run's {', '.join(moved)}, which this run abandons: "
                        f"moved to {self.checkpoints.root / ABANDONED_DIR} (delete them when no longer needed)")

    def _check_resumable(self, ref: CheckpointRef) -> None:
        """A checkpoint of this kind of run and of the same network; other changed settings are named."""
        if Path(ref.root).resolve() == (self.checkpoints.root / ABANDONED_DIR).resolve():
            raise config_error("run.resume", f"{ref.path} is a checkpoint this run abandoned when it "
                               f"resumed an older one; to continue it, move the tags saved since to {ref.root} and "
                               f"it back to {self.checkpoints.root} (or train from its weights in a new run.dir)")
        saved = ref.saved_config()
        saved_kind = checkpoint_kind(ref.meta(), saved)
        if saved_kind != self.KIND:
            raise config_error("run.resume", f"{ref.path} is a {saved_kind} checkpoint; a {self.KIND} "
                               "run resumes only its own kind (finetuning starts from pretraining weights with "
                               "init.weights=<checkpoint dir>)")
        require_same_network(saved["model"], self.cfg.model, "run.resume", str(ref.path),
                             "Resume with the checkpoint's values (its config.yaml), or start a new run.dir.")
        # paths compared absolute: saved so since 2026-11-28, relative before (then read from this directory, as then)
        current = flatten(OmegaConf.to_container(with_absolute_paths(self.cfg)))
        saved_flat = flatten(OmegaConf.to_container(with_absolute_paths(saved)))
        changed = [f"{key} {value!r} -> {current[key]!r}" for key, value in saved_flat.items()
                   if key in current and value != current[key] and key not in PER_PROCESS_KEYS]
        changed += model_keys_added_since(saved_flat, current, ref.tag)
        if changed:
            dist.print0(f"resume: settings changed since {ref.tag}: {'; '.join(changed)}")

    # ----------------------------------------------------------------------------- model and engine
    def _build_model(self):
        """This rank's M2Restore (experts need the expert-parallel rank, hence after the process group), with the
        activation checkpointing `_checkpointing_mode` resolves (kept as `activation_checkpointing` for the summary)."""
        from m2r.models.m2restore import build_model

        train = self.cfg.train
        model = build_model(self.cfg.model)
        self.activation_checkpointing = self._checkpointing_mode()
        model.set_activation_checkpointing(self.activation_checkpointing)
        if train.channels_last:
            model.use_channels_last()
        if train.compile:
            if train.compile_backend == "inductor":
                stop_signals.start_compile_workers()
            model.compile_training_forward(train.compile_backend)
        return model

    def _checkpointing_mode(self) -> str:
        """train.activation_checkpointing as applied: `auto` recomputes the bottleneck blocks on a GPU (memory is
        what limits the batch there) and nothing on a CPU (where time is short and memory is not)."""
        mode = self.cfg.train.activation_checkpointing
        if mode == "auto":
            return "bottleneck" if self.device.type == "cuda" else "none"
        return mode

    def _start_engine(self, model) -> None:
        """Wrap the model and its AdamW (MoE parameter groups) in a DeepSpeed engine on our process group."""
        import deepspeed

        train = self.cfg.train
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=build_optimizer(model, train),
            config=build_deepspeed_config(train, self.topology.world_size), dist_init_required=False)
        if skip_the_redundant_overflow_scan(self.engine.optimizer):
            dist.print0("bf16: DeepSpeed's per-gradient inf/NaN scan skipped (its grad-norm check skips the same "
                        "steps)")
        # The frozen CLIP prior runs in fp32 at every precision (its share of the work is small, and its scores
        # steer the gates): DeepSpeed 0.19.8 casts the module's parameters alone, which leaves the prior out,
        # earlier releases cast the whole module, which M2Restore._apply extends to the prior.
        if model.clip_prior is not None:
            model.clip_prior.float()

    # ----------------------------------------------------------------------------- EMA
    def _start_ema(self) -> None:
        """An fp32 EMA of the current weights when train.ema_decay > 0 (call once the weights are loaded)."""
        decay = self.cfg.train.ema_decay
        self.ema = EMA(self.engine.module, decay) if decay > 0 else None

    def _restore_ema(self, ref: CheckpointRef) -> None:
        """The EMA saved in `ref` (experts by global id, so at any topology), else one from the loaded weights; rank 0's
        read of its meta.json decides for every rank (loading it is a collective: `EMA.load_state_dict`)."""
        if self.ema is None:
            return
        if dist.on_rank0(lambda: bool(ref.meta().get("ema"))):
            self.ema.load_state_dict(load_ema_states(ref), f"the EMA of {ref.path}")
        else:
            dist.print0(f"WARNING: {ref.path} holds no EMA weights; EMA restarts from the loaded weights")
            self._start_ema()

    def _ema_state(self) -> Optional[Dict[str, torch.Tensor]]:
        """What this rank saves of the EMA: rank 0 the dense weights, and the first replica of each expert
        shard (rank 0 of its expert data-parallel group) its experts, so that a checkpoint holds every
        weight once whatever the world size; other ranks save none (an empty dict)."""
        if self.ema is None:
            return None
        return self.ema.state_dict(dense=dist.is_rank0(),
                                   experts=is_first_expert_replica(dist.rank(), self.topology.ep_size))

    def _validation_weights(self):
        """Validation and images see the EMA weights when there is an EMA (they are what gets exported)."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    # ----------------------------------------------------------------------------- checkpoints
    def _save_checkpoint(self, client_state: Dict[str, Any],
                         before_publish: Optional[Callable[[Path, Dict[str, Any]], None]] = None
                         ) -> CheckpointRef:
        """Save (every rank) and say how long it took: after a stop signal, SLURM waits only so long.
        `before_publish`: see CheckpointManager.save."""
        self._refuse_non_finite_weights()
        started = time.perf_counter()
        ref = self.checkpoints.save(self.engine, self.step, self.topology, client_state,
                                    with_absolute_paths(self.cfg), self._ema_state(), before_publish)
        self.monitor.print(f"saved checkpoint {ref.path} in {time.perf_counter() - started:.1f} s")
        return ref

    def _refuse_non_finite_weights(self) -> None:
        """Stop instead of saving inf/NaN weights: such a checkpoint would become the one a resume takes and push
        an older, good one out (run.keep_last). fp32 at ZeRO 0 applies a non-finite gradient whose loss was still
        finite (`_stop_if_weights_took_a_non_finite_step` sees it one step later). Every rank checks its own
        trainable weights (experts differ per rank) and counts them in its own slot (dense weights are on every
        rank: a sum would count each once per rank): one pass over them and one all-reduce per checkpoint."""
        named = trainable_by_global_name(self.engine.module)   # a local expert id says little on another rank
        finite = torch.stack([torch.isfinite(weight).all() for weight in named.values()])
        per_rank = torch.zeros(dist.world_size(), dtype=torch.float64, device=finite.device)
        per_rank[dist.rank()] = (~finite).sum()
        per_rank = dist.all_reduce_sum(per_rank)
        if not per_rank.any():
            return
        here = [name for name, ok in zip(named, finite.tolist()) if not ok]
        newest = complete_tags(self.checkpoints.root)
        resume = f"resume the newest with run.resume={self.checkpoints.root / newest[-1]}" if newest else \
            "this run has no earlier checkpoint"
        skips = " (train.zero_stage=1 or 2 skip non-finite steps)" if applies_non_finite_steps(self.cfg.train) else ""
        found = describe_non_finite_weights(per_rank.long().tolist(), here)
        raise FloatingPointError(f"step {self.step}: {found}; no checkpoint is saved; {resume}{skips}")

    # ----------------------------------------------------------------------------- resume
    def _load_checkpoint(self, ref: CheckpointRef) -> Tuple[Dict[str, Any], Optional[Dict[str, Any]]]:
        """Load `ref` into the engine and take its step. Saved at this run's topology, everything loads
        (an exact resume); at another, the model weights (experts by global id) and, when both runs use
        ZeRO 1 or 2, the optimizer re-partitioned (m2r/engine/zero_state.py). The optimizer's settings
        are this run's either way (an exact load would bring back the checkpoint's).

        Returns the client state and this rank's saved RNG state; None when the ranks are laid out
        otherwise (world size or ep_size changed): the place in the data and the RNGs then start afresh.
        """
        saved = dist.on_rank0(ref.topology)   # one read decides for all which of two collectives' paths they take
        same_ranks = (saved.world_size, saved.ep_size) == (self.topology.world_size, self.topology.ep_size)
        carry = None
        exact = saved == self.topology   # DeepSpeed's own load, the optimizer's files included
        lacking = own_files_lacking(self.engine, ref, exact)
        if lacking:
            raise CheckpointMismatch(f"{lacking}; {older_checkpoint_advice(ref)}")
        try:
            if exact:
                _, client = self.engine.load_checkpoint(str(ref.root), tag=ref.tag)
            else:
                client = load_weights_only(self.engine, ref)
                carry = self._carry_optimizer(ref, saved)
        except Exception as error:
            raise RuntimeError(f"loading {ref.path} failed ({type(error).__name__}: {error}); if its files are "
                               f"damaged, {older_checkpoint_advice(ref)}") from error
        apply_optimizer_settings(self.optimizer, self.cfg.train)
        self.step = client["step"]
        if carry is not None:
            self._warn_topology_change(ref, saved, same_ranks, carry, self._position_kept_elsewhere(client))
        elif batch_change := dist.on_rank0(lambda: self._global_batch_change(ref, saved)):   # batch or accum alone
            dist.print0(f"WARNING: resume: {batch_change}")
        return client, client["rng_states"][dist.rank()] if same_ranks else None

    def _carry_optimizer(self, ref: CheckpointRef, saved: Topology) -> OptimizerCarry:
        """After a weights-only load: the saved optimizer re-partitioned, where both runs use ZeRO 1/2."""
        why_not = why_not_carried(saved, self.topology)
        if why_not is not None:
            return OptimizerCarry(masters=False, adamw=False, why_not=f"the optimizer restarts: {why_not}")
        resharded = load_resharded_optimizer_state(self.engine, ref)
        return OptimizerCarry(masters=True, adamw=resharded.adamw, loss_scale=resharded.loss_scale,
                              why_not="" if resharded.adamw else "none saved: the checkpoint precedes the first "
                                                                  "optimizer step")

    def _position_kept_elsewhere(self, client: Dict[str, Any]) -> bool:
        """Whether the checkpoint's place in the data survives a change of world size or ep_size (none does)."""
        return False

    def _warn_topology_change(self, ref: CheckpointRef, saved: Topology, same_ranks: bool,
                              carry: OptimizerCarry, position_kept: bool = False) -> None:
        """What a resume at another topology kept and lost (`position_kept`: `_position_kept_elsewhere`)."""
        loaded, lost = ["model weights"], []
        if carry.masters:
            loaded.append(f"fp32 master weights{', AdamW moments and step counts' if carry.adamw else ''} "
                          "(re-partitioned)")
        elif {saved.precision, self.topology.precision} != {"fp32"}:
            lost.append("the fp32 master weights (rebuilt from the low-precision module weights)")
        if not carry.adamw:
            lost.insert(0, f"AdamW moments and step counts ({carry.why_not})")
        if saved.precision == self.topology.precision == "fp16":
            if carry.loss_scale:
                loaded.append("the fp16 loss scale")
            else:
                lost.append("the fp16 loss scale (starts again from its initial value)")
        if self.ema is not None and ref.meta().get("ema"):
            loaded.append("the EMA weights")
        if same_ranks:
            loaded.append(f"{self.POSITION} and the per-rank RNG states (same world size and ep_size)")
        else:
            if position_kept:
                loaded.append(f"{self.POSITION} (the epoch's last step was trained: it is validated next)")
            else:
                lost.append(f"{self.POSITION} (started afresh)")
            lost.append("the per-rank RNG states (reseeded from seed, rank and step)")
        bar = "!" * 100
        dist.print0("\n".join([
            bar,
            f"WARNING: TOPOLOGY CHANGE: {ref.path} was saved with {saved.describe()}; this run has "
            f"{self.topology.describe()}.",
            f"  Loaded: {'; '.join(loaded)}; experts mapped by global id. LOST: {'; '.join(lost) or 'nothing'}.",
            *[f"  {line[0].upper()}{line[1:]}" for line in [self._global_batch_change(ref, saved)] if line],
            bar]))

    def _global_batch_change(self, ref: CheckpointRef, saved: Topology) -> str:
        """A line when the images per optimizer step differ from the checkpoint's (the LR stays as set): a new
        world size, train.micro_batch or train.grad_accum; "" when they do not."""
        before = images_per_step(OmegaConf.create(ref.saved_config()["train"]), saved.world_size)
        now = images_per_step(self.cfg.train, self.topology.world_size)
        if before == now:
            return ""
        return (f"the global batch changes from {before} to {now} images per step; train.lr is not rescaled "
                "(set it, and train.grad_accum, as this batch needs).")

    def _seed_rng(self, saved_rng: Optional[Dict[str, Any]]) -> None:
        """The saved state when the ranks are laid out as saved; else a seed from (seed, rank, step): gate
        noise differs per rank."""
        if saved_rng is not None:
            restore_rng_state(saved_rng)
        else:
            reseed(self.cfg.train.seed, dist.rank(), self.step)

    # ----------------------------------------------------------------------------- stopping
    def _finish(self, reason: str, finished: bool, closing_lines: Sequence[str] = ()) -> None:
        """The end of `fit`, once the last step is saved: the job script told of a signal (unless the run
        `finished`), fp16's steps skipped since the last log step reported, "stopping at step N: <reason>" and
        `closing_lines` printed, the monitor closed."""
        self._tell_the_job_script(finished)
        self._report_steps_skipped_since_the_last_log()
        for line in (f"stopping at step {self.step}: {reason}", *closing_lines):
            self.monitor.print(line)
        self.monitor.close()

    def _report_steps_skipped_since_the_last_log(self) -> None:
        """fp16, at the end of the run's last step (its checkpoint saved): the steps DeepSpeed skipped since the last
        log step, which a run stopped between log steps (a signal, a run.stop_after_* limit) has reported in no step
        line. Every rank reads the same count (DeepSpeed agrees on overflows over the ranks): no collective."""
        if self.cfg.train.precision != "fp16":
            return
        scaling = self._loss_scaling()
        if scaling["skipped_steps"]:   # none after a log step: its line reported them
            self.monitor.log_loss_scaling(self.step, scaling)

    def _tell_the_job_script(self, finished: bool) -> None:
        """Under launch/train_job.sh (which sets M2R_STOP_FILE), rank 0 writes the signal that stopped an
        unfinished run there: the script requeues after SIGUSR1 even when the signal went to the ranks
        only (`scancel --signal=USR1` without --batch), which its own trap never sees."""
        path = os.environ.get(STOP_FILE_VARIABLE)
        if path and dist.is_rank0() and self.stop_request.agreed_signal and not finished:
            write_text_atomically(path, self.stop_request.agreed_signal + "\n")

    def _planned_stop_reason(self, steps_this_run: int, finished: bool) -> Optional[str]:
        """Why this run stops after its `steps_this_run` steps, signals aside (no collective): the end of
        training (`finished`), or `run.stop_after_steps` steps in this process."""
        if finished:
            return "finished"
        limit = self.cfg.run.stop_after_steps
        if limit and steps_this_run >= limit:
            return f"run.stop_after_steps={limit} reached"
        return None

    # ----------------------------------------------------------------------------- reporting
    def _network_lines(self) -> List[str]:
        """Start-up summary lines: the experts over the ranks (and, split over several, their all-to-all traffic)
        and the parameters this rank holds."""
        moe, world = self.cfg.model.moe, self.topology.world_size
        ep = moe.ep_size
        traffic = (f" | all-to-all per step ~{self.all_to_all_bytes_per_step() / 2**20:.1f} MiB per rank"
                   if ep > 1 else "")
        params = sum(p.numel() for p in self.engine.module.parameters())
        return [f"  experts: {moe.num_experts} per adapter, top-{moe.top_k} | ep_size {ep}: {moe.num_experts // ep} "
                f"per rank, expert data parallel {world // ep}{traffic}",
                f"  rank params {params:,}"]

    def all_to_all_bytes_per_step(self) -> int:
        """Bytes this rank sends through expert all-to-all per optimizer step (forward + backward, 3 levels).

        Each pixel token goes to top_k experts; a share (ep-1)/ep of them lives on other ranks, and
        the rows travel out and back in the forward and again in the backward. Level l has
        dim * 2**(l-1) channels at crop / 2**(l-1) resolution.
        """
        train, model, moe = self.cfg.train, self.cfg.model, self.cfg.model.moe
        if moe.ep_size == 1:
            return 0
        element_bytes = torch.finfo(self.input_dtype).bits // 8
        total = 0
        for level in range(3):
            tokens = train.micro_batch * (train.crop // 2 ** level) ** 2
            channels = model.dim * 2 ** level
            total += tokens * moe.top_k * channels * element_bytes
        remote_share = (moe.ep_size - 1) / moe.ep_size
        return int(total * remote_share * 4 * train.grad_accum)

    def _speed_settings(self) -> List[str]:
        """Start-up summary lines: precision and speed settings, the backend flags as applied."""
        train = self.cfg.train
        sums = f"gradients summed over micro-batches in {gradient_accumulation_dtype(train)}, over ranks in " \
               f"{gradient_reduction_dtype(train)}"
        compiled = f"True ({train.compile_backend})" if train.compile else "False"
        ema = f"{train.ema_decay}, following {self.ema.follows()}" if self.ema is not None else "off"
        auto = f" (auto on {self.device.type})" if train.activation_checkpointing == "auto" else ""
        return [f"  precision {train.precision} ({sums}) | ZeRO {train.zero_stage} | activation checkpointing "
                f"{self.activation_checkpointing}{auto} | channels_last {train.channels_last} | compile {compiled}",
                f"  {cuda_flags(self.device)}EMA {ema}",
                *(f"  note: {note}" for note in precision_notes(train))]

    def _open_monitor(self, total_steps: int) -> None:
        """Rank 0 writes the resolved config.yaml into the run directory and reports; other ranks stay silent. What
        fails on rank 0 here (a full disk, metrics.jsonl or the TensorBoard folder it cannot open) is raised on every
        rank, by the one broadcast of `dist.on_rank0`: the others would otherwise go on into the first step's
        collectives and end there, by a broken connection or the failure watch."""
        self.total_steps = total_steps

        def start_reporting() -> None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(with_absolute_paths(self.cfg), self.run_dir / "config.yaml")
            self.monitor = Monitor(self.run_dir, total_steps, self.step, self.topology.world_size,
                                   self.cfg.run.progress_bar, self.cfg.run.tensorboard)

        self.monitor = NullMonitor()
        dist.on_rank0(start_reporting)
        # Read after any resume: an exact one brings back DeepSpeed's saved count, skips this run did not see.
        self._skipped_steps_logged = self.engine.skipped_steps

    @staticmethod
    def _next_batch(batches: Iterator[Dict[str, torch.Tensor]], timer: StepTimer) -> Dict[str, torch.Tensor]:
        """The next micro-batch of `batches`, the wait for it counted on `timer` (data_wait_share)."""
        start = time.perf_counter()
        batch = next(batches)
        timer.add_data_wait(time.perf_counter() - start)
        return batch

    def _optimizer_step(self, micro_batches: Iterable[Dict[str, torch.Tensor]], schedule: LRSchedule,
                        position: Optional[int] = None) -> StepResult:
        """One optimizer step over the micro-batches (pulled one at a time): the learning rate of this
        step from `schedule` (see optim.learning_rate) at `position` (None: the steps taken; finetuning
        passes its place in its epochs), forward and backward of each, the EMA. What it reports stays on
        the device: `_report_step` copies it once."""
        lr = learning_rate(self.step if position is None else position, schedule)
        set_learning_rate(self.optimizer, lr)
        # Without a capacity nothing is dropped: the report (and its all-reduce) stays as it was.
        capacity = self.cfg.model.moe.capacity_factor > 0
        terms, loads, dropped, count = 0.0, 0.0, 0.0, 0
        for batch in micro_batches:
            output, values = micro_step(self.engine, batch, self.device, self.input_dtype, self.cfg.train,
                                        self.cfg.model.moe.balance_loss_weight)
            terms = terms + values
            loads = loads + torch.stack([load.float() for load in output.expert_load])
            if capacity:
                dropped = dropped + torch.stack([fraction.float() for fraction in output.dropped])
            count += 1
        if self.ema is not None:
            self.ema.update()
        self.step += 1
        means = (torch.cat([terms, loads.flatten(), *([dropped] if capacity else [])]) / count).double()
        names, levels = len(LossTerms.NAMES), loads.numel()
        return StepResult(means[:names], means[names:names + levels].view(loads.shape), lr,
                          means[names + levels:] if capacity else None)

    def _report_step(self, result: StepResult, timer: StepTimer) -> Optional[str]:
        """Every step: its loss terms, expert loads and dropped fractions (with a capacity) averaged over
        ranks, and the ranks' stop signals agreed, in one all-reduce and one device-to-host copy (outside
        log steps, the step's only synchronisation), which ends the step on `timer`. Every `run.log_every`
        steps and at the last: also the expert loads and dropped fractions (the same copy: all of the
        report comes to the host at once), `_log_run_stats`, the grad norm and the throughput. Returns why
        every rank stops for a signal now, or None. A collective: every rank calls it at every step."""
        dropped = [] if result.dropped is None else [result.dropped]
        report = torch.cat([result.terms, result.loads.flatten(), *dropped])
        summed = dist.all_reduce_sum(torch.cat([report, self.stop_request.received_flags(report.device)]))
        timer.end_step(images_per_step(self.cfg.train, dist.world_size()))   # the step's GPU work is done
        means = summed[:len(report)] / dist.world_size()
        signalled = self.stop_request.agree(summed[len(report):])
        terms, levels = len(result.terms), result.loads.numel()
        log_step = self.step % self.cfg.run.log_every == 0 or self.step == self.total_steps
        if log_step:
            means = means.cpu()
            loads = means[terms:terms + levels].view_as(result.loads).float()
            self.monitor.log_expert_load(self.step, list(loads),
                                         means[terms + levels:].float() if dropped else None)
            self._log_run_stats()
        self._log_train_step(means[:terms], result.lr, timer, log_step)
        return signalled

    def _log_run_stats(self) -> None:
        """What a kind of run reports on log steps besides the losses and loads (a collective)."""

    def _log_train_step(self, mean_terms: torch.Tensor, lr: float, timer: StepTimer, log_step: bool) -> None:
        """`mean_terms`: the loss terms (`LossTerms.NAMES`) averaged over ranks. Every step goes to
        metrics.jsonl; a log step adds the grad norm, the throughput since the last one and, in fp16,
        `_loss_scaling`, and reaches the console (a collective then: every rank calls it with the same `log_step`)."""
        scalars = {**dict(zip(LossTerms.NAMES, mean_terms.tolist())), "lr": lr}
        if log_step:
            grad_norm = self.engine.get_global_grad_norm()
            if grad_norm is not None:   # None at ZeRO stage 0 in fp32: DeepSpeed clips without keeping it
                scalars["grad_norm"] = float(grad_norm)
            throughput = timer.take()
            # The slowest rank's data loading holds every rank back: report the largest share of waiting.
            throughput["data_wait_share"] = dist.max_over_ranks(throughput["data_wait_share"])
            scalars.update(throughput)
            if self.cfg.train.precision == "fp16":
                scalars.update(self._loss_scaling())
        self.monitor.log_train(self.step, scalars, log_step)
        self.monitor.advance(self.step)
        self._stop_if_weights_took_a_non_finite_step(scalars["loss"])

    def _stop_if_weights_took_a_non_finite_step(self, loss: float) -> None:
        """Where DeepSpeed applies inf/NaN gradients (`applies_non_finite_steps`) the weights are then no longer
        finite, and the run would go on to save them and end with exit 0. Stop it here instead (the loss is the
        ranks' mean: every rank agrees)."""
        if math.isfinite(loss) or not applies_non_finite_steps(self.cfg.train):
            return
        raise FloatingPointError(
            f"step {self.step}: the loss is {loss} and at train.zero_stage=0 in fp32 DeepSpeed applies non-finite "
            "gradients, so the weights are no longer finite: the run stops before it saves them. Resume an earlier "
            "checkpoint (run.resume=<its tag directory>); train.zero_stage=1 or 2 skip such steps instead")

    def _loss_scaling(self) -> Dict[str, float]:
        """fp16's dynamic loss scale now, and the optimizer steps DeepSpeed skipped since the last log step
        (gradients inf or NaN: weights and AdamW unchanged, the scale lowered, at ZeRO 1 and 2 once DeepSpeed's
        hysteresis of 2 overflows is spent), the same on every rank.
        `loss_scale` is the property of each optimizer DeepSpeed wraps ours in at ZeRO 0, 1 and 2 (`cur_scale`
        is not at 0)."""
        skipped = self.engine.skipped_steps
        since_last_log, self._skipped_steps_logged = skipped - self._skipped_steps_logged, skipped
        return {"loss_scale": float(self.engine.optimizer.loss_scale), "skipped_steps": since_last_log}
