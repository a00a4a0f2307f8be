"""Files written whole or not at all: a temp file beside the target, fsync, rename, fsync of the folder.

A crash, preemption or power loss leaves either the old file or the new one, never a truncated one
(checkpoint pointers and metadata, configs, exported weights, shards and their index).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields the temp path to write; on success it replaces `path`, on an exception it is removed."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


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


def write_json_atomically(path: str | os.PathLike, payload) -> None:
    write_text_atomically(path, json.dumps(payload, indent=1))


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
