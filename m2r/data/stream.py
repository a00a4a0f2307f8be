"""Deterministic, resumable training stream and the fixed validation set.

Each rank runs `max(1, data.workers)` logical workers. A logical worker reads the shards in rounds:
round r draws distinct shards from the whole corpus (a random permutation, restarted only when one
round needs more than the corpus) with a generator seeded by the ints (seed, rank, worker, r), keeps
their undecoded bytes until `shuffle_buffer` samples are held, shuffles them and serves every one.
Rounds are drawn independently, and every worker draws from every shard, so each sample is equally
likely whatever the number of shards, ranks and workers (a worker owning a fixed slice would serve
the samples of a slice with fewer shards more often); two workers may hold the same sample at once,
as sampling with replacement would. Sample j of round r is cropped, augmented and degraded with a
generator seeded by (seed, rank, worker, r, j). So the whole stream is a pure function of integers,
and a worker's position is just (round, offset): the checkpointed state is those cursors plus
counters, and resuming replays nothing but the current round's shard reads.

Batches are made inside the workers and served in worker round-robin order by the DataLoader;
after resuming at batch n, DataLoader worker i plays logical worker (i + n) % workers so the order
continues exactly. The stream is endless, so every rank can take the same number of steps.
"""
from __future__ import annotations

import dataclasses
import hashlib
import socket
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from m2r import dist
from m2r.config import ConfigError
from m2r.data.augment import random_crop, random_dihedral
from m2r.data.builtin import TRAIN_PHOTOS, VAL_PHOTOS, load_photo
from m2r.data.config import check_data_settings
from m2r.data.presets import Degrader, type_names
from m2r.data.shard_format import CorruptSample, decode_record, read_shard
from m2r.data.shard_list import read_manifest, resolve_shards
from m2r.dist import on_rank0, print0
from m2r.stop_signals import ignore_stop_signals, shut_down_workers

STREAM_TAG = 1          # first seed word after the run seed: training stream
ROUND_TAG = 2           # shard/photo choice of a round
VAL_TAG = 3             # validation crops and degradations
LOADER_TAG = 5          # the DataLoader's base seed for its worker processes
FRESH_TAG = 6           # a stream started afresh at a step (resume after a topology change)
BUILTIN_ROUND = 256     # samples per round of the builtin source
MAX_EMPTY_READS = 64    # consecutive shard reads without one sample before giving up (at least 2N - 1)
# A worker gives up after this many consecutive rounds, and at least this many samples, without one
# usable sample: an endless stream of damaged samples would hang its rank, and so every rank's
# collectives. Both bounds, so that a small shuffle_buffer over partly damaged shards cannot give up
# by bad luck.
MAX_BARREN_ROUNDS = 8
MIN_FAILED_SAMPLES = 256
MAX_DAMAGE_NOTES = 3    # damaged samples a rank keeps to name on the console, per log step


@dataclasses.dataclass(frozen=True)
class StreamPlan:
    """Everything a worker needs to produce its batches (picklable, no open files)."""
    source: str
    shards: Tuple[str, ...]
    preset: str
    weights: Tuple[Tuple[str, float], ...]
    seed: int
    rank: int
    world_size: int
    workers: int            # logical workers per rank (>= 1)
    micro_batch: int
    crop: int
    shuffle_buffer: int
    scale_range: Tuple[float, float]


# ----------------------------------------------------------------------------- sample sources

class _BuiltinSource:
    """Round = BUILTIN_ROUND indices into the training photos."""

    def __init__(self, plan: StreamPlan, worker: int):
        self.seed_words = (plan.seed, ROUND_TAG, plan.rank, worker)

    def round_records(self, round_index: int):
        rng = np.random.default_rng((*self.seed_words, round_index))
        return rng.integers(len(TRAIN_PHOTOS), size=BUILTIN_ROUND).tolist(), []

    @staticmethod
    def decode(record):
        return load_photo(TRAIN_PHOTOS[record]), None, {}


