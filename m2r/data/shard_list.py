"""Turn `data.shards` (a shard directory or a brace pattern) into a sorted list of tar paths."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import List

from m2r.config import ConfigError

MANIFEST_NAME = "manifest.json"
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> List[str]:
    """`a-{000..002}.tar` -> a-000.tar a-001.tar a-002.tar (zero padding kept); `{x,y}` lists."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        first, last = numeric.groups()
        width = len(first) if first.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(first), int(last) + 1)]
    else:
        options = body.split(",")
    head, tail = pattern[:match.start()], pattern[match.end():]
    return [expanded for option in options for expanded in expand_braces(head + option + tail)]


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST_NAME
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no {MANIFEST_NAME} in shard directory {directory}") from None
    except ValueError as exc:
        raise ValueError(f"{path}: not valid json: {exc}") from None


def resolve_shards(spec: str, key: str = "data.shards") -> List[str]:
    """Shard paths named by a directory (its manifest, else every *.tar in it), a .tar file or a brace
    pattern; `key` is the config key errors name."""
    example = "dir/shard-{000000..000009}.tar"
    if not spec:
        raise ConfigError(f"{key} is empty: give a shard directory or a pattern like {example}")
    directory = Path(spec)
    if directory.is_dir():
        if (directory / MANIFEST_NAME).is_file():
            paths = [str(directory / s["name"]) for s in read_manifest(directory)["shards"]]
        else:
            paths = sorted(str(p) for p in directory.glob("*.tar"))
            _refuse_an_unfinished_build(directory, paths, key)
    elif spec.endswith(".tar") or _BRACE.search(spec):
        paths = expand_braces(spec)
    else:
        raise FileNotFoundError(f"{key}={spec} is neither a directory nor a .tar file or brace pattern "
                                f"(like {example})")
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"{key}={spec}: {len(missing)} shard(s) missing, first {missing[0]}")
    if not paths:
        raise FileNotFoundError(f"{key}={spec}: no shards found")
    return paths


def _refuse_an_unfinished_build(directory: Path, tars: List[str], key: str) -> None:
    """`m2r.shards build` writes its manifest last, and a `<shard>.json` beside each finished shard: sidecars
    without a manifest are a build that stopped (a full disk, a killed job), which would train on part of
    the corpus. Other WebDataset folders (no sidecars) are read as they are."""
    sidecars = [tar for tar in tars if Path(tar).with_suffix(".json").is_file()]
    if sidecars:
        raise ConfigError(f"{key}={directory}: {len(sidecars)} shard(s) of `m2r.shards build` but no {MANIFEST_NAME}: "
                          "the build did not finish; run the same build command again to complete it")
