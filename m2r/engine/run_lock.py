"""One run per run.dir: rank 0 holds an exclusive lock on `<run.dir>/.lock` for the whole run.

A second run on the same directory, or a run restarted while orphaned ranks of the previous one still
train, would prune, resume and overwrite the other's checkpoints. The lock is a POSIX record lock: the
kernel frees it when the process ends, however it ends; it is held by this process alone (forked data
workers do not inherit it; closing any other descriptor of the file in this process would drop it, so
nothing else opens it); NFS's lock manager sees it (unless the mount says nolock or local_lock). A
requeued SLURM job replaces a lock its earlier run left (that run has ended, but NFS keeps a crashed
client's locks for a while).

A start refused before it wrote anything (a config or data error, a bad run.resume, found once run.dir was
locked) removes the directories it created for the run again (`make_missing_dirs`, `remove_unused_run_dir`).

Every rank must also see run.dir as rank 0 does (`check_every_rank_sees`): each rank writes its part of
every checkpoint there.
"""
from __future__ import annotations

import errno
import fcntl
import os
import re
import socket
import time
import uuid
from pathlib import Path
from typing import IO, List, Optional, Sequence

from m2r import dist
from m2r.config import config_error

RUN_LOCK_FILE = ".lock"
ATTEMPTS = 3   # a stale lock replaced, and perhaps replaced again by another requeue racing this one


def hold_run_dir_lock(run_dir: Path) -> Optional[IO]:
    """Lock run_dir for this process; returns the open lock file, to keep open for the run, or None (with a
    warning) on a filesystem without locks. Raises ConfigError, naming the holder, when another run holds it.
    run_dir must exist: `make_missing_dirs` alone creates it, so that it knows what a refused start may remove."""
    lock_path = run_dir / RUN_LOCK_FILE
    for _ in range(ATTEMPTS):
        handle = open(lock_path, "a+")
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = _read(handle)
            handle.close()
            if error.errno not in (errno.EACCES, errno.EAGAIN):   # a filesystem without locks
                dist.print0(f"WARNING: cannot lock {lock_path} ({error}); nothing stops a second run on {run_dir}")
                return None
            if not _earlier_run_of_this_job(holder):
                raise config_error("run.dir", f"{run_dir} is in use by another run ({holder}); "
                                   f"wait for it to end (or kill its ranks), or choose another run.dir; if that "
                                   f"process is gone (its node crashed), delete {lock_path}") from None
            dist.print0(f"WARNING: {lock_path} was left locked by an earlier run of this job ({holder}): replaced")
            lock_path.unlink(missing_ok=True)   # the new file is another inode, free to lock
            continue
        if _is_the_file_at(handle, lock_path):   # not replaced by another requeue meanwhile
            handle.truncate(0)
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}, {_job_and_restart()}\n")
            handle.flush()
            return handle
        handle.close()
    raise config_error("run.dir", f"{lock_path} was replaced {ATTEMPTS} times while this run "
                       "tried to lock it: is another run of this job starting?")


def make_missing_dirs(run_dir: Path) -> List[Path]:
    """run_dir and the parents it lacks, created; returns those this call created, outermost first (one another
    process made meanwhile is not among them): all that `remove_unused_run_dir` may remove."""
    created = []
    for path in [path for path in (run_dir, *run_dir.parents) if not path.exists()][::-1]:
        try:
            path.mkdir()
        except FileExistsError:
            continue
        created.append(path)
    return created


def remove_unused_run_dir(created: Sequence[Path]) -> None:
    """After a refused start, by the process holding the lock: the directories `make_missing_dirs` created (the
    last one is run.dir, unless another process made run.dir itself meanwhile), innermost first, removed while they
    hold nothing, the last one nothing but its lock file. One with anything else in it stays, and so do the
    directories above it. Never raises: it runs while the refusal's own error is on its way to the user."""
    if not created:
        return
    try:
        if any(path.name != RUN_LOCK_FILE for path in created[-1].iterdir()):
            return
        (created[-1] / RUN_LOCK_FILE).unlink(missing_ok=True)
        for path in reversed(created):
            path.rmdir()
    except OSError:   # not empty (or gone): another process's doing meanwhile, left as it is
        return


def _read(handle: IO) -> str:
    """The holder line, read through the open file (opening the path again would drop our own lock)."""
    handle.seek(0)
    return handle.read().strip() or "unknown"


def _is_the_file_at(handle: IO, path: Path) -> bool:
    try:
        here, there = os.fstat(handle.fileno()), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _job_and_restart() -> str:
    job = os.environ.get("SLURM_JOB_ID")
    return f"SLURM job {job} restart {os.environ.get('SLURM_RESTART_COUNT', '0')}" if job else "not under SLURM"


def _earlier_run_of_this_job(holder: str) -> bool:
    """Whether the holder line names this SLURM job at an earlier restart (requeues of a job run one
    after another, so that run has ended)."""
    match = re.search(r"SLURM job (\S+) restart (\d+)$", holder)
    return bool(match) and match.group(1) == os.environ.get("SLURM_JOB_ID") \
        and int(match.group(2)) < int(os.environ.get("SLURM_RESTART_COUNT", "0"))


SHARED_CHECK_SECONDS = 30.0   # how long a rank looks for rank 0's file: a shared filesystem may show it late


def check_every_rank_sees(run_dir: Path, wait_seconds: float = SHARED_CHECK_SECONDS) -> None:
    """Raise ConfigError on every rank unless every rank sees the file rank 0 leaves in run_dir. On a path
    local to each node (/tmp, node scratch) rank 0 would publish checkpoints whose other ranks' parts lie
    on other nodes, complete to rank 0 and unreadable by any resume. The file's name is fresh, so no
    filesystem has it cached as absent. Call it on every rank, once rank 0 has created run_dir."""
    if dist.world_size() == 1:
        return
    name = dist.on_rank0(lambda: _leave_marker(run_dir))
    deadline = time.monotonic() + wait_seconds
    while not (seen := (run_dir / name).exists()) and time.monotonic() < deadline:
        time.sleep(0.5)
    views = dist.all_gather_object((seen, socket.gethostname()))
    dist.on_rank0(lambda: (run_dir / name).unlink(missing_ok=True))   # every rank has looked (the gather)
    blind = [f"rank {rank} on {host}" for rank, (ok, host) in enumerate(views) if not ok]
    if blind:
        shown = ", ".join(blind[:4]) + (f" and {len(blind) - 4} more" if len(blind) > 4 else "")
        raise config_error("run.dir", f"{run_dir} is not one directory for every rank: {shown} cannot see the "
                           f"file rank 0 wrote there ({name}) within {wait_seconds:g} s; every rank writes its "
                           "part of each checkpoint there, so put run.dir on a filesystem that every node mounts")


def _leave_marker(run_dir: Path) -> str:
    """An empty file (no data to write, so it is made on a full disk too)."""
    name = f".every-rank-sees-{uuid.uuid4().hex}"
    (run_dir / name).touch()
    return name
