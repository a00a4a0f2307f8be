"""Files written whole or not at all: a temp file beside the target, fsync, rename, fsync of the folder.

A crash, preemption or power loss leaves either the old file or the new one, never a truncated one
(checkpoint pointers and metadata, configs, exported weights, shards and their index). A write that
fails for want of storage says which file and how much space is left (`StorageError`).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path
from typing import Iterator, Sequence, Tuple


# Errors only a write gives: the storage is full, over quota, read-only, or the file too large for it.
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)
NEARLY_FULL_BYTES = 256 * 2**20   # torch's zip writer reports a full disk as a RuntimeError: judged by the space left


class StorageError(OSError):
    """Writing a file failed for want of storage; the message names the file and the space left."""


def free_bytes(path: str | os.PathLike) -> int:
    """Free space on the filesystem holding `path` (or its nearest existing folder)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def as_storage_error(paths: Sequence[str | os.PathLike], error: BaseException, who: str = "",
                     judge_by_space_left: bool = False) -> BaseException:
    """`error`, raised while writing `paths`, as a StorageError naming them when storage caused it: an errno
    of STORAGE_ERRNOS or, with `judge_by_space_left` (for writers that hide the errno, as torch's does), any
    error with less than NEARLY_FULL_BYTES left. Otherwise `error` itself."""
    if isinstance(error, StorageError) or not isinstance(error, Exception):
        return error
    free = free_bytes(paths[0])
    by_errno = isinstance(error, OSError) and error.errno in STORAGE_ERRNOS
    if not (by_errno or (judge_by_space_left and free < NEARLY_FULL_BYTES)):
        return error
    reason = error.strerror if isinstance(error, OSError) and error.strerror else f"{type(error).__name__}: {error}"
    names = " and ".join(str(path) for path in paths)
    return StorageError(f"{who}writing {names} failed: {reason} ({free / 2**30:.2f} GiB free on its filesystem)")


@contextlib.contextmanager
def storage_failures_named(paths: Sequence[str | os.PathLike], who: str = "",
                           judge_by_space_left: bool = False) -> Iterator[None]:
    """Re-raise what the block raises as `as_storage_error` judges it (the original chained)."""
    try:
        yield
    except BaseException as error:
        failure = as_storage_error(paths, error, who, judge_by_space_left)
        if failure is error:
            raise
        raise failure from error


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields the temp path to write; on success it replaces `path`, on an exception it is removed."""
    with atomic_paths(path) as (tmp,):
        yield tmp


@contextlib.contextmanager
def atomic_paths(*paths: str | os.PathLike) -> Iterator[Tuple[Path, ...]]:
    """`atomic_path` for files that belong together (weights and their config, results and their table):
    every one is written and flushed before the first replaces its target, so a failed write leaves the
    earlier files, all of them."""
    targets = [Path(path) for path in paths]
    temps = tuple(path.with_name(path.name + ".tmp") for path in targets)
    with storage_failures_named(targets):
        try:
            yield temps
            for tmp in temps:
                with open(tmp, "rb+") as handle:
                    os.fsync(handle.fileno())
            for tmp, path in zip(temps, targets):
                os.replace(tmp, path)
        except BaseException:
            for tmp in temps:
                tmp.unlink(missing_ok=True)
            raise
    for folder in dict.fromkeys(path.parent for path in targets):
        fsync_directory(folder)


def default_file_mode() -> int:
    """0o666 less this process's umask: what open() gives a new file (without default ACLs)."""
    return 0o666 & ~_umask()


def _umask() -> int:
    """This process's umask, read from /proc on Linux: setting it to read it back (the portable way)
    would briefly change it for every thread of the process."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def json_text(payload) -> str:
    """How m2r writes its JSON records (checkpoint metadata, results.json, best_<metric>.json, shard sidecars)."""
    return json.dumps(payload, indent=1)


def write_json_atomically(path: str | os.PathLike, payload) -> None:
    write_text_atomically(path, json_text(payload))


def fsync_directory(path: str | os.PathLike) -> None:
    """Makes a rename or a new entry in `path` durable."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    except OSError as error:   # some network and FUSE filesystems refuse it for directories
        if error.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(descriptor)


def fsync_tree(path: str | os.PathLike) -> None:
    """Flush every file under `path` (and the folders) to disk: what other processes of this machine
    wrote there too, since they share its page cache."""
    for entry in sorted(Path(path).rglob("*")):
        if entry.is_file():
            with open(entry, "rb") as handle:
                os.fsync(handle.fileno())
        elif entry.is_dir():
            fsync_directory(entry)
    fsync_directory(path)
