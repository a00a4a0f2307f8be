"""Load, override, validate and save typed configs.

A config file is YAML checked against an OmegaConf structured schema (dataclasses). A file may
start from other files with `_base_: [other.yaml, ../model/tiny.yaml@model]`: paths are relative
to the file, `@section` mounts a file under that key, and later entries override earlier ones (a file
that several bases start from is merged once, at its first place; one a `_base_` list names again after an
entry that started from it is merged again there, as the list orders it). A path
that starts with `m2r:` names a config shipped with the package (`m2r:model/m2restore.yaml`, the
repository's `configs/model/m2restore.yaml`), so a config of your own, anywhere, can start from them;
`--config m2r:pretrain/demo.yaml` works too.
Command-line `key=value` overrides come last. Unknown keys and wrong types fail with one
`ConfigError` that names the key and the file.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, Type

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from m2r.atomic import write_text_atomically

BASE_KEY = "_base_"
PACKAGED_PREFIX = "m2r:"
# The repository's configs/ (m2r/configs links to it; a built wheel holds the files themselves).
PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and the source."""


def config_error(key: str, message: str) -> ConfigError:
    """The error for a bad value of config key `key` (dotted, e.g. 'train.crop')."""
    return ConfigError(f"config error: key '{key}': {message}")


def require(ok: bool, key: str, value, rule: str) -> None:
    """Raise the ConfigError naming `key` and `value` unless `ok`."""
    if not ok:
        raise config_error(key, f"value {value!r} {rule}")


def choice(default: str, *options: str):
    """A schema field restricted to a few strings; `load_config` rejects any other value."""
    return dataclasses.field(default=default, metadata={"choices": (default,) + tuple(options)})


def _check_choices(schema: Type, cfg: DictConfig, prefix: str = "") -> None:
    types = typing.get_type_hints(schema)  # resolves string annotations too
    for f in dataclasses.fields(schema):
        value = cfg[f.name]
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise config_error(f"{prefix}{f.name}", f"'{value}' is not one of {list(choices)}")
        if dataclasses.is_dataclass(types[f.name]) and isinstance(value, DictConfig):
            _check_choices(types[f.name], value, f"{prefix}{f.name}.")


def config_path(entry: str | os.PathLike, relative_to: Path | None = None) -> Path:
    """Where a `--config` value or a `_base_` entry points: `m2r:<path>` in the shipped configs, else
    the path itself (a `_base_` entry's relative to the file that names it, `relative_to`)."""
    text = os.fspath(entry)
    if text.startswith(PACKAGED_PREFIX):
        return PACKAGED_CONFIGS / text[len(PACKAGED_PREFIX):]
    return Path(text) if relative_to is None else relative_to / text


def read_merged_yaml(path: str | os.PathLike) -> DictConfig:
    """A config file with its `_base_` files merged in, before any schema (which kind of config it is)."""
    return _read_yaml(config_path(path))


def _packaged_hint(path: Path) -> str:
    """The shipped config a missing one may have meant: of the same folder and name, else the one of that
    name; for a missing `m2r:` path, all of them."""
    shipped = sorted(p.relative_to(PACKAGED_CONFIGS).as_posix() for p in PACKAGED_CONFIGS.glob("*/*.yaml"))
    meant = [name for name in shipped if name == f"{path.parent.name}/{path.name}"] or \
        [name for name in shipped if name.endswith(f"/{path.name}")]
    if len(meant) == 1:
        return f"; the shipped one is m2r:{meant[0]}"
    if path.is_relative_to(PACKAGED_CONFIGS):
        return "; the shipped ones: " + ", ".join(f"m2r:{name}" for name in shipped)
    return ""


def _read_yaml(path: Path) -> DictConfig:
    """`path` merged over its `_base_` files. A file that several bases start from (tiny.yaml and
    m2restore-plus.yaml both start from m2restore.yaml) is merged once, at its first place: merged again,
    it would undo what the files between them set (tiny's sizes, or the plus switches). A file that a
    `_base_` list itself names after an entry that started from it (`[m2r:pretrain/demo.yaml,
    m2r:model/m2restore.yaml@model]`: the demo's settings, the full network) is merged again there."""
    merged = OmegaConf.create({})
    for layer in _layers(path, (), "", (), set()):
        merged = OmegaConf.merge(merged, layer)
    return merged


