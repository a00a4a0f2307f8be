"""A rank that fails ends every rank, within seconds, whatever launched them.

A rank that raises exits; the others may be inside a collective that never notices (NCCL does not see a
peer's death) and wait there for the collective timeout (run.collective_timeout_minutes), unless the
launcher kills them: torchrun and the deepspeed launcher do, srun only with --kill-on-bad-exit. And the
failing rank's own interpreter shutdown can hang (NCCL's communicator abort while peers still use it).
So a failing rank writes its error into the process group's key-value store and exits at once
(`end_every_rank`); every rank's watch thread (`start`, from m2r.dist.init_distributed, and for m2r.evaluate and
m2r.restore from m2r.eval.loading.make_accelerator) reads the store every POLL_SECONDS and then exits (status 1),
naming the rank that failed and where it was itself.

Not covered: on NCCL a collective timeout aborts the process from torch's watchdog thread, with no Python
error to announce, so a rank that hangs (a stuck read) is ended by its launcher alone
(srun --kill-on-bad-exit=1, as launch/ uses). So is a rank killed without a Python error (the OOM killer,
a segfault, a lost node): it announces nothing, and when it is rank 0 the store goes with it.

Rank 0's process hosts the store under srun and the deepspeed launcher (torchrun's agent hosts it
there): rank 0 stays for the others' next look after a failure, and at a clean end (`end_cleanly`, from
m2r.dist.destroy_process_group) until every watch has stopped, since a read from a store that is gone is
logged by torch as a C++ stack. The watch reads through a store client of its own (the process's is held
for as long as the main thread waits in the store), so the host serves two connections per rank
(m2r.dist.allow_open_files).
"""
from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from typing import List, NoReturn, Optional

from m2r import dist

POLL_SECONDS = 5.0


def _key(name: str) -> str:
    # per torchrun restart (belt and braces: torchrun also prefixes its store per attempt)
    return f"m2r/{name}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


FAILURE_KEY = _key("failed")   # the first failure's message
DONE_KEY = _key("done")        # rank 0 has ended cleanly
LEFT_KEY = _key("left")        # how many ranks' watches have stopped at a clean end

_stop_watch: Optional[threading.Event] = None   # set: the watch thread stops
_left_lock = threading.Lock()
_left = False   # this rank has counted itself in LEFT_KEY
_store_gone = False   # the watch found the store gone: nothing more is read from or written to it


def _store():
    from torch.distributed.distributed_c10d import _get_default_store

    return _get_default_store()


def _hosts_the_store() -> bool:
    return dist.rank() == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"


def start(poll_seconds: float = POLL_SECONDS) -> None:
    """Start the thread that ends this process once another rank has announced a failure."""
    global _stop_watch, _left, _store_gone
    if _stop_watch is not None or dist.world_size() == 1:
        return
    _left = _store_gone = False   # a new process group (a process may run more than one)
    # A client of its own: the process's one is locked while the main thread waits in the store (a new
    # group's set-up, NCCL's first collective on a group), and the watch must look meanwhile.
    store, me, stopped = _own_client(_store()), dist.rank(), threading.Event()

    def watch() -> None:
        global _store_gone
        while not stopped.wait(poll_seconds):
            try:
                if not store.check([FAILURE_KEY]):
                    if store.check([DONE_KEY]):   # rank 0 has ended cleanly: its store goes with it
                        _count_as_left(store)
                        return
                    continue
                message = store.get(FAILURE_KEY).decode(errors="replace")
            except Exception:   # the store's host is gone: nobody can announce any more, and each further
                _store_gone = True   # try would log a C++ stack; the launcher judges
                return
            if stopped.is_set():
                return
            where = where_main_thread_is()
            _linger_if_hosting_the_store()
            _exit_now(f"rank {me}: stopping because {message}; this rank was in {where}", 1)

    _stop_watch = stopped
    threading.Thread(target=watch, name="m2r-failure-watch", daemon=True).start()


def _own_client(store):
    """`store` over a connection of its own (Store.clone; a torch without it: `store` itself, shared, said once)."""
    try:
        return store.clone()
    except Exception as error:   # an older torch, or a store that cannot be cloned
        dist.announce_once("WARNING: the failure watch shares the process's store client (Store.clone: "
                           f"{type(error).__name__}: {error}): while a rank waits in the store (a new group's "
                           "set-up, NCCL's first collective) its watch cannot look, so another rank's failure "
                           "may end this one only when that wait times out (run.collective_timeout_minutes)")
        return store