def _shard_draws(rng: np.random.Generator, count: int) -> Iterator[int]:
    """Shard indices: permutations of range(count), one after another."""
    while True:
        yield from rng.permutation(count).tolist()


class _ShardSource:
    """Round = distinct whole shards drawn from the corpus until `shuffle_buffer` samples, shuffled. A
    record is (shard path, undecoded sample), so that errors can say where a sample lives."""

    def __init__(self, plan: StreamPlan, worker: int):
        self.shards = plan.shards
        self.buffer = plan.shuffle_buffer
        self.preset = plan.preset
        self.seed_words = (plan.seed, ROUND_TAG, plan.rank, worker)
        self.where = f"data worker {worker} of rank {plan.rank}"

    def round_records(self, round_index: int):
        rng = np.random.default_rng((*self.seed_words, round_index))
        records: List[Tuple[str, dict]] = []
        damaged: List[str] = []   # why each damaged shard read stopped
        empty: List[str] = []   # the shard reads in a row that gave no sample, each with why
        draws = _shard_draws(rng, len(self.shards))
        while len(records) < self.buffer:
            before = len(records)
            shard = self.shards[next(draws)]
            problem = f"{shard}: no samples"
            try:
                records.extend((shard, sample) for sample in read_shard(shard))
            except CorruptSample as exc:
                problem = str(exc)
                damaged.append(problem)
            if len(records) > before:
                empty.clear()
            else:
                empty.append(problem)
            # 2N - 1 draws in a row hold a whole permutation: every shard has then given nothing
            if len(empty) >= max(MAX_EMPTY_READS, 2 * len(self.shards) - 1):
                last = list(dict.fromkeys(reversed(empty)))[:3]
                raise RuntimeError(f"{self.where}: {len(empty)} shard reads in a row gave no sample "
                                   f"({len(set(empty))} distinct shards of the {len(self.shards)}); the last: "
                                   + "; ".join(last))
        order = rng.permutation(len(records))
        return [records[i] for i in order], damaged

    def decode(self, record):
        return _decode_shard_sample(*record, self.preset)


def _decode_shard_sample(shard: str, sample: dict, preset: str):
    """`decode_record` naming the shard in its errors. A pre-degraded sample of a type outside
    `preset` is a configuration error (ConfigError), not a damaged sample to skip."""
    try:
        clean, lq, meta = decode_record(sample)
    except CorruptSample as exc:
        raise CorruptSample(f"shard {shard}: {exc}") from None
    names = type_names(preset)
    if lq is not None and meta.get("type") not in names:
        raise ConfigError(f"shard {shard}, sample {sample.get('__key__')}: pre-degraded type {meta.get('type')!r} "
                          f"is not in data.preset '{preset}' {names}; stream these shards with the preset "
                          f"they were built with")
    return clean, lq, meta


def _make_source(plan: StreamPlan, worker: int):
    return _BuiltinSource(plan, worker) if plan.source == "builtin" else _ShardSource(plan, worker)


# ----------------------------------------------------------------------------- pairs and batches

