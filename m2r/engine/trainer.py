"""The pretraining loop on DeepSpeed: build, resume, train, validate, checkpoint, report.

Order of construction: process group and the checkpoint to resume (`TrainingRun`) -> data stream and
validation set (first, so that a wrong shard path stops the start before the network is built) -> model
(experts need the expert-parallel rank) with its activation checkpointing -> AdamW with MoE groups in the
DeepSpeed engine -> EMA -> resume. Every rank runs every collective: the stop decision, checkpoint saves,
validation and image forwards.
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional

import torch

from m2r import dist, stop_signals
from m2r.data.presets import type_names
from m2r.engine.checkpoint import PRETRAIN_KIND, CheckpointRef
from m2r.engine.config import validate_pretrain_config
from m2r.engine.deepspeed_config import images_per_step
from m2r.engine.monitor import StepTimer
from m2r.engine.optim import LRSchedule
from m2r.engine.rng import capture_rng_state
from m2r.engine.run import StepResult, TrainingRun, leaves_no_new_run_dir_if_refused
from m2r.engine.validate import image_grid, validation_metrics
from m2r.eval.image_io import to_unit_float
from m2r.eval.metrics import batch_psnr

MAX_DAMAGE_LINES = 8   # damaged samples named on the console per log step, over all ranks


class Trainer(TrainingRun):
    KIND = PRETRAIN_KIND
    POSITION = "the data stream position"
    stream: Any                    # iterable of uint8 batches with state_dict()/load_state_dict()
    val_batches: List[Dict[str, torch.Tensor]]
    first_val_psnr: Optional[float]  # validation PSNR before any training (kept across resumes)
    last_val: Dict[str, float]     # the latest validation's metrics (kept across resumes)
    last_val_step: Optional[int]   # and its step
    schedule: LRSchedule           # the learning rate per step, from the train section

    @leaves_no_new_run_dir_if_refused
    def __init__(self, cfg, env: dist.DistEnv, stop_request: Optional[stop_signals.StopRequest] = None):
        from m2r.data import build_train_stream, build_val_set

        super().__init__(cfg, env, validate_pretrain_config, stop_request)
        train = cfg.train
        self.schedule = LRSchedule.of_steps(train)
        # Data first, as finetuning does: a wrong shard path stops the start before the network and engine are built.
        self.stream = build_train_stream(cfg.data, seed=train.seed, rank=env.rank, world_size=env.world_size,
                                         micro_batch=train.micro_batch, crop=train.crop,
                                         pin_memory=self.device.type == "cuda")
        self.val_batches = build_val_set(cfg.data, train.crop)
        self._start_engine(self._build_model())
        self._start_ema()
        self.first_val_psnr, self.last_val, self.last_val_step = None, {}, None
        saved_rng = self._resume(self.resume_ref) if self.resume_ref is not None else None
        self._stream_iter = iter(self.stream)
        self._seed_rng(saved_rng)
        self._open_monitor(train.steps)
        dist.print0(self.startup_summary())

    # ----------------------------------------------------------------------------- setup helpers
    def startup_summary(self) -> str:
        cfg, train = self.cfg, self.cfg.train
        world = self.topology.world_size
        global_batch = images_per_step(train, world)
        return "\n".join([
            f"pretrain: {cfg.run.dir} | world size {world} | launcher {self.launcher}",
            f"  batch: micro {train.micro_batch} x accum {train.grad_accum} x {world} ranks = global {global_batch}"
            f" | crop {train.crop} | steps {self.step}->{train.steps} | {self.schedule.describe(train.steps)}",
            *self._network_lines(),
            *self._speed_settings(),
        ])

    # ----------------------------------------------------------------------------- resume
    def _resume(self, ref: CheckpointRef) -> Optional[Dict[str, Any]]:
        """Continue from `ref`; returns this rank's saved RNG state when the ranks are laid out as they
        were (same world size and ep_size), None otherwise."""
        client, saved_rng = self._load_checkpoint(ref)
        if saved_rng is not None:  # the data stream continues where it stopped
            self._continue_stream(client["stream_states"][dist.rank()], ref)
        else:
            self.stream.start_fresh(self.step)   # seeded by the step
        self._restore_ema(ref)
        if self._finished():
            dist.print0(f"train.steps={self.cfg.train.steps} is reached already (the checkpoint is at step "
                        f"{self.step})")
        self._restore_validation_record(client)
        dist.print0(f"resumed from {ref.path} at step {self.step}")
        return saved_rng

    def _restore_validation_record(self, client: Dict[str, Any]) -> None:
        """The first and the latest validation results. A checkpoint saved before the latest was kept
        (2026-11-27) has its step's validation redone when due: what reports it (the demo's last lines,
        after a finished demo is run again) would find nothing."""
        self.first_val_psnr = client.get("first_val_psnr")
        self.last_val = client.get("last_val") or {}
        self.last_val_step = client.get("last_val_step") if self.last_val else None

    def _continue_stream(self, saved_state: Dict[str, Any], ref: CheckpointRef) -> None:
        """The stream where it stopped; if data settings changed since (data.workers on a node with other
        CPUs, a batch or crop size, the shards), a fresh one, the rest of the resume staying exact."""
        from m2r.data.stream import StreamMismatch

        mismatch = ""
        try:
            self.stream.load_state_dict(saved_state)
        except StreamMismatch as error:
            mismatch = str(error)
        mismatches = dist.all_gather_object(mismatch)
        if any(mismatches):   # all ranks draw afresh, or none
            self.stream.start_fresh(self.step)
            rank, first = next((rank, text) for rank, text in enumerate(mismatches) if text)
            dist.print0(f"WARNING: data settings changed since {ref.tag} (rank {rank}: {first}): a fresh data "
                        f"stream is drawn from step {self.step}; weights, optimizer and RNG continue exactly")

    # ----------------------------------------------------------------------------- training
    def train_step(self, timer: StepTimer) -> StepResult:
        # the stream never touches the global RNG (it seeds its own)
        micro_batches = (self._next_batch(self._stream_iter, timer) for _ in range(self.cfg.train.grad_accum))
        return self._optimizer_step(micro_batches, self.schedule)

    def _log_run_stats(self) -> None:
        """Per-type counts and skipped damaged samples of the data stream, summed over ranks, and the
        console told which damaged samples were skipped since the last log step (a collective: every
        rank calls it)."""
        stats = self.stream.stats()
        notes = self.stream.take_damage_notes()
        seen = stats["samples_by_type"]
        totals = dist.all_reduce_sum(torch.tensor([*seen.values(), stats["corrupt_samples"], len(notes)],
                                                  dtype=torch.float64))
        *counts, corrupt, noted = (int(c) for c in totals.tolist())
        self.monitor.log_data_stats(self.step, dict(zip(seen, counts)), corrupt)
        if noted:   # the same on every rank, so every rank joins the gather
            self._report_damage(dist.all_gather_object(notes), corrupt)

    def _report_damage(self, notes_by_rank: List[List[str]], corrupt: int) -> None:
        lines = [f"  rank {rank}: {note}" for rank, notes in enumerate(notes_by_rank) for note in notes]
        if len(lines) > MAX_DAMAGE_LINES:
            # the cut may fall inside a rank's notes: the rest are not all "on other ranks"
            lines = lines[:MAX_DAMAGE_LINES] + [f"  ... and {len(lines) - MAX_DAMAGE_LINES} more"]
        self.monitor.print(f"step {self.step}: skipped damaged training samples ({corrupt} since the stream "
                           f"started, data/corrupt_samples); the first ones since the last report:\n"
                           + "\n".join(lines))

    def validate(self) -> None:
        with self._validation_weights():
            self.last_val = validation_metrics(self.engine, self.val_batches, self.device, self.input_dtype,
                                               type_names(self.cfg.data.preset))
        self.last_val_step = self.step
        if self.first_val_psnr is None:
            self.first_val_psnr = self.last_val["psnr"]
        self.monitor.log_val(self.step, self.last_val)

    @torch.no_grad()
    def log_images(self) -> None:
        """degraded | restored | clean for the first validation batch; every rank runs the forward."""
        batch = self.val_batches[0]
        self.engine.eval()
        with self._validation_weights():
            restored = self.engine(to_unit_float(batch["lq"], self.device, self.input_dtype)).restored.float()
        self.engine.train()
        if dist.is_rank0():
            lq = to_unit_float(batch["lq"], self.device, torch.float32)
            gt = to_unit_float(batch["gt"], self.device, torch.float32)
            self.monitor.log_images(self.step, image_grid(lq, restored, gt))

    def save_checkpoint(self) -> CheckpointRef:
        states = dist.all_gather_object({"rng": capture_rng_state(), "stream": self.stream.state_dict()})
        client = {"step": self.step, "rng_states": [s["rng"] for s in states],
                  "stream_states": [s["stream"] for s in states], "first_val_psnr": self.first_val_psnr,
                  "last_val": self.last_val, "last_val_step": self.last_val_step}
        return self._save_checkpoint(client)

    def fit(self) -> int:
        """Train until done, stopped or signalled; the last step trained is always in a checkpoint.
        Returns the exit code (0)."""
        try:
            return self._train()
        finally:
            self._stream_iter.close()   # the stream shuts its data workers down (stop_signals.shut_down_workers)

    def _train(self) -> int:
        self.engine.train()
        steps_this_run, last_saved = 0, self.step
        # A stop signal received during start-up stops the run here: it holds nothing new to save.
        reason = self.stop_request.agreed_reason() or self._planned_stop_reason(steps_this_run, self._finished())
        if not self.stop_request.agreed_signal and self._start_of_run_work():
            last_saved = None   # a checkpoint must record the validation redone
        timer = StepTimer()   # after the first validation: the first steps' img/s is theirs alone
        while reason is None:
            result = self.train_step(timer)
            steps_this_run += 1
            signalled = self._report_step(result, timer)
            # After a stop signal the time left (SLURM's warning margin, or its kill wait after a
            # SIGTERM) goes to the checkpoint alone: the resumed run validates first if one was due.
            periodic_work_started = time.perf_counter()
            if not signalled and self._periodic_work():
                last_saved = self.step
            timer.exclude_since(periodic_work_started)
            reason = signalled or self._planned_stop_reason(steps_this_run, self._finished())
        if last_saved != self.step:
            self.save_checkpoint()
        self._finish(reason, finished=self._finished() and self.last_val_step == self.step,
                     closing_lines=self._demo_summary())
        return 0

    def _start_of_run_work(self) -> bool:
        """The first validation and image grid, or the validation (and the grid due with it) a stop signal
        skipped at the step this run resumes from. Returns whether it redid one."""
        redone = False
        if self._validation_due() and self.last_val_step != self.step:
            self.validate()
            redone = self.step > 0
        image_every = self.cfg.run.image_every
        if (self.step == 0 or redone) and image_every and self.step % image_every == 0:
            self.log_images()
        return redone

    def _finished(self) -> bool:
        return self.step >= self.cfg.train.steps

    def _validation_due(self) -> bool:
        return self.step % self.cfg.run.val_every == 0 or self.step == self.cfg.train.steps

    def _periodic_work(self) -> bool:
        """What falls due after the step just taken: validation, an image grid, a checkpoint. Returns
        whether it saved one."""
        run = self.cfg.run
        if self._validation_due():
            self.validate()
        if run.image_every and self.step % run.image_every == 0:
            self.log_images()
        if self.step % run.save_every == 0:
            self.save_checkpoint()
            return True
        return False

    def _demo_summary(self) -> List[str]:
        """run.demo_summary's last lines (rank 0 prints them): validation PSNR at the first and last step."""
        if not (self.cfg.run.demo_summary and self._finished() and dist.is_rank0()):
            return []
        if self.last_val_step != self.step:   # a stop signal came at the last step
            return ["demo: stopped before the final validation; run the same command again to report it"]
        return [f"demo: val PSNR before {self.first_val_psnr:.2f} dB, after {self.last_val['psnr']:.2f} dB",
                f"demo: (the degraded inputs themselves score {self._input_psnr():.2f} dB)"]

    def _input_psnr(self) -> float:
        """Mean PSNR of the validation inputs against their targets: what an identity network would score."""
        scores = [batch_psnr(to_unit_float(b["lq"], torch.device("cpu"), torch.float32),
                       to_unit_float(b["gt"], torch.device("cpu"), torch.float32)) for b in self.val_batches]
        return torch.cat(scores).mean().item()
