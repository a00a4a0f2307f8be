"""Stop signals (m2r/stop_signals.py): Ctrl-C, SLURM's signals during start-up and compilation, the ranks' agreement."""
import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fake_engine import FakeEngine
from m2r import dist, stop_signals
from m2r.config import ConfigError, load_config
from m2r.engine.checkpoint import CheckpointManager, Topology, tag_for
from m2r.engine.config import PretrainConfig
from m2r.engine.run import STOP_FILE_VARIABLE, TrainingRun


def test_ctrl_c_asks_for_a_checkpoint_and_a_second_one_aborts(capfd):
    """Also when a launcher's SIGTERM comes between the two (DeepSpeed's passes Ctrl-C on as SIGTERM)."""
    saved_handlers = {sig: signal.getsignal(sig) for sig in stop_signals.STOP_SIGNALS}
    try:
        request = stop_signals.StopRequest()
        signal.raise_signal(signal.SIGINT)
        assert request.signal_name == "SIGINT" and "saving a checkpoint" in capfd.readouterr().out
        signal.raise_signal(signal.SIGTERM)
        assert request.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    finally:
        for sig, handler in saved_handlers.items():
            signal.signal(sig, handler)


def test_compile_workers_block_the_stop_signals_slurm_sends_to_every_process(repo_root):
    """Killed by SLURM's USR1 or TERM while the first steps compile, they would fail the run. In a fresh
    process: a pool started earlier (by another test) would not be started again."""
    import subprocess
    import sys

    import torch._inductor.config as inductor_config

    if inductor_config.compile_threads <= 1 or getattr(inductor_config, "worker_start_method", "") != "subprocess":
        pytest.skip("no compile worker process here (one CPU, or workers forked from this process)")
    code = """
import os, signal
from m2r import stop_signals
signal.signal(signal.SIGUSR1, lambda *_: print("handled"))   # as StopRequest does
stop_signals.start_compile_workers()
from torch._inductor.async_compile import AsyncCompile
worker = AsyncCompile.process_pool().process.pid
blocked = int(next(l for l in open(f"/proc/{worker}/status") if l.startswith("SigBlk:")).split()[1], 16)
print(all(blocked >> (s - 1) & 1 for s in (signal.SIGUSR1, signal.SIGTERM)))
os.kill(worker, signal.SIGUSR1)
os.kill(os.getpid(), signal.SIGUSR1)   # this process still acts on them
import time; time.sleep(0.5)
print(AsyncCompile.process_pool().process.poll() is None)   # the worker lives on
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.stdout.split() == ["True", "handled", "True"], result.stderr[-2000:]


@pytest.mark.parametrize("entry, run_class", [("pretrain", "m2r.engine.trainer.Trainer"),
                                              ("finetune", "m2r.engine.finetuner.Finetuner")])
def test_a_stop_signal_during_start_up_reaches_the_run_instead_of_killing_the_rank(monkeypatch, entry, run_class):
    """SLURM's warning may come while the ranks still import, rendezvous or load a checkpoint: the run
    is built knowing it (what it then does: test_engine_dist.py, a warning during start-up)."""
    import importlib

    from m2r.engine import entry as training_entry

    module = importlib.import_module(f"m2r.{entry}")   # the code behind pretrain.py and finetune.py
    seen = {}

    class RecordingRun:
        def __init__(self, cfg, env, stop_request):
            seen["signal"] = stop_request.signal_name

        def fit(self):
            return 0

    def load_config_while_signalled(*args):
        signal.raise_signal(signal.SIGUSR1)   # its default action would end the process
        return "config"

    monkeypatch.setattr(run_class, RecordingRun)
    monkeypatch.setattr(training_entry, "load_config", load_config_while_signalled)
    monkeypatch.setattr(dist, "discover_dist_env", lambda: "env")   # it would export RANK, MASTER_PORT...
    saved_handlers = {sig: signal.getsignal(sig) for sig in stop_signals.STOP_SIGNALS}
    try:
        assert module.main(["--config", f"configs/{entry}/tiny-test.yaml"]) == 0
    finally:
        for sig, handler in saved_handlers.items():
            signal.signal(sig, handler)
    assert seen["signal"] == "SIGUSR1"


def _two_rank_worker(rank, store_path, out_dir, job):
    """One of two gloo ranks (torch.multiprocessing.spawn calls it with its rank)."""
    import torch.distributed as torch_dist

    from m2r.engine.checkpoint import agreed_resume

    torch_dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    out = {}
    try:
        if job == "collectives":
            out["max"] = dist.max_over_ranks(float([3, 7][rank]))
            out["broadcast"] = dist.broadcast_object(f"rank {rank}'s value")
            # rank 1 lags: its view of the shared run directory is still empty
            view = Path(out_dir) / ("run" if rank == 0 else "lagging_view")
            out["resume"] = getattr(agreed_resume("latest", view), "tag", None)
            try:
                agreed_resume("none", view)
                out["refusal"] = None
            except ConfigError as error:
                out["refusal"] = str(error)
            def refuse():
                raise ValueError("refused on rank 0")
            try:
                dist.on_rank0(refuse)
                out["error"] = None
            except ValueError as error:
                out["error"] = str(error)
            saved = {sig: signal.getsignal(sig) for sig in stop_signals.STOP_SIGNALS}
            try:
                request = stop_signals.StopRequest()
                if rank == 1:
                    signal.raise_signal(signal.SIGUSR1)
                out["stop"] = request.agreed_reason()
                out["agreed_signal"] = request.agreed_signal
            finally:
                for sig, handler in saved.items():
                    signal.signal(sig, handler)
        torch_dist.barrier()
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))
        dist.destroy_process_group()   # with the drain of gloo's threads that keeps the exit from aborting


def test_two_ranks_agree_on_rank_0s_resume_its_refusals_and_the_stop_signal(tmp_path):
    """Rank 0 decides (its view of a shared filesystem may be ahead of rank 1's), its error is raised on
    every rank, max_over_ranks is the maximum, and a stop signal seen on one rank stops both."""
    import torch.multiprocessing as mp

    manager = CheckpointManager(tmp_path / "run", keep_last=2)
    manager.save(FakeEngine(), 7, Topology(2, 1, "fp32", 1), {"step": 7}, load_config(PretrainConfig))
    (tmp_path / "lagging_view").mkdir()
    mp.start_processes(_two_rank_worker, args=(str(tmp_path / "store"), str(tmp_path), "collectives"),
                       nprocs=2, join=True, start_method="spawn")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, out in enumerate(ranks):
        assert out["max"] == 7.0
        assert out["broadcast"] == "rank 0's value"
        assert out["resume"] == tag_for(7)
        assert "'none' starts a new run" in out["refusal"]
        assert out["error"] == "refused on rank 0"
        assert out["agreed_signal"] == "SIGUSR1"
        assert out["stop"] == ("received SIGUSR1" + (" (on another rank)" if rank == 0 else ""))


def test_a_rank_that_received_another_signal_than_the_agreed_one_says_it_came_from_another_rank(monkeypatch):
    """Rank A got SIGUSR1, rank B SIGTERM: both stop for SIGTERM, and A says it was B's."""
    saved = {sig: signal.getsignal(sig) for sig in stop_signals.STOP_SIGNALS}
    try:
        request = stop_signals.StopRequest()
        signal.raise_signal(signal.SIGUSR1)
        sigterm_on_another_rank = torch.tensor([1.0 if sig == signal.SIGTERM else 0.0
                                                for sig in stop_signals.STOP_SIGNALS])
        monkeypatch.setattr(stop_signals, "all_reduce_sum", lambda flags: flags + sigterm_on_another_rank)
        assert request.agreed_reason() == "received SIGTERM (on another rank)"
        assert request.agreed_signal == "SIGTERM"
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _finishing_run(printed):
    stub = SimpleNamespace(step=7, stop_request=SimpleNamespace(agreed_signal="SIGUSR1"),
                           monitor=SimpleNamespace(print=printed.append, close=lambda: printed.append("<closed>")),
                           _report_steps_skipped_since_the_last_log=lambda: None)   # tests/test_monitor.py
    stub._tell_the_job_script = lambda finished: TrainingRun._tell_the_job_script(stub, finished)
    return stub


@pytest.mark.parametrize("finished, requeue", [(False, True), (True, False)])
def test_the_job_script_requeues_only_a_run_a_signal_stopped_before_its_end(tmp_path, monkeypatch, finished, requeue):
    stop_file = tmp_path / "job.stop"
    monkeypatch.setenv(STOP_FILE_VARIABLE, str(stop_file))
    printed = []
    TrainingRun._finish(_finishing_run(printed), "received SIGUSR1", finished=finished,
                        closing_lines=["demo: a", "demo: b"])
    assert stop_file.exists() == requeue and (not requeue or stop_file.read_text() == "SIGUSR1\n")
    assert printed == ["stopping at step 7: received SIGUSR1", "demo: a", "demo: b", "<closed>"]


def test_a_signal_that_arrives_during_the_agreement_is_this_ranks_own(monkeypatch):
    """SLURM signals every rank; one may run its handler only once the agreement's collective returns."""
    saved = {sig: signal.getsignal(sig) for sig in stop_signals.STOP_SIGNALS}
    try:
        request = stop_signals.StopRequest()

        def collective_during_which_sigterm_arrives(flags):
            assert flags.sum() == 0   # nothing received when the collective started
            signal.raise_signal(signal.SIGTERM)
            return request.received_flags(torch.device("cpu"))

        monkeypatch.setattr(stop_signals, "all_reduce_sum", collective_during_which_sigterm_arrives)
        assert request.agreed_reason() == "received SIGTERM"
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: the claim is about GPU synchronisation")
def test_the_stop_flags_are_filled_on_the_gpu_without_waiting_for_it():
    """The step's report carries them into its all-reduce; a host-to-device copy would add a
    synchronisation to the step on which a signal arrives."""
    saved = {sig: signal.getsignal(sig) for sig in stop_signals.STOP_SIGNALS}
    try:
        request = stop_signals.StopRequest()
        signal.raise_signal(signal.SIGUSR1)
        torch.cuda.set_sync_debug_mode("error")   # a synchronising CUDA call raises
        try:
            flags = request.received_flags(torch.device("cuda"))
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert flags.tolist() == [float(sig == signal.SIGUSR1) for sig in stop_signals.STOP_SIGNALS]
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