def planar(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) view, any strides -> C-contiguous (3, H, W), the layout of batches and degradations."""
    return np.ascontiguousarray(img.transpose(2, 0, 1))


def make_pair(clean: np.ndarray, lq: Optional[np.ndarray], meta: dict, rng: np.random.Generator,
              degrader: Degrader, crop: int, scale_range=(1.0, 1.0)):
    """(H, W, 3) images -> (lq, gt uint8 (3, crop, crop), type_id). Clean-only samples are augmented
    (all 8 square symmetries) and then degraded; pre-degraded pairs are only flipped left-right, as
    rain, snow and haze have an up."""
    if lq is None:
        (gt,) = random_crop([clean], crop, rng, scale_range)
        (gt,) = random_dihedral([gt], rng)
        gt = planar(gt)
        type_id = degrader.sample_type(rng)
        lq_img, _ = degrader.degrade_planes(gt, type_id, rng)
        return lq_img, gt, type_id
    gt, lq_img = random_crop([clean, lq], crop, rng, scale_range)
    gt, lq_img = random_dihedral([gt, lq_img], rng, rotate=False)
    # Its type is in the preset: `_decode_shard_sample` checked, naming the shard.
    return planar(lq_img), planar(gt), [t.name for t in degrader.types].index(meta["type"])


def collate(lq: Sequence[np.ndarray], gt: Sequence[np.ndarray], type_ids: Sequence[int]) -> Dict[str, torch.Tensor]:
    """uint8 (3, H, W) images -> dict(lq, gt uint8 (B, 3, H, W), type_id int64 (B,))."""
    return dict(lq=torch.from_numpy(np.stack(lq)), gt=torch.from_numpy(np.stack(gt)),
                type_id=torch.tensor(type_ids, dtype=torch.int64))


def keep_notes(notes: List[str], new: Sequence[str]) -> None:
    """Add `new` to `notes` while it holds fewer than MAX_DAMAGE_NOTES."""
    notes.extend(new[:max(0, MAX_DAMAGE_NOTES - len(notes))])   # new[:-k] would add all but k


def worker_batches(plan: StreamPlan, worker: int, cursor: Tuple[int, int]) -> Iterator[dict]:
    """Endless batches of one logical worker from `cursor` = (round, offset), each tagged with the
    cursor after it, the count of corrupt samples skipped since the previous batch and what the first
    few of them were (`damage`: messages naming their shards)."""
    source = _make_source(plan, worker)
    degrader = Degrader(plan.preset, dict(plan.weights))
    round_index, start = cursor
    lq, gt, type_ids, corrupt, damage = [], [], [], 0, []
    barren_rounds, failed, last_error = 0, 0, None     # since the last usable sample
    while True:
        records, round_damage = source.round_records(round_index)
        if start == 0:   # a round resumed at an offset had its damaged shard reads counted before the save
            corrupt += len(round_damage)
            keep_notes(damage, round_damage)
        served = False
        for offset in range(start, len(records)):
            rng = np.random.default_rng((plan.seed, STREAM_TAG, plan.rank, worker, round_index, offset))
            try:
                clean, lq_in, meta = source.decode(records[offset])
                pair = make_pair(clean, lq_in, meta, rng, degrader, plan.crop, plan.scale_range)
            except CorruptSample as exc:
                corrupt, failed, last_error = corrupt + 1, failed + 1, exc
                keep_notes(damage, [str(exc)])
                continue
            served, failed = True, 0
            lq.append(pair[0]), gt.append(pair[1]), type_ids.append(pair[2])
            if len(lq) == plan.micro_batch:
                batch = collate(lq, gt, type_ids)
                batch.update(worker=worker, cursor_round=round_index, cursor_offset=offset + 1, corrupt=corrupt,
                             damage=damage)
                yield batch
                lq, gt, type_ids, corrupt, damage = [], [], [], 0, []
        barren_rounds = 0 if served else barren_rounds + 1
        if barren_rounds >= MAX_BARREN_ROUNDS and failed >= MIN_FAILED_SAMPLES:
            raise _no_usable_samples(plan, worker, barren_rounds, failed, last_error)
        round_index, start = round_index + 1, 0


def _no_usable_samples(plan: StreamPlan, worker: int, rounds: int, failed: int, last_error) -> RuntimeError:
    shards = plan.shards
    named = ", ".join(shards[:8]) + (f", ... ({len(shards)} in all)" if len(shards) > 8 else "")
    return RuntimeError(f"data worker {worker} of rank {plan.rank}: {rounds} rounds in a row ({failed} samples) "
                        f"without one usable sample from the shards {named}; last error: {last_error}")


class _WorkerStream(IterableDataset):
    def __init__(self, plan: StreamPlan, batches_served: int, cursors: Tuple[Tuple[int, int], ...]):
        self.plan, self.batches_served, self.cursors = plan, batches_served, cursors

    def __iter__(self):
        info = get_worker_info()
        worker = ((info.id if info else 0) + self.batches_served) % self.plan.workers
        return worker_batches(self.plan, worker, self.cursors[worker])


class TrainStream:
    """Iterable of dict(lq, gt uint8 (B,3,H,W), type_id int64 (B,)), endless, resumable."""

    def __init__(self, plan: StreamPlan, loader_processes: int, pin_memory: bool = False):
        self.plan = plan
        self._run_seed = plan.seed
        self._fresh_from: Optional[int] = None
        # DataLoader processes (0: batches made in this one); plan.workers are the logical streams they serve
        self.loader_processes = loader_processes
        # page-locked batches: their copy to the GPU is asynchronous (a pageable one blocks the host until the GPU
        # has run everything queued before it, so the next micro-batch's kernels are not queued meanwhile)
        self.pin_memory = pin_memory
        self.names = type_names(plan.preset)
        self._batches = 0
        self._cursors: List[Tuple[int, int]] = [(0, 0)] * plan.workers
        self._type_counts = [0] * len(self.names)
        self._corrupt = 0
        self._damage: List[str] = []   # the first few damaged samples since `take_damage_notes`, not saved

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        dataset = _WorkerStream(self.plan, self._batches, tuple(self._cursors))
        loader = DataLoader(dataset, batch_size=None, num_workers=self.loader_processes,
                            prefetch_factor=4 if self.loader_processes else None, generator=self._loader_generator(),
                            worker_init_fn=ignore_stop_signals, pin_memory=self.pin_memory)
        batches = iter(loader)
        try:
            for batch in batches:
                worker = int(batch.pop("worker"))
                self._cursors[worker] = (int(batch.pop("cursor_round")), int(batch.pop("cursor_offset")))
                self._corrupt += int(batch.pop("corrupt"))
                keep_notes(self._damage, batch.pop("damage"))
                for type_id, count in enumerate(torch.bincount(batch["type_id"], minlength=len(self.names)).tolist()):
                    self._type_counts[type_id] += count
                self._batches += 1
                yield batch
        finally:   # also on close() or an exception: see shut_down_workers
            shut_down_workers(batches)

    def _loader_generator(self) -> torch.Generator:
        """Seeded from integers, so the DataLoader never draws its workers' base seed from the
        global torch RNG (the batches themselves come from integer-seeded numpy generators)."""
        words = (self.plan.seed, LOADER_TAG, self.plan.rank, self._batches)
        return torch.Generator().manual_seed(int(np.random.default_rng(words).integers(2 ** 63)))

    def stats(self) -> Dict[str, object]:
        """Samples served per degradation type and corrupt samples skipped, on this rank so far."""
        return dict(samples_by_type=dict(zip(self.names, self._type_counts)), corrupt_samples=self._corrupt)

    def take_damage_notes(self) -> List[str]:
        """What the first few corrupt samples skipped on this rank since the last call were, each naming
        its shard (the count in `stats` is exact; these are for the console)."""
        notes, self._damage = self._damage, []
        return notes

    def _fresh_plan(self, step: int) -> StreamPlan:
        words = (self._run_seed, FRESH_TAG, step)
        return dataclasses.replace(self.plan, seed=int(np.random.default_rng(words).integers(2 ** 31)))

    def start_fresh(self, step: int) -> None:
        """Draw a new stream from its start (counters too), seeded by (run seed, step), for a resume whose
        saved positions cannot apply (another world size or ep_size, other data settings): the run's
        first batches are not served again."""
        self.plan, self._fresh_from = self._fresh_plan(step), step
        self._batches, self._cursors = 0, [(0, 0)] * self.plan.workers
        self._type_counts, self._corrupt = [0] * len(self.names), 0

    def state_dict(self) -> dict:
        return dict(plan=_fingerprint(self.plan), batches=self._batches,
                    cursors=[list(c) for c in self._cursors], type_counts=list(self._type_counts),
                    corrupt=self._corrupt, fresh_from=self._fresh_from)

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was taken; the plan (seed, rank, topology, shapes, data)
        must match, since positions are only meaningful in the stream they came from (StreamMismatch,
        the stream unchanged, otherwise)."""
        fresh_from = state.get("fresh_from")
        plan = self._fresh_plan(fresh_from) if fresh_from is not None else self.plan
        saved, current = state["plan"], _fingerprint(plan)
        differing = {k: (saved.get(k), current[k]) for k in current if _jsonish(saved.get(k)) != _jsonish(current[k])}
        if differing:
            raise StreamMismatch(differing)
        self.plan, self._fresh_from = plan, fresh_from
        self._batches = int(state["batches"])
        self._cursors = [tuple(int(v) for v in c) for c in state["cursors"]]
        self._type_counts = [int(v) for v in state["type_counts"]]
        self._corrupt = int(state["corrupt"])


