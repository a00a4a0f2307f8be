"""Stop signals: SLURM's time-limit warning (USR1), scancel and preemption (TERM), Ctrl-C (INT).

The training process only raises a flag (`StopRequest`) and checkpoints at a step boundary, on all
ranks at once; its helper processes (data workers, compile workers) must survive the same signals,
which SLURM sends to every process of a job step.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Optional

import torch

from m2r.dist import all_reduce_sum, is_rank0


# SLURM's preemption, scancel and time-limit warning, and Ctrl-C (which a terminal sends to every
# process of the job, data workers included): the trainer checkpoints, then exits.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`. SLURM signals every process of a job step, data workers too; a
    worker killed by SIGTERM (or by USR1's or INT's default action) would crash the trainer's next batch fetch
    before it can checkpoint. The trainer shuts its workers down itself (`shut_down_workers`)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def start_compile_workers() -> None:
    """Start inductor's compile worker processes now, with the stop signals blocked, which they inherit
    (a signal mask survives fork and exec): SLURM signals every process of a job step, and a worker
    killed by USR1 or TERM while the first steps compile fails the run instead of letting it save.
    Blocked, not ignored: a signal that comes meanwhile reaches this process once they are started.
    (Inductor's default `subprocess` start method; with `fork` the workers start at the first compile.)"""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        from torch._inductor.async_compile import AsyncCompile   # some torch versions warm the pool on import

        AsyncCompile.warm_pool()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _say(message: bytes) -> None:
    """Write from a signal handler: os.write, as print() may be inside a write it would re-enter; a
    stdout that cannot take it (replaced, closed) must not turn the stop request into a crash."""
    try:
        os.write(sys.stdout.fileno(), message)
    except (OSError, ValueError):
        pass


class StopRequest:
    """SIGTERM / SIGUSR1 / SIGINT only raise a flag; the loop acts on it at a step boundary, on all
    ranks at once. A second Ctrl-C aborts at once, without a checkpoint. The entry points create it
    first thing, so that a signal during start-up (SLURM's warning may come while the ranks import,
    rendezvous or load a checkpoint) stops the run before its first step instead of killing the rank."""

    def __init__(self):
        self.signal_name: Optional[str] = None   # the first stop signal received
        self.agreed_signal: Optional[str] = None   # the one all ranks stop for, once they have agreed
        self.interrupts = 0
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                raise KeyboardInterrupt
            if is_rank0():
                _say(b"SIGINT: saving a checkpoint at the end of this step, then stopping (Ctrl-C again to "
                     b"abort without one)\n")
        self.signal_name = self.signal_name or signal.Signals(signum).name

    def received_flags(self, device: torch.device) -> torch.Tensor:
        """This rank's stop signal as one flag per `STOP_SIGNALS` entry (float64 on `device`), to be summed
        over ranks and read by `agree`."""
        flags = torch.zeros(len(STOP_SIGNALS), dtype=torch.float64, device=device)
        if self.signal_name:   # a kernel: `flags[i] = 1.0` would copy a CPU scalar in, which waits for the GPU
            flags.narrow(0, STOP_SIGNALS.index(signal.Signals[self.signal_name]), 1).fill_(1.0)
        return flags

    def agree(self, summed_flags: torch.Tensor) -> Optional[str]:
        """Why every rank stops now, or None, from `received_flags` summed over ranks (on the host). The
        ranks agree on the signal too (the highest number of those received), in `agreed_signal`."""
        received = [sig for sig, count in zip(STOP_SIGNALS, summed_flags.tolist()) if count > 0]
        if not received:
            return None
        self.agreed_signal = max(received).name
        # Read again: a signal that reached this rank during the collective is its own too (SLURM signals
        # every rank; the handler may run only once the collective returns).
        own = self.signal_name == self.agreed_signal
        return f"received {self.agreed_signal}" + ("" if own else " (on another rank)")

    def agreed_reason(self) -> Optional[str]:
        """`agree` on its own collective (every rank calls it at the same point). A training step agrees
        within its report's all-reduce instead (TrainingRun._report_step)."""
        return self.agree(all_reduce_sum(self.received_flags(torch.device("cpu"))))


def shut_down_workers(batches) -> None:
    """Stop a DataLoader iterator's worker processes now. They ignore SIGTERM, so when an exception
    leaves with the iterator in its traceback, Python's exit would terminate them with SIGTERM and
    wait forever."""
    shutdown = getattr(batches, "_shutdown_workers", None)   # multi-process iterators only
    if shutdown is None:
        return
    shutdown()
    for worker in batches._workers:   # still busy after torch's wait: its last resort, SIGTERM, is ignored
        if worker.is_alive():
            worker.kill()
            worker.join()
