"""What the command-line entry points share: the training scripts' `--config FILE [key=value ...]`,
and for every tool, a user's mistake (a config key, a path, a dataset layout, an image or weights file
it cannot use) ends in one line naming it and exit status 2, not a traceback. Anything else is a bug or
a crash, and keeps its traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Callable, NoReturn, Optional, Sequence, Tuple

USER_ERROR_EXIT = 2


def parse_entry_args(argv, description: str, config_help: str) -> argparse.Namespace:
    """`--config FILE [key=value ...]` for the training entry points; also accepts the `--local_rank`
    argument the deepspeed launcher adds (the LOCAL_RANK variable is what `discover_dist_env` reads)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, action="append", help=config_help)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    # intermixed: overrides on both sides of --config (or of the launcher's --local_rank) all count
    args = parser.parse_intermixed_args(argv)
    if len(args.config) > 1:   # argparse would keep the last silently; a user may expect them merged
        parser.error(f"--config given {len(args.config)} times ({', '.join(args.config)}): give one file; "
                     "a file of your own can start from several with `_base_: [a.yaml, b.yaml]`")
    args.config = args.config[0]
    return args


def user_errors() -> Tuple[type, ...]:
    # Imported when an error is being judged: a tool's start need not load torch for them.
    from m2r.atomic import StorageError
    from m2r.config import ConfigError
    from m2r.data.images import UnreadableImage
    from m2r.models.convert import CheckpointMismatch

    return ConfigError, FileNotFoundError, NotADirectoryError, CheckpointMismatch, UnreadableImage, StorageError


def run_main(main: Callable[[Optional[Sequence[str]]], Optional[int]]) -> NoReturn:
    """`sys.exit(main())`, with user errors printed as `error: ...` (prefixed by the rank when several
    processes run: each rank that hit it says so, there is no rank 0 to ask once it has failed)."""
    try:
        code = main(None)
    except Exception as error:
        if not isinstance(error, user_errors()):
            _end_every_rank(error, 1)
            raise
        world = int(os.environ.get("WORLD_SIZE", "1"))
        where = f"rank {os.environ.get('RANK', '?')}: " if world > 1 else ""
        print(f"{where}error: {error}", file=sys.stderr, flush=True)
        _end_every_rank(error, USER_ERROR_EXIT, traceback_too=False)
        code = USER_ERROR_EXIT
    sys.exit(code)


def _end_every_rank(error: Exception, code: int, traceback_too: bool = True) -> None:
    """In a multi-rank run: the traceback printed (when `traceback_too`), then
    `m2r.failure_watch.end_every_rank`, which does not return. Elsewhere nothing happens."""
    dist = sys.modules.get("m2r.dist")   # not imported: no process group
    if dist is None or not dist.is_multi_rank():
        return
    from m2r import failure_watch

    if traceback_too:
        traceback.print_exc()
    failure_watch.end_every_rank(f"{type(error).__name__}: {str(error)[:500]}", code)