def _fingerprint(plan: StreamPlan) -> dict:
    fields = dataclasses.asdict(plan)
    fields["shards"] = len(plan.shards)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}


class StreamMismatch(ValueError):
    """A saved stream position from a stream drawn with other settings; `differing`: name -> (saved, now)."""

    def __init__(self, differing: dict):
        self.differing = differing
        changes = ", ".join(f"{name} {saved!r} -> {now!r}" for name, (saved, now) in differing.items())
        super().__init__(f"data stream state does not match this run: {changes}")


def _jsonish(value):
    """Compare lists/tuples and nested pairs alike (a state may have gone through json or torch.save)."""
    if isinstance(value, (list, tuple)):
        return [_jsonish(v) for v in value]
    return value


# ----------------------------------------------------------------------------- builders

def _folder_manifests(shards: Sequence[str]) -> Dict[str, dict]:
    """Folder -> its manifest.json, for each folder holding shards (a directory or a brace pattern) that has one."""
    manifests = {}
    for folder in sorted({str(Path(shard).parent) for shard in shards}):
        try:
            manifests[folder] = read_manifest(folder)
        except FileNotFoundError:
            continue
    return manifests


def _manifest_preset_check(cfg, manifests: Dict[str, dict]) -> None:
    """Pre-degraded shards were made with one preset; streaming them under another is a config error.
    Checked here against the manifest of each folder holding shards, and again per sample as it is read,
    for shards without a manifest."""
    for folder, manifest in manifests.items():
        if manifest.get("mode") == "pairs" and manifest.get("preset") != cfg.preset:
            raise ConfigError(f"data.preset '{cfg.preset}' but the pre-degraded shards in {folder} "
                              f"were built with preset '{manifest.get('preset')}'")


