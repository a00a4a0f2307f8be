"""A rank that fails ends every rank within seconds, whatever launched them (m2r.failure_watch):
srun without --kill-on-bad-exit kills no survivor, and NCCL does not notice a peer's exit."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from m2r.dist import free_port

REPO = Path(__file__).resolve().parents[1]
BOUND = 90   # seconds; without the watch, these runs end only at the test's timeout (or never)


def launch_ranks(mode, timeout_seconds=10, count=2):
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO), WORLD_SIZE=str(count),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONUNBUFFERED="1")
    started = time.monotonic()
    ranks = [subprocess.Popen([sys.executable, "tests/failing_rank.py", mode, str(timeout_seconds)], cwd=REPO,
                              env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in range(count)]
    results = []
    try:
        for process in ranks:
            output, _ = process.communicate(timeout=max(1, BOUND - (time.monotonic() - started)))
            results.append((process.returncode, output))
    except subprocess.TimeoutExpired:
        pytest.fail(f"{mode}: a rank was still running after {BOUND} s")
    finally:
        for process in ranks:
            process.kill()
    return results, time.monotonic() - started


@pytest.mark.parametrize("mode, error, code, shown", [("raise", "OSError", 1, "OSError: "),
                                                      ("user", "StorageError", 2, "rank 1: error: ")])
def test_a_rank_that_raises_ends_the_ranks_waiting_for_it(mode, error, code, shown):
    """Whether its error is a bug (a traceback, status 1) or the user's to mend (one line, status 2)."""
    (code0, out0), (code1, out1) = launch_ranks(mode)[0]
    assert code1 == code and f"{shown}No space left on device: rank 1's checkpoint shard" in out1
    assert code0 == 1, out0
    assert f"rank 0: stopping because rank 1 failed: {error}: No space left on device" in out0


def test_a_rank_whose_collective_fails_because_another_rank_failed_names_that_rank_s_error():
    """The survivors of rank 1's failure fail in their own collective first (gloo, NCCL's remote-error
    detection), before their watch looks: their last line names rank 1's error, the cause."""
    results = launch_ranks("collective", count=3)[0]
    assert results[1][0] == 1 and "OSError: No space left on device" in results[1][1]
    for code, out in (results[0], results[2]):
        assert code == 1, out
        assert "(the first failure: rank 1 failed: OSError: No space left on device" in out, out


def test_a_rank_waiting_in_the_store_is_ended_too():
    """A rank waiting in the store (a new group's set-up; NCCL's first collective on a group waits there for
    the group's unique id) holds its store client for the whole wait: the watch reads through a client of
    its own. The timeout is long: without the watch these ranks would wait for it."""
    (code0, out0), (code1, out1) = launch_ranks("group", timeout_seconds=300)[0]
    assert code1 == 1 and "OSError: No space left on device" in out1
    assert code0 == 1 and "rank 0: stopping because rank 1 failed: OSError" in out0, out0


def test_a_clean_end_where_rank_0_ends_first_prints_nothing_from_the_store():
    """Rank 0 hosts the store (srun, the deepspeed launcher): a rank still running after it has ended must
    not read from the store that went with it (torch logs each failed read as a C++ stack)."""
    for code, out in launch_ranks("late")[0]:
        assert code == 0, out
        assert "TCPStore" not in out and "recvValue" not in out and "stopping because" not in out, out


def test_a_rank_that_hangs_is_ended_once_the_others_time_out():
    (code0, out0), (code1, out1) = launch_ranks("hang")[0]
    assert code0 == 1 and "Timed out" in out0, out0
    assert code1 == 1, out1
    assert "rank 1: stopping because rank 0 failed: RuntimeError" in out1
    assert "this rank was in failing_rank.py:" in out1   # where the hung rank was stuck


def test_rank_0_hosting_the_store_waits_for_every_rank_to_see_a_failure_before_it_exits():
    """Under srun and the deepspeed launcher rank 0's process hosts the store: exiting at once when it sees
    rank 1's failure would leave rank 2, whose watch looks later, in its collective (it only reads errors
    from a store that is gone)."""
    (code0, out0), (code1, out1), (code2, out2) = launch_ranks("raise", count=3)[0]
    assert code1 == 1 and code0 == 1, out0
    assert code2 == 1 and "rank 2: stopping because rank 1 failed: OSError" in out2, out2


def test_where_a_rank_was_names_m2r_code_rather_than_the_library_it_waits_in():
    """A rank ended while waiting in a collective: its innermost frames are torch's; m2r's say which step."""
    import threading

    from m2r import dist, failure_watch

    def library_call_seen_from_the_watch_thread():   # stands in for torch's collective, outside m2r
        seen = []
        watcher = threading.Thread(target=lambda: seen.append(failure_watch.where_main_thread_is()))
        watcher.start()
        watcher.join()
        return seen[0]

    where = dist.on_rank0(library_call_seen_from_the_watch_thread)
    assert where.startswith("dist.py:") and "on_rank0" in where and "library_call" not in where, where


