"""What every command-line entry point shares: a user's mistake (a config key, a path, a dataset
layout, weights that do not fit) ends in one line naming it and exit status 2, not a traceback.
Anything else is a bug or a crash, and keeps its traceback.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, NoReturn, Optional, Sequence

from m2r.config import ConfigError
from m2r.models.convert import CheckpointMismatch

USER_ERRORS = (ConfigError, FileNotFoundError, NotADirectoryError, CheckpointMismatch)
USER_ERROR_EXIT = 2


def run_main(main: Callable[[Optional[Sequence[str]]], Optional[int]]) -> NoReturn:
    """`sys.exit(main())`, with USER_ERRORS printed as `error: ...` (prefixed by the rank when several
    processes run: each rank that hit it says so, there is no rank 0 to ask once it has failed)."""
    try:
        code = main(None)
    except USER_ERRORS as error:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        where = f"rank {os.environ.get('RANK', '?')}: " if world > 1 else ""
        print(f"{where}error: {error}", file=sys.stderr, flush=True)
        code = USER_ERROR_EXIT
    sys.exit(code)