def _recorded_sizes(manifests: Dict[str, dict]) -> Dict[str, int]:
    """Shard path -> its size in bytes as its folder's manifest records it (shards without a manifest: none)."""
    return {str(Path(folder) / entry["name"]): entry["bytes"] for folder, manifest in manifests.items()
            for entry in manifest.get("shards", []) if "bytes" in entry}


def _wrong_sizes(shards: Sequence[str], recorded: Dict[str, int]) -> List[str]:
    """The shards of this node's copy that are missing, of 0 bytes, or not the size their manifest records."""
    wrong = []
    for shard in shards:
        try:
            size = Path(shard).stat().st_size
        except FileNotFoundError:
            wrong.append(f"{shard}: missing")
            continue
        expected = recorded.get(str(Path(shard)))
        if size == 0 or (expected is not None and size != expected):
            wrong.append(f"{shard}: {size} bytes" + (f", the manifest says {expected}" if expected is not None else ""))
    return wrong


def _size_error(cfg, count: int, first: str, where: str = "") -> ConfigError:
    return ConfigError(f"data.shards={cfg.shards}: {count} shard(s) {where}missing, empty or not the size their "
                       f"manifest.json records (cut short or replaced since the build?), first {first}; "
                       "`python -m m2r.shards inspect DIR` checks every shard of a build")