def test_the_same_error_on_every_rank_is_not_named_as_another_rank_s_cause(monkeypatch, capsys):
    """A refusal decided on rank 0 reaches every rank (dist.on_rank0): whichever rank announced it first is
    not the cause of the others' (each has already printed the error); a different error is."""
    from m2r import dist, failure_watch

    exits = []
    monkeypatch.setattr(dist, "rank", lambda: 0)
    monkeypatch.setattr(failure_watch, "_exit_now", lambda message, code: exits.append((message, code)))
    monkeypatch.setattr(failure_watch, "_announce_failure", lambda own: "rank 1 failed: ConfigError: no")
    failure_watch.end_every_rank("ConfigError: no", 2)
    failure_watch.end_every_rank("RuntimeError: gloo connection closed", 1)
    assert exits == [("rank 0: exiting after ConfigError (status 2)", 2),
                     ("rank 0: exiting after RuntimeError (status 1) (the first failure: rank 1 failed: ConfigError: "
                      "no)", 1)]


class FakeStore:
    def __init__(self, keys=(), gone=False):
        self.keys, self.gone, self.added = set(keys), gone, []

    def clone(self):
        return self

    def check(self, keys):
        if self.gone:
            raise RuntimeError("Failed to recv, got 0 bytes")
        return all(key in self.keys for key in keys)

    def add(self, key, amount):
        self.added.append(key)   # on a store that is gone, torch logs a C++ stack here
        return len(self.added)


def watch_once(monkeypatch, store):
    """Start the watch of rank 1 of 2 on `store` and wait for it to end."""
    import threading

    from m2r import dist, failure_watch

    monkeypatch.setattr(failure_watch, "_stop_watch", None)
    monkeypatch.setattr(failure_watch, "_store_gone", False)
    monkeypatch.setattr(failure_watch, "_store", lambda: store)
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "rank", lambda: 1)
    failure_watch.start(poll_seconds=0.01)
    deadline = time.monotonic() + 10
    while any(thread.name == "m2r-failure-watch" for thread in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_rank_that_found_the_store_gone_does_not_write_to_it_at_its_end(monkeypatch):
    """Rank 0 (the store's host) gone: the watch's look logged one C++ stack; the end adds no second one."""
    from m2r import failure_watch

    monkeypatch.setattr(failure_watch, "_left", False)
    store = FakeStore(gone=True)
    watch_once(monkeypatch, store)
    failure_watch.end_cleanly()
    assert store.added == []


def test_each_process_group_counts_the_rank_s_watch_as_stopped(monkeypatch):
    """A process that starts a second process group (after destroying its first) counts itself again in
    the new store, else rank 0 waits its whole deadline and the others may read from a store that is gone."""
    from m2r import failure_watch

    monkeypatch.setattr(failure_watch, "_left", False)
    for _ in range(2):
        store = FakeStore(keys=[failure_watch.DONE_KEY])
        watch_once(monkeypatch, store)
        failure_watch.end_cleanly()
        assert store.added == [failure_watch.LEFT_KEY]


def test_a_watch_that_cannot_clone_the_store_says_so_once_with_the_error(monkeypatch, capsys):
    """Sharing the process's client, the watch cannot look while the main thread waits in the store."""
    from m2r import dist, failure_watch

    class Uncloneable(FakeStore):
        def clone(self):
            raise RuntimeError("clone refused")

    monkeypatch.setattr(dist, "_announced", set())
    monkeypatch.setattr(dist, "rank", lambda: 0)
    store = Uncloneable()
    assert failure_watch._own_client(store) is store and failure_watch._own_client(store) is store
    out = capsys.readouterr().out
    assert out.count("WARNING: the failure watch shares the process's store client") == 1
    assert "RuntimeError: clone refused" in out and "run.collective_timeout_minutes" in out
    cloneable = FakeStore()   # (its clone is itself)
    assert failure_watch._own_client(cloneable) is cloneable and capsys.readouterr().out == ""


def test_a_tool_process_that_fails_ends_the_processes_of_its_accelerate_world():
    """m2r.evaluate and m2r.restore run in the process world Accelerate starts (not m2r.dist.init_distributed):
    a process failing there ends the others too, which would otherwise wait for it in their next gather
    (on NCCL, until its timeout) where no launcher's agent ends them."""
    (code0, out0), (code1, out1) = launch_ranks("accelerate")[0]
    assert code1 == 2 and "rank 1: error: No space left on device" in out1
    assert code0 == 1 and "rank 0: stopping because rank 1 failed: StorageError: No space left" in out0, out0