def stop() -> None:
    """Stop the watch thread (at its next look)."""
    global _stop_watch
    if _stop_watch is not None:
        _stop_watch.set()
        _stop_watch = None


def where_main_thread_is() -> str:
    """The main thread's innermost frames in m2r or the entry script (else any), on one line: where a rank
    was stuck or waiting (inside a collective the innermost frames are torch's, which say little)."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    if frame is None:
        return "?"
    frames = traceback.extract_stack(frame)
    return " <- ".join(f"{os.path.basename(entry.filename)}:{entry.lineno} {entry.name}"
                       for entry in reversed((_ours(frames) or frames)[-4:]))


def _ours(frames: List[traceback.FrameSummary]) -> List[traceback.FrameSummary]:
    package, script = os.path.dirname(os.path.abspath(__file__)) + os.sep, os.path.abspath(sys.argv[0])
    return [entry for entry in frames if entry.filename.startswith(package) or entry.filename == script]


def _count_as_left(store) -> None:
    global _left
    with _left_lock:
        if not _left:
            _left = True
            store.add(LEFT_KEY, 1)


def end_cleanly() -> None:
    """Stop the watch at a clean end; rank 0, when its process hosts the store, first waits (one look and a
    second at most) until every rank's watch has stopped, so that none reads from a store that is gone."""
    if _stop_watch is None:
        return
    stop()
    try:
        store = _store()
        if dist.rank() != 0:
            if not (_left or _store_gone):   # else rank 0 may be gone already: its DONE_KEY stopped the watch
                _count_as_left(store)
            return
        if not _hosts_the_store():
            return
        store.set(DONE_KEY, "1")
        _count_as_left(store)
        deadline = time.monotonic() + POLL_SECONDS + 1
        while store.add(LEFT_KEY, 0) < dist.world_size() and time.monotonic() < deadline:
            time.sleep(0.05)
    except Exception:
        pass


def end_every_rank(failure: str, code: int) -> NoReturn:
    """This rank failed (`failure`: what went wrong): tell every rank through the store, then exit with
    `code` at once, skipping the interpreter's shutdown. Multi-rank runs only."""
    me = dist.rank()
    own = f"rank {me} failed: {failure}"
    first = _announce_failure(own)
    # Another rank failed first (on gloo, or NCCL's remote-error detection, this rank's collective then fails
    # at once, before its watch looks): name the cause, not just this rank's consequence of it.
    # The same error on every rank (a refusal decided on rank 0 reaches every rank) is no other rank's cause.
    cause = f" (the first failure: {first})" if first and not first.endswith(f" failed: {failure}") else ""
    _exit_now(f"rank {me}: exiting after {failure.split(':')[0]} (status {code}){cause}", code)


def _announce_failure(message: str, wait_seconds: float = 10.0) -> Optional[str]:
    """Write `message` under FAILURE_KEY unless an earlier failure is there (the cause; later ones follow
    from it), and return what the store holds then (None when it could not be read). Best effort, within
    `wait_seconds`: the store's host may be gone."""
    stop()
    done, first = threading.Event(), [None]

    def tell() -> None:
        try:   # atomic: the first failure stays
            first[0] = _store().compare_set(FAILURE_KEY, "", message).decode(errors="replace")
        except Exception:
            pass
        done.set()

    threading.Thread(target=tell, name="m2r-announce-failure", daemon=True).start()
    done.wait(wait_seconds)
    _linger_if_hosting_the_store()
    return first[0]


def _linger_if_hosting_the_store() -> None:
    """Stay for every other rank's next look, whether this rank failed itself or saw another's failure."""
    if _hosts_the_store():
        time.sleep(POLL_SECONDS + 1)


def _exit_now(message: str, code: int) -> NoReturn:
    """Print `message` and end the process at once: no interpreter shutdown, which would wait for what
    other ranks hold up (NCCL's communicator abort at exit, a joined thread, a data worker)."""
    try:
        print(message, file=sys.stderr, flush=True)
        sys.stdout.flush()
    finally:
        os._exit(code)