def _manifest_size_check(cfg, shards: Sequence[str], recorded: Dict[str, int]) -> None:
    """A shard of 0 bytes, or whose size is not the one its folder's manifest records, was cut short (a copy
    or sync that stopped, a full disk) or replaced since the build: the stream would skip what it cannot
    read, counting a whole lost shard as one damaged sample, and train on part of the corpus. Refused at
    start, naming it (one stat per shard, on rank 0; every other node checks its own copy in
    `_each_node_checks_its_copy`)."""
    wrong = _wrong_sizes(shards, recorded)
    if wrong:
        raise _size_error(cfg, len(wrong), wrong[0])


def _each_node_checks_its_copy(cfg, shards: Sequence[str], recorded: Dict[str, int]) -> None:
    """Rank 0 checked its node's copy; the first rank of every other node checks its own (node-local staging
    cut short by a full disk or a stopped copy), and every rank raises the same error, naming the host."""
    if not dist.is_multi_rank():
        return
    wrong = _wrong_sizes(shards, recorded) if dist.is_local_rank0() and not dist.is_rank0() else []
    reports = dist.all_gather_object((socket.gethostname(), len(wrong), wrong[0]) if wrong else None)
    bad = [report for report in reports if report]
    if bad:
        host, count, first = bad[0]
        more = f" (and {len(bad) - 1} more node(s))" if len(bad) > 1 else ""
        raise _size_error(cfg, count, first, f"on host {host}{more} ")


def _checked_shards(cfg) -> Tuple[Tuple[str, ...], Dict[str, int]]:
    shards = tuple(resolve_shards(cfg.shards))
    manifests = _folder_manifests(shards)   # read once, for both checks
    _manifest_preset_check(cfg, manifests)
    recorded = _recorded_sizes(manifests)
    _manifest_size_check(cfg, shards, recorded)
    return shards, recorded


def build_train_stream(cfg, *, seed: int, rank: int, world_size: int, micro_batch: int, crop: int,
                       pin_memory: bool = False) -> TrainStream:
    """The training stream of this rank (see the module docstring). Every rank calls it: rank 0 lists the
    shards for all (ranks listing a shared folder themselves could draw from different corpora). `pin_memory`:
    batches in page-locked memory, for a CUDA device."""
    check_data_settings(cfg)
    workers = max(1, int(cfg.workers))
    shards: Tuple[str, ...] = ()
    if cfg.source == "shards":
        shards, recorded = on_rank0(lambda: _checked_shards(cfg))
        _each_node_checks_its_copy(cfg, shards, recorded)
    scale = tuple(float(v) for v in cfg.scale_range)
    plan = StreamPlan(source=cfg.source, shards=shards, preset=cfg.preset,
                      weights=tuple(sorted((str(k), float(v)) for k, v in dict(cfg.weights).items())),
                      seed=int(seed) + int(cfg.seed_offset), rank=rank, world_size=world_size, workers=workers,
                      micro_batch=micro_batch, crop=crop, shuffle_buffer=int(cfg.shuffle_buffer), scale_range=scale)
    where = f"{len(shards)} shards from {cfg.shards}" if shards else "builtin sample photos"
    loaders = int(cfg.workers)
    makers = f"{loaders} loader process{'es' * (loaders > 1)} per rank" if loaders else \
        "batches made in the training process: data.workers=0"
    print0(f"data: {where}, preset {cfg.preset}, {world_size} ranks x {workers} logical stream{'s' * (workers > 1)} "
           f"({makers}), micro batch {micro_batch}, crop {crop}")
    return TrainStream(plan, loader_processes=loaders, pin_memory=pin_memory)


