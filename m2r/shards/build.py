"""Build WebDataset shards from folders of images (format: shards/README.md).

Files are listed in a fixed order (source folder, then relative path) and cut into shards of
`samples_per_shard` consecutive files, so shard i always holds the same files and a rerun can skip
every shard already finished. A shard is written to `<name>.tmp`, renamed, and then recorded in a
`<name>.json` sidecar: a shard counts as finished only when both exist. The sidecar also records the
options that decide the shard's bytes, and a rerun with other options is refused rather than mixing
stale shards into the new build. The manifest is merged from the sidecars at the end. Pre-degraded
samples use a generator seeded by (seed, BUILD_TAG, index).
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from m2r.atomic import atomic_path, write_json_atomically
from m2r.config import ConfigError
from m2r.data.images import IMAGE_SUFFIXES, list_image_files, open_rgb
from m2r.data.presets import Degrader
from m2r.data.shard_format import MAX_SIDE, add_member, encode_image
from m2r.data.shard_list import MANIFEST_NAME

FORMAT = "m2r-shards/1"
BUILD_TAG = 4
# What PIL raises for a source file it cannot read or decode: unidentified or truncated files and
# I/O errors (OSError), malformed headers (ValueError, SyntaxError, EOFError), decompression bombs.
UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
# A data worker fills its shuffle buffer (512 samples by default) with whole shards drawn from the
# corpus (m2r/data/stream.py): 64 samples make that 8 shards a round, and a 1024 px zstd shard of
# 64 images is still about 100 MB, large enough to read sequentially.
DEFAULT_SAMPLES_PER_SHARD = 64


@dataclass
class BuildOptions:
    src: List[str]
    out: str
    preset: Optional[str] = None        # None = clean-only shards, degraded on the fly
    workers: int = 1
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD
    encoding: str = "zstd"              # "zstd" (raw uint8 + zstd) | "png"
    max_side: int = 0                   # downscale larger images to this long side; 0 = keep
    seed: int = 0


def list_source_images(sources: Sequence[str]) -> List[str]:
    """Every image under each source folder, recursively: sources in the given order, files sorted."""
    files = []
    for src in sources:
        root = Path(src)
        if not root.is_dir():
            raise FileNotFoundError(f"--src {src} is not a directory")
        files.extend(str(p) for p in list_image_files(root, recursive=True))
    return files


def load_image(path: str, max_side: int) -> np.ndarray:
    """RGB uint8, its longer side capped at `max_side` (0 = no cap); a side the shard format cannot
    hold is a ValueError naming the file (the builder skips and records it)."""
    rgb = open_rgb(Path(path))
    if max_side and max(rgb.size) > max_side:
        scale = max_side / max(rgb.size)
        rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.LANCZOS)
    if max(rgb.size) > MAX_SIDE:
        raise ValueError(f"{path}: {rgb.width}x{rgb.height} exceeds the shard format's {MAX_SIDE} px per side; "
                         f"--max-side {MAX_SIDE} or less downscales such images")
    return np.asarray(rgb)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def _sample_members(index: int, path: str, clean: np.ndarray, opts: BuildOptions, degrader: Optional[Degrader]):
    key = f"{index:09d}"
    meta = dict(src=path, size=list(clean.shape[:2]))
    ext, data = encode_image(clean, opts.encoding)
    members = [(f"{key}.clean.{ext}", data)]
    if degrader is not None:
        rng = np.random.default_rng((opts.seed, BUILD_TAG, index))
        lq, type_id, params = degrader(clean, rng)
        meta.update(type=degrader.types[type_id].name, type_id=type_id, params=params)
        ext, data = encode_image(lq, opts.encoding)
        members.append((f"{key}.lq.{ext}", data))
    members.append((f"{key}.json", json.dumps(meta).encode()))
    return members, meta.get("type", "clean")


def build_shard(job: Tuple[int, int, List[str], BuildOptions]) -> dict:
    """Write one shard; returns its sidecar record."""
    shard_index, first_sample, files, opts = job
    out = Path(opts.out)
    name = shard_name(shard_index)
    degrader = Degrader(opts.preset) if opts.preset else None
    type_counts, skipped, samples = {}, [], 0
    with atomic_path(out / name) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for offset, path in enumerate(files):
            try:
                clean = load_image(path, opts.max_side)
            except UNREADABLE_IMAGE_ERRORS as exc:
                skipped.append(dict(path=path, error=f"{type(exc).__name__}: {exc}"))
                continue
            members, type_name = _sample_members(first_sample + offset, path, clean, opts, degrader)
            for member_name, data in members:
                add_member(tar, member_name, data)
            type_counts[type_name] = type_counts.get(type_name, 0) + 1
            samples += 1
    record = dict(name=name, samples=samples, bytes=(out / name).stat().st_size, sha256=sha256_file(out / name),
                  type_counts=type_counts, skipped=skipped, built_with=content_options(opts, files))
    write_json_atomically((out / name).with_suffix(".json"), record)
    return record


def content_options(opts: BuildOptions, files: Sequence[str]) -> dict:
    """The options that decide a shard's bytes, with a hash of its source file list."""
    return dict(preset=opts.preset, seed=opts.seed, encoding=opts.encoding, max_side=opts.max_side,
                samples_per_shard=opts.samples_per_shard,
                files_sha256=hashlib.sha256("\n".join(files).encode()).hexdigest())