def _layers(path: Path, seen: tuple, named_by: str, section: tuple, merged_once: set) -> list:
    """The keys of `path` and of its bases, each file's own keys mounted under `section`, in merge order
    (bases first); a (file, section) already in `merged_once` gives nothing."""
    node, bases = _own_keys(path, seen, named_by)
    if (path.resolve(), section) in merged_once:
        return []
    merged_once.add((path.resolve(), section))
    layers, merged_by_earlier_entries = [], set()
    for entry in bases:
        file_part, _, mount = str(entry).partition("@")
        base, base_section = config_path(file_part, path.parent), section + ((mount,) if mount else ())
        # Named again after an entry of this list that merged it: the list's order says it comes after that one.
        merged_before = set(merged_once)
        relisted = (base.resolve(), base_section) in merged_by_earlier_entries
        layers += _layers(base, seen + (path.resolve(),), f"{BASE_KEY} entry '{file_part}' of {path}", base_section,
                          set() if relisted else merged_once)
        merged_by_earlier_entries |= merged_once - merged_before
    for key in reversed(section):
        node = OmegaConf.create({key: node})
    return layers + [node]


def _own_keys(path: Path, seen: tuple, named_by: str):
    """(the keys `path` sets itself, its `_base_` entries), the file checked."""
    if not path.is_file():
        where = f" ({named_by})" if named_by else ""
        raise ConfigError(f"config file not found: {path}{where}{_packaged_hint(path)}")
    if path.resolve() in seen:
        raise ConfigError(f"{BASE_KEY} cycle through {path}")
    try:
        node = OmegaConf.load(path)
    except Exception as exc:  # yaml syntax errors come in several types
        raise ConfigError(f"cannot parse {path}: {exc}") from exc
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: top level must be a mapping")
    bases = node.pop(BASE_KEY, [])
    if bases is None:   # `_base_:` with nothing after it: not iterable
        raise ConfigError(f"{path}: {BASE_KEY} names no file; give `{BASE_KEY}: [file.yaml, ...]` or remove it")
    if len(node) == 0 and not bases:   # a truncated copy would otherwise train the defaults (full network)
        raise ConfigError(f"{path} holds no keys (empty, or only comments)")
    if isinstance(bases, str):   # one base written without the list brackets
        bases = [bases]
    return node, bases


# What OmegaConf raises for a value the schema refuses; a list given for a mapping (`data.weights=[1]`)
# comes as a plain TypeError.
MERGE_ERRORS = (OmegaConfBaseException, TypeError)


def _merge_checked(schema: DictConfig, layer: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(schema, layer)
    except MERGE_ERRORS as exc:
        key = getattr(exc, "full_key", None) or _rejected_key(schema, OmegaConf.create(layer))
        reason = str(exc).splitlines()[0]
        raise ConfigError(f"config error in {source}: key '{key}': {reason}") from None


def _rejected_key(schema: DictConfig, layer: DictConfig, prefix: str = "") -> str:
    """The key of `layer` the schema refuses, found by merging one key at a time: OmegaConf's error
    names none when a whole section is given a scalar (`train: 5`)."""
    for key in layer:
        try:
            OmegaConf.merge(schema, {key: layer[key]})
        except MERGE_ERRORS:
            if key in schema and isinstance(schema[key], DictConfig) and isinstance(layer[key], DictConfig):
                return _rejected_key(schema[key], layer[key], f"{prefix}{key}.")
            return f"{prefix}{key}"
    return "?"


def load_config(schema: Type, path: str | os.PathLike | None = None,
                overrides: Sequence[str] = (), base: Mapping | None = None) -> DictConfig:
    """Schema defaults <- `base` (e.g. a config stored in a checkpoint) <- YAML file (with its bases)
    <- `key=value` overrides; every layer is checked; read-only result."""
    cfg = OmegaConf.structured(schema)
    if base is not None:
        cfg = _merge_checked(cfg, base, "the stored config")
    if path is not None:
        cfg = _merge_checked(cfg, read_merged_yaml(path), str(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value")
        cfg = _merge_checked(cfg, OmegaConf.from_dotlist([item]), f"override '{item}'")
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise config_error(key, str(exc).splitlines()[0]) from None
    _check_choices(schema, cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def save_config(cfg: DictConfig, path: str | os.PathLike) -> None:
    """Write the resolved config atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, OmegaConf.to_yaml(cfg, resolve=True))


def flatten(node: Mapping, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: a plain (nested) mapping as dotted keys."""
    flat = {}
    for key, value in node.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