def _val_images(cfg, shards: List[str], count: int) -> List[Tuple[np.ndarray, Optional[np.ndarray], dict]]:
    if not cfg.val_shards:
        return [(load_photo(VAL_PHOTOS[i % len(VAL_PHOTOS)]), None, {}) for i in range(count)]
    images = []
    for path in shards:
        for record in read_shard(path):
            images.append(_decode_shard_sample(path, record, cfg.preset))
            if len(images) == count:
                return images
    if not images:
        raise ConfigError(f"data.val_shards={cfg.val_shards} holds no samples")
    return [images[i % len(images)] for i in range(count)]


def build_val_set(cfg, crop: int) -> List[Dict[str, torch.Tensor]]:
    """Fixed held-out batches, identical on every rank: `val_samples_per_type` crops per type of
    the preset, each degraded with its type by a generator seeded from (VAL_TAG, index). Each rank reads its own
    copy of the shards: a read failing on one node fails on every rank, and a set read otherwise is refused."""
    check_data_settings(cfg)
    # listed by rank 0 for all, as the training shards are: a rank whose listing lagged would otherwise
    # fail (or read other samples) alone, and the others would wait for it in the next collective
    shards = on_rank0(lambda: resolve_shards(cfg.val_shards, "data.val_shards")) if cfg.val_shards else []
    batches = dist.failing_together(lambda: _degraded_val_batches(cfg, shards, crop))
    require_the_same_set_on_every_rank(batches, f"data.val_shards={cfg.val_shards}" if cfg.val_shards
                                       else "the built-in validation photos")
    return batches


def _degraded_val_batches(cfg, shards: List[str], crop: int) -> List[Dict[str, torch.Tensor]]:
    degrader = Degrader(cfg.preset, dict(cfg.weights))
    count = int(cfg.val_samples_per_type) * len(degrader.types)
    lq, gt, type_ids = [], [], []
    for index, (clean, lq_in, meta) in enumerate(_val_images(cfg, shards, count)):
        rng = np.random.default_rng((VAL_TAG, index))
        if lq_in is None:
            (target,) = random_crop([clean], crop, rng)
            target, type_id = planar(target), index % len(degrader.types)
            degraded, _ = degrader.degrade_planes(target, type_id, rng)
        else:
            degraded, target, type_id = make_pair(clean, lq_in, meta, rng, degrader, crop)
        lq.append(degraded), gt.append(target), type_ids.append(type_id)
    size = int(cfg.val_batch_size)
    return [collate(lq[i:i + size], gt[i:i + size], type_ids[i:i + size]) for i in range(0, count, size)]


def _digest(batches: Sequence[Dict[str, torch.Tensor]]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for batch in batches:
        for name in ("lq", "gt", "type_id"):
            digest.update(batch[name].numpy().tobytes())
    return digest.hexdigest()


def require_the_same_set_on_every_rank(batches: Sequence[Dict[str, torch.Tensor]], source: str) -> None:
    """Each rank scores its share of the validation batches (pretraining's, a finetuning's) from its own copy of the
    set, read from `source`: a node whose files differ (a node-local copy of others) or whose libraries decode or
    degrade otherwise would mix other images into the metrics without a word. One digest per rank, compared with
    rank 0's (a collective: every rank calls it)."""
    if not dist.is_multi_rank():
        return
    digests = dist.all_gather_object((_digest(batches), socket.gethostname()))
    differing = [(rank, host) for rank, (digest, host) in enumerate(digests) if digest != digests[0][0]]
    if differing:
        (rank, host), more = differing[0], len(differing) - 1
        raise ConfigError(f"{source}: the validation set built by rank {rank} on host {host}"
                          f"{f' (and {more} more rank(s))' if more else ''} differs from rank 0's: every node must "
                          "read the same validation files with the same library versions (numpy, Pillow, scikit-image)")