def _finished(job: Tuple[int, int, List[str], BuildOptions]) -> Optional[dict]:
    """The sidecar record of a shard finished by an earlier run with the same options, None if the
    shard is unfinished or no longer its recorded size (cut short since: rebuilt); a shard built with
    other options is refused, never reused or overwritten."""
    shard_index, _, files, opts = job
    out, name = Path(opts.out), shard_name(shard_index)
    sidecar = (out / name).with_suffix(".json")
    if not ((out / name).is_file() and sidecar.is_file()):
        return None
    record = json.loads(sidecar.read_text())
    changes = _option_changes(record.get("built_with", {}), content_options(opts, files))
    if changes:
        raise ConfigError(f"--out {out} already holds {name}, built with other options ({'; '.join(changes)}); "
                          f"use a new --out, or delete {out} to rebuild it")
    return record if record.get("bytes") == (out / name).stat().st_size else None


def _option_changes(then: dict, now: dict) -> List[str]:
    """'option then -> now' for each option that differs (sidecars of older builds recorded none).
    Another samples_per_shard also gives each shard other files: that change alone is named."""
    changes = []
    for key, value in now.items():
        before = then.get(key, "not recorded")
        if before == value:
            continue
        if key != "files_sha256":
            changes.append(f"{key} {before!r} -> {value!r}")
        elif then.get("samples_per_shard") == now["samples_per_shard"]:
            changes.append("source file list differs")
    return changes


def build(opts: BuildOptions, progress: bool = True) -> dict:
    """Build (or finish) the shards of `opts` and write the manifest; returns the manifest. `progress`
    shows a progress bar and says how many shards an earlier run had finished."""
    if opts.preset:
        Degrader(opts.preset)  # unknown presets fail before any work
    files = list_source_images(opts.src)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {opts.src}")
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    for unfinished in out.glob("shard-*.tmp"):   # a shard or sidecar an interrupted build was writing
        unfinished.unlink(missing_ok=True)
    size = opts.samples_per_shard
    jobs = [(i, i * size, files[i * size:(i + 1) * size], opts) for i in range((len(files) + size - 1) // size)]
    records = {job[0]: _finished(job) for job in jobs}
    todo = [job for job in jobs if records[job[0]] is None]
    if progress and len(todo) < len(jobs):
        print(f"{len(jobs) - len(todo)} of {len(jobs)} shards already built in {out} with these options: skipped")
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), unit="shard", disable=not progress,
               desc=f"shards -> {out}")
    if opts.workers > 1 and len(todo) > 1:
        with multiprocessing.get_context("spawn").Pool(min(opts.workers, len(todo))) as pool:
            for record in pool.imap_unordered(build_shard, todo):
                records[int(record["name"][6:12])] = record
                bar.update()
    else:
        for job in todo:
            records[job[0]] = build_shard(job)
            bar.update()
    bar.close()
    manifest = _manifest(opts, [records[i] for i in sorted(records)], len(files))
    write_json_atomically(out / MANIFEST_NAME, manifest)
    return manifest


def _manifest(opts: BuildOptions, shards: List[dict], files: int) -> dict:
    type_counts: dict = {}
    for shard in shards:
        for name, count in shard["type_counts"].items():
            type_counts[name] = type_counts.get(name, 0) + count
    skipped = [entry for shard in shards for entry in shard["skipped"]]
    return dict(format=FORMAT, mode="pairs" if opts.preset else "clean", preset=opts.preset,
                encoding=opts.encoding, seed=opts.seed, max_side=opts.max_side, sources=list(opts.src),
                files=files, samples=sum(s["samples"] for s in shards), skipped=skipped,
                type_counts=type_counts,
                shards=[{k: s[k] for k in ("name", "samples", "bytes", "sha256", "type_counts")} for s in shards])
