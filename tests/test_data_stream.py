"""The training stream: 2 ranks x 2 workers, equal steps, exact resume, corrupt samples, val set,
and the errors that stop a stream instead of letting it hang."""
import itertools
import multiprocessing
import re
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from m2r.config import ConfigError
from m2r.data import DataConfig, build_train_stream, build_val_set
from m2r.data.builtin import TRAIN_PHOTOS, load_photo
from m2r.data.presets import type_names
from m2r.data.shard_format import CorruptSample, add_member
from m2r.data.stream import _ShardSource
from m2r.shards.build import BuildOptions, build

CROP, BATCH = 32, 3


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """40 crops of 48 x 48 from the sample photos."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(1)
    for i in range(40):
        img = load_photo(TRAIN_PHOTOS[i % len(TRAIN_PHOTOS)])
        y, x = (int(rng.integers(0, n - 48)) for n in img.shape[:2])
        Image.fromarray(img[y:y + 48, x:x + 48]).save(folder / f"{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def shard_dir(photos, tmp_path_factory):
    """8 clean shards of 5 photo crops each."""
    out = tmp_path_factory.mktemp("shards")
    build(BuildOptions(src=[str(photos)], out=str(out), samples_per_shard=5), progress=False)
    return out


@pytest.fixture(scope="module")
def allweather_pairs(photos, tmp_path_factory):
    """4 shards of 2 pairs pre-degraded with the allweather preset, with their manifest."""
    out = tmp_path_factory.mktemp("pairs")
    sources = tmp_path_factory.mktemp("eight_photos")
    for name in sorted(p.name for p in photos.iterdir())[:8]:
        (sources / name).write_bytes((photos / name).read_bytes())
    build(BuildOptions(src=[str(sources)], out=str(out), preset="allweather", samples_per_shard=2), progress=False)
    return out


def shard_config(shard_dir, **kw):
    return DataConfig(source="shards", shards=str(shard_dir), preset="five-task", workers=2, shuffle_buffer=8, **kw)


def take(stream, n):
    return list(itertools.islice(iter(stream), n))


def same_batches(a, b):
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in ("lq", "gt", "type_id"))


def test_two_ranks_two_workers_get_equal_steps_of_distinct_data(shard_dir):
    streams = [build_train_stream(shard_config(shard_dir), seed=5, rank=r, world_size=2, micro_batch=BATCH, crop=CROP)
               for r in range(2)]
    batches = [take(s, 7) for s in streams]
    assert [len(b) for b in batches] == [7, 7]
    for batch in batches[0]:
        assert set(batch) == {"lq", "gt", "type_id"}
        assert batch["lq"].dtype == batch["gt"].dtype == torch.uint8
        assert batch["lq"].shape == batch["gt"].shape == (BATCH, 3, CROP, CROP)
        assert batch["type_id"].dtype == torch.int64 and batch["type_id"].shape == (BATCH,)
    assert not torch.equal(batches[0][0]["gt"], batches[1][0]["gt"])
    stats = streams[0].stats()
    assert sum(stats["samples_by_type"].values()) == 7 * BATCH and stats["corrupt_samples"] == 0
    assert set(stats["samples_by_type"]) == set(type_names("five-task"))


@pytest.mark.parametrize("stop", [4, 5])   # resume on either worker's turn
def test_resume_continues_exactly_like_an_uninterrupted_stream(shard_dir, stop):
    def make():
        return build_train_stream(shard_config(shard_dir), seed=5, rank=1, world_size=2, micro_batch=BATCH, crop=CROP)
    uninterrupted = make()
    reference = take(uninterrupted, stop + 6)       # crosses round boundaries (8 samples per round)
    first = make()
    head = take(first, stop)
    state = first.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    tail = take(resumed, 6)
    assert same_batches(head + tail, reference)
    assert resumed.stats() == uninterrupted.stats()     # per-type counts resume too


def test_a_fresh_start_after_a_topology_change_serves_new_data_and_resumes_exactly(shard_dir):
    def make():
        return build_train_stream(shard_config(shard_dir), seed=5, rank=0, world_size=1, micro_batch=BATCH, crop=CROP)
    first_batches = take(make(), 2)
    fresh = make()
    fresh.start_fresh(step=400)
    head = take(fresh, 2)
    assert not any(torch.equal(a["gt"], b["gt"]) for a in head for b in first_batches)
    later = make()
    later.start_fresh(step=800)    # a second topology change does not replay the first one's data
    assert not any(torch.equal(a["gt"], b["gt"]) for a in take(later, 2) for b in head)
    reference = make()
    reference.start_fresh(step=400)
    resumed = make()
    resumed.load_state_dict(fresh.state_dict())   # the exact resume of the run that started afresh
    assert same_batches(take(resumed, 3), take(reference, 5)[2:])


def test_builtin_source_needs_no_files_and_resumes_in_process():
    cfg = DataConfig(source="builtin", preset="cdd11", workers=0, scale_range=[0.5, 1.0])
    def make():
        return build_train_stream(cfg, seed=1, rank=0, world_size=1, micro_batch=2, crop=CROP)
    reference = take(make(), 5)
    first = make()
    take(first, 2)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    assert same_batches(reference[2:], take(resumed, 3))


def test_state_from_another_topology_is_refused(shard_dir):
    stream = build_train_stream(shard_config(shard_dir), seed=5, rank=0, world_size=2, micro_batch=BATCH, crop=CROP)
    other = build_train_stream(shard_config(shard_dir), seed=5, rank=0, world_size=1, micro_batch=BATCH, crop=CROP)
    with pytest.raises(ValueError, match="world_size"):
        other.load_state_dict(stream.state_dict())


@pytest.mark.parametrize("field, other", [("rank", dict(seed=5, rank=1)), ("seed", dict(seed=6, rank=0))])
def test_state_of_another_rank_or_seed_is_refused(shard_dir, field, other):
    """Positions are positions in one rank's stream of one seed: elsewhere they would be another stream's."""
    stream = build_train_stream(shard_config(shard_dir), seed=5, rank=0, world_size=2, micro_batch=BATCH, crop=CROP)
    elsewhere = build_train_stream(shard_config(shard_dir), world_size=2, micro_batch=BATCH, crop=CROP, **other)
    with pytest.raises(ValueError, match=field):
        elsewhere.load_state_dict(stream.state_dict())


def test_every_worker_draws_from_every_shard_whatever_the_number_of_ranks_and_workers(shard_dir):
    """8 shards over 3 ranks x 3 workers, more slots than shards: each worker reads from the whole
    corpus (a worker owning a fixed slice would serve the samples of a smaller slice more often),
    and a round reads distinct shards."""
    from m2r.data.stream import _ShardSource

    for rank, worker in itertools.product(range(3), range(3)):
        stream = build_train_stream(DataConfig(source="shards", shards=str(shard_dir), workers=3, shuffle_buffer=20),
                                    seed=0, rank=rank, world_size=3, micro_batch=1, crop=CROP)
        source = _ShardSource(stream.plan, worker)
        read = set()
        for round_index in range(10):
            shards = [shard for shard, _ in source.round_records(round_index)[0]]
            assert len(set(shards)) == len(shards) // 5 == 4   # 4 distinct shards of 5 samples fill 20
            read.update(shards)
        assert len(read) == 8


def copy_damaged(good, copy, damage):
    """Copy shard `good` to `copy` with every image member whose name `damage` accepts truncated."""
    with tarfile.open(good) as src, tarfile.open(copy, "w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            add_member(dst, member.name, data[:20] if member.name.endswith(".zst") and damage(member.name) else data)


def test_corrupt_samples_are_counted_and_skipped(shard_dir, tmp_path):
    """Two shards whose first sample's image is truncated: those samples are skipped, not fatal."""
    good = sorted(shard_dir.glob("*.tar"))[0]
    first_key = tarfile.open(good).getnames()[0].split(".")[0]
    for copy in ("bad-0.tar", "bad-1.tar"):
        copy_damaged(good, tmp_path / copy, lambda name: name.startswith(first_key))
    cfg = DataConfig(source="shards", shards=f"{tmp_path}/bad-{{0..1}}.tar", preset="five-task",
                     workers=0, shuffle_buffer=10)
    stream = build_train_stream(cfg, seed=0, rank=0, world_size=1, micro_batch=2, crop=CROP)
    assert len(take(stream, 6)) == 6
    assert stream.stats()["corrupt_samples"] >= 2
    notes = stream.take_damage_notes()   # the first few, for the console, each naming its shard
    assert 1 <= len(notes) <= 3 and all(re.match(rf"shard {tmp_path}/bad-[01]\.tar: sample", n) for n in notes)
    assert stream.take_damage_notes() == []


def test_a_shuffle_buffer_below_one_is_refused(shard_dir):
    cfg = DataConfig(source="shards", shards=str(shard_dir), workers=0, shuffle_buffer=0)
    with pytest.raises(ConfigError, match=r"key 'data\.shuffle_buffer': value 0 must be at least 1"):
        build_train_stream(cfg, seed=0, rank=0, world_size=1, micro_batch=1, crop=CROP)


@pytest.mark.timeout(20)   # before the fix this hung
def test_a_worker_whose_every_sample_is_damaged_stops_with_an_error_instead_of_hanging(shard_dir, tmp_path):
    """A hung rank would hang every rank's collectives: the error names the shards, how long
    it tried and the last damage seen."""
    good = sorted(shard_dir.glob("*.tar"))[0]
    for copy in ("bad-0.tar", "bad-1.tar"):
        copy_damaged(good, tmp_path / copy, lambda name: True)
    cfg = DataConfig(source="shards", shards=f"{tmp_path}/bad-{{0..1}}.tar", preset="five-task",
                     workers=0, shuffle_buffer=8)
    stream = build_train_stream(cfg, seed=0, rank=0, world_size=1, micro_batch=2, crop=CROP)
    pattern = (r"data worker 0 of rank 0: \d+ rounds in a row \(\d+ samples\) without one usable sample "
               r"from the shards .*bad-0\.tar, .*bad-1\.tar; last error: shard .*bad-\d\.tar: sample \d{9}: "
               r"cannot decode")
    with pytest.raises(RuntimeError, match=pattern):
        take(stream, 1)


@pytest.mark.timeout(60)
def test_an_error_in_a_worker_process_stops_the_workers(shard_dir, tmp_path):
    """Workers ignore SIGTERM (SLURM's stop signals are the trainer's), so the stream stops them itself
    when an error leaves it: with the error's traceback holding them, Python's exit would wait forever."""
    good = sorted(shard_dir.glob("*.tar"))[0]
    copy_damaged(good, tmp_path / "bad-0.tar", lambda name: True)
    cfg = DataConfig(source="shards", shards=f"{tmp_path}/bad-{{0..0}}.tar", preset="five-task",
                     workers=1, shuffle_buffer=8)
    stream = build_train_stream(cfg, seed=0, rank=0, world_size=1, micro_batch=2, crop=CROP)
    with pytest.raises(RuntimeError, match="without one usable sample") as error:
        take(stream, 1)
    assert error.traceback and not multiprocessing.active_children()


@pytest.mark.timeout(20)   # before the fix this hung
def test_pre_degraded_samples_of_a_type_outside_the_preset_are_an_error_not_skipped(allweather_pairs, tmp_path):
    """Shards without a manifest are checked sample by sample."""
    for shard in allweather_pairs.glob("*.tar"):
        (tmp_path / shard.name).write_bytes(shard.read_bytes())
    cfg = DataConfig(source="shards", shards=str(tmp_path), preset="five-task", workers=0, shuffle_buffer=4)
    stream = build_train_stream(cfg, seed=0, rank=0, world_size=1, micro_batch=2, crop=CROP)
    pattern = (r"shard .*shard-00000\d\.tar, sample \d{9}: pre-degraded type '(rain_fog|snow|raindrop)' "
               r"is not in data.preset 'five-task'")
    with pytest.raises(ConfigError, match=pattern) as raised:
        take(stream, 1)
    assert not isinstance(raised.value, CorruptSample)


def test_a_brace_pattern_is_checked_against_the_manifest_of_its_folder(allweather_pairs):
    cfg = DataConfig(source="shards", shards=f"{allweather_pairs}/shard-{{000000..000001}}.tar", preset="five-task",
                     workers=0)
    with pytest.raises(ConfigError, match="data.preset 'five-task' but the pre-degraded shards in .* were built "
                                         "with preset 'allweather'"):
        build_train_stream(cfg, seed=0, rank=0, world_size=1, micro_batch=2, crop=CROP)


def test_a_damaged_val_sample_is_an_error_naming_its_shard_and_key(tmp_path):
    with tarfile.open(tmp_path / "val-0.tar", "w") as tar:
        add_member(tar, "000000007.clean.rgb.zst", b"garbage")
        add_member(tar, "000000007.json", b"{}")
    cfg = DataConfig(val_shards=str(tmp_path), preset="allweather")
    with pytest.raises(CorruptSample, match=r"shard .*val-0\.tar: sample 000000007: cannot decode"):
        build_val_set(cfg, CROP)


def test_val_pairs_of_a_type_outside_the_preset_are_an_error(allweather_pairs):
    cfg = DataConfig(val_shards=f"{allweather_pairs}/shard-000000.tar", preset="cdd11", val_samples_per_type=1)
    with pytest.raises(ValueError, match=r"shard .*shard-000000\.tar, sample 000000000: pre-degraded type "
                                         r"'(rain_fog|raindrop)' is not in data.preset 'cdd11'"):
        build_val_set(cfg, CROP)


def test_val_set_is_fixed_and_covers_every_type():
    cfg = DataConfig(preset="allweather", val_samples_per_type=2, val_batch_size=4)
    first, again = build_val_set(cfg, 48), build_val_set(cfg, 48)
    assert [len(b["type_id"]) for b in first] == [4, 2]
    assert same_batches(first, again)
    assert sorted(torch.cat([b["type_id"] for b in first]).tolist()) == [0, 0, 1, 1, 2, 2]
    crops = torch.cat([b["gt"] for b in first])
    assert all(not torch.equal(a, b) for a, b in itertools.combinations(crops, 2))   # no sample twice


def test_val_set_from_held_out_shards(shard_dir):
    cfg = DataConfig(source="shards", shards=str(shard_dir), val_shards=f"{shard_dir}/shard-{{000000..000001}}.tar",
                     preset="five-task", val_samples_per_type=1)
    batches = build_val_set(cfg, CROP)
    assert sum(len(b["type_id"]) for b in batches) == len(type_names("five-task"))
    assert batches[0]["gt"].shape[1:] == (3, CROP, CROP)


def test_the_stream_never_draws_from_the_global_torch_rng():
    """The DataLoader's worker base seed comes from the stream's own integer-seeded generator."""
    cfg = DataConfig(source="builtin", preset="five-task", workers=0)
    stream = build_train_stream(cfg, seed=3, rank=0, world_size=1, micro_batch=2, crop=CROP)
    before = torch.get_rng_state()
    take(stream, 2)
    assert torch.equal(torch.get_rng_state(), before)


def test_the_samples_of_one_round_get_degradations_of_their_own():
    from m2r.data.stream import StreamPlan, worker_batches

    plan = StreamPlan(source="builtin", shards=(), preset="five-task", weights=(), seed=0, rank=0, world_size=1,
                      workers=1, micro_batch=16, crop=32, shuffle_buffer=8, scale_range=(1.0, 1.0))
    assert len(set(next(worker_batches(plan, 0, (0, 0)))["type_id"].tolist())) > 1


def test_pairs_are_flipped_left_right_only_when_not_rotated():
    from m2r.data.augment import random_dihedral

    image = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    unflipped = set()
    for seed in range(16):
        (out,) = random_dihedral([image], np.random.default_rng(seed), rotate=False)
        assert np.array_equal(out, image) or np.array_equal(out, image[:, ::-1])
        unflipped.add(np.array_equal(out, image))
    assert unflipped == {True, False}



def test_pre_degraded_pairs_keep_their_up_and_stay_aligned():
    """Rain falls down and haze thickens upward: a pair is flipped left-right at most, never rotated."""
    from m2r.data.presets import Degrader
    from m2r.data.stream import make_pair

    clean = np.random.default_rng(0).integers(0, 256, (CROP, CROP, 3), dtype=np.uint8)
    lq = 255 - clean
    degrader = Degrader("allweather")
    flips = set()
    for seed in range(16):
        lq_out, gt, type_id = make_pair(clean, lq, {"type": degrader.types[1].name}, np.random.default_rng(seed),
                                        degrader, CROP)
        flipped = np.array_equal(gt, clean[:, ::-1].transpose(2, 0, 1))
        assert flipped or np.array_equal(gt, clean.transpose(2, 0, 1))
        assert np.array_equal(lq_out, 255 - gt) and type_id == 1
        flips.add(flipped)
    assert flips == {True, False}


def test_crops_reach_every_position_and_images_narrower_than_the_crop_are_upscaled():
    from m2r.data.augment import random_crop

    image = np.random.default_rng(0).integers(0, 255, (32, 40, 3), dtype=np.uint8)
    lefts = set()
    for seed in range(200):
        (cut,) = random_crop([image], 32, np.random.default_rng(seed))
        lefts.add(next(x for x in range(9) if np.array_equal(cut, image[:, x:x + 32])))
    assert lefts == set(range(9))
    assert random_crop([image[:, :20]], 32, np.random.default_rng(0))[0].shape == (32, 32, 3)


def round_shards(shard_dir, rank, worker, world_size=2):
    stream = build_train_stream(DataConfig(source="shards", shards=str(shard_dir), workers=2, shuffle_buffer=20),
                                seed=0, rank=rank, world_size=world_size, micro_batch=1, crop=CROP)
    return [shard for shard, _ in _ShardSource(stream.plan, worker).round_records(0)[0]]


def test_each_rank_and_worker_draws_its_rounds_shards_on_its_own(shard_dir):
    """Ranks (or workers) reading the same shards in the same order would train on the same samples at
    once, only their crops and degradations differing."""
    orders = [round_shards(shard_dir, rank, worker) for rank in range(2) for worker in range(2)]
    assert all(a != b for a, b in itertools.combinations(orders, 2))



def test_each_rank_draws_its_builtin_photos_and_its_crops_on_its_own(monkeypatch):
    """The builtin source's photo choice is per rank; and two ranks that read the same sample crop and
    degrade it differently, as sample j of round r is drawn with (seed, rank, worker, r, j)."""
    from m2r.data.stream import StreamPlan, _BuiltinSource, worker_batches

    plans = [StreamPlan(source="builtin", shards=(), preset="five-task", weights=(), seed=0, rank=rank, world_size=2,
                        workers=1, micro_batch=4, crop=32, shuffle_buffer=8, scale_range=(1.0, 1.0))
             for rank in range(2)]
    photos = [_BuiltinSource(plan, 0).round_records(0)[0] for plan in plans]
    assert photos[0] != photos[1]
    monkeypatch.setattr(_BuiltinSource, "round_records", lambda self, round_index: ([0] * 8, []))
    first = [next(worker_batches(plan, 0, (0, 0))) for plan in plans]
    assert not torch.equal(first[0]["gt"], first[1]["gt"])


def test_a_round_serves_its_samples_shuffled_across_its_shards(shard_dir):
    """Not shard after shard: the 20 samples of 4 shards are interleaved."""
    shards = round_shards(shard_dir, rank=0, worker=0)
    assert len(set(shards)) == 4
    assert sum(a != b for a, b in zip(shards, shards[1:])) > 3


def test_a_stream_resumed_from_a_fresh_start_and_started_afresh_again_resumes_exactly(shard_dir):
    """Trainer._continue_stream: this rank loads a state saved after a fresh start, another rank's does
    not match, so every rank starts afresh again. The new stream is seeded by (run seed, step) alone, or
    the next resume (on a stream built from the run seed) would not find it and draw a third one."""
    def make():
        return build_train_stream(DataConfig(source="shards", shards=str(shard_dir), preset="five-task", workers=2,
                                             shuffle_buffer=8), seed=5, rank=0, world_size=1, micro_batch=3, crop=CROP)
    earlier = make()
    earlier.start_fresh(step=100)
    take(earlier, 1)
    again = make()
    again.load_state_dict(earlier.state_dict())
    again.start_fresh(step=400)
    take(again, 2)
    resumed = make()
    resumed.load_state_dict(again.state_dict())
    reference = make()
    reference.start_fresh(step=400)
    assert same_batches(take(resumed, 2), take(reference, 4)[2:])


def test_the_workers_of_a_rank_draw_their_samples_degradations_each_with_its_own_generator():
    """Sample j of round r is degraded with a generator of its own worker: two workers would otherwise
    give their j-th samples the same degradation type (and crop position and symmetry, drawn alike)."""
    from m2r.data.stream import worker_batches

    stream = build_train_stream(DataConfig(source="builtin", preset="five-task", workers=2), seed=3, rank=0,
                                world_size=1, micro_batch=3, crop=CROP)
    types = [[int(t) for batch in itertools.islice(worker_batches(stream.plan, worker, (0, 0)), 4)
              for t in batch["type_id"]] for worker in range(2)]
    assert types[0] != types[1]


def test_the_start_up_line_names_logical_streams_and_loader_processes_apart(capsys):
    """data.workers=0: one logical stream, its batches made in the training process (no loader process)."""
    for workers, expected in ((0, "2 ranks x 1 logical stream (batches made in the training process: data.workers=0)"),
                              (3, "2 ranks x 3 logical streams (3 loader processes per rank)")):
        build_train_stream(DataConfig(source="builtin", preset="five-task", workers=workers), seed=3, rank=0,
                           world_size=2, micro_batch=3, crop=CROP)
        assert expected in capsys.readouterr().out


def test_val_shards_are_listed_by_rank_0_for_every_rank(shard_dir, monkeypatch):
    from m2r.data import stream

    cfg = DataConfig(source="shards", shards=str(shard_dir), val_shards=f"{shard_dir}/shard-{{000000..000001}}.tar",
                     preset="five-task", val_samples_per_type=1)
    expected = build_val_set(cfg, CROP)
    fresh = stream.resolve_shards

    def on_rank0(fn):   # rank 0's listing is fresh and reaches every rank
        monkeypatch.setattr(stream, "resolve_shards", fresh)
        try:
            return fn()
        finally:
            monkeypatch.setattr(stream, "resolve_shards", lambda *args: [])
    monkeypatch.setattr(stream, "on_rank0", on_rank0)
    monkeypatch.setattr(stream, "resolve_shards", lambda *args: [])   # this rank's own listing: stale, empty
    assert same_batches(build_val_set(cfg, CROP), expected)


def test_val_set_reads_the_val_shards_whatever_the_training_shards(shard_dir):
    held_out = f"{shard_dir}/shard-{{000006..000007}}.tar"     # not a prefix of the training listing
    with_training = DataConfig(source="shards", shards=str(shard_dir), val_shards=held_out, preset="five-task",
                               val_samples_per_type=1)
    alone = DataConfig(val_shards=held_out, preset="five-task", val_samples_per_type=1)
    first = DataConfig(val_shards=f"{shard_dir}/shard-{{000000..000001}}.tar", preset="five-task",
                       val_samples_per_type=1)
    assert same_batches(build_val_set(with_training, CROP), build_val_set(alone, CROP))
    assert not same_batches(build_val_set(with_training, CROP), build_val_set(first, CROP))


def test_a_validation_set_that_differs_on_another_rank_is_refused_naming_its_rank_and_host(shard_dir, monkeypatch):
    """Each rank scores its share of the batches from its own copy: a node whose validation images differ (other
    files, other library versions) is refused at start-up, on every rank, rather than mixed into the metrics."""
    from m2r.data import stream

    cfg = DataConfig(preset="five-task", val_samples_per_type=1)   # the built-in photos
    alone = build_val_set(cfg, CROP)
    elsewhere = build_val_set(DataConfig(val_shards=f"{shard_dir}/shard-000000.tar", preset="five-task",
                                         val_samples_per_type=1), CROP)
    monkeypatch.setattr(stream.dist, "is_multi_rank", lambda: True)
    # two gathers: each rank's failure to read (None: none, `dist.failing_together`), then each rank's digest
    monkeypatch.setattr(stream.dist, "all_gather_object",
                        lambda mine: [mine, mine and (stream._digest(elsewhere), "node7")])
    with pytest.raises(ConfigError, match=re.escape("the built-in validation photos: the validation set built by "
                                                    "rank 1 on host node7 differs from rank 0's: every node must")):
        build_val_set(cfg, CROP)
    monkeypatch.setattr(stream.dist, "all_gather_object", lambda mine: [mine, mine])
    assert same_batches(build_val_set(cfg, CROP), alone)


def copy_shards(shard_dir, to, manifest=True):
    to.mkdir(exist_ok=True)
    for path in shard_dir.iterdir():
        if path.suffix == ".tar" or (manifest and path.name == "manifest.json"):
            (to / path.name).write_bytes(path.read_bytes())
    return to


@pytest.mark.parametrize("workers", [0, 1])
def test_a_shard_missing_when_read_is_an_error_naming_it_not_a_damaged_sample_to_skip(shard_dir, tmp_path, workers):
    """Rank 0 lists the shards for every rank: a node whose copy lacks some (node-local staging cut short,
    files deleted since) would otherwise train on part of the corpus, counting each missing shard as one
    damaged sample."""
    copy = copy_shards(shard_dir, tmp_path / "copy")
    cfg = DataConfig(source="shards", shards=str(copy), preset="five-task", workers=workers, shuffle_buffer=40)
    stream = build_train_stream(cfg, seed=0, rank=0, world_size=1, micro_batch=2, crop=CROP)
    (copy / "shard-000003.tar").unlink()    # a round of 40 samples reads all 8 shards
    with pytest.raises((FileNotFoundError, RuntimeError), match=r"shard .*shard-000003\.tar is missing on host"):
        take(stream, 1)


@pytest.mark.timeout(20)
def test_shards_without_samples_are_named_with_why_by_the_error_that_stops_the_stream(tmp_path):
    """Not the first shards of the listing, which may be fine, but those read, with what was wrong."""
    tarfile.open(tmp_path / "a-empty.tar", "w").close()
    (tmp_path / "b-gzipped.tar").write_bytes(b"\x1f\x8b" + bytes(600))
    cfg = DataConfig(source="shards", shards=f"{tmp_path}/{{a-empty,b-gzipped}}.tar", preset="five-task", workers=0)
    stream = build_train_stream(cfg, seed=0, rank=0, world_size=1, micro_batch=2, crop=CROP)
    with pytest.raises(RuntimeError, match=r"data worker 0 of rank 0: 64 shard reads in a row gave no sample \(2 "
                                           r"distinct shards of the 2\); the last: .*(a-empty\.tar: no samples; .*"
                                           r"b-gzipped\.tar: damaged tar|"
                                           r"b-gzipped\.tar: damaged tar.*; .*a-empty\.tar: no samples)"):
        take(stream, 1)


def test_one_good_shard_among_many_empty_ones_is_found_however_long_the_run_of_empty_reads(shard_dir, tmp_path):
    """The stream gives up only once a run of empty reads has visited every shard (2N - 1 draws in a row
    hold a whole permutation), not after 64 reads, which 1 good shard among 150 empty ones often needs."""
    good = sorted(shard_dir.glob("*.tar"))[0]
    (tmp_path / "a-good.tar").write_bytes(good.read_bytes())
    for index in range(150):
        tarfile.open(tmp_path / f"b-empty-{index:03d}.tar", "w").close()
    cfg = DataConfig(source="shards", shards=str(tmp_path), preset="five-task", workers=0, shuffle_buffer=8)
    stream = build_train_stream(cfg, seed=0, rank=0, world_size=1, micro_batch=2, crop=CROP)
    assert len(take(stream, 10)) == 10

def test_a_shard_cut_short_since_the_build_or_empty_is_refused_at_start(shard_dir, tmp_path):
    copy = copy_shards(shard_dir, tmp_path / "copy")
    shard = copy / "shard-000005.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    cfg = DataConfig(source="shards", shards=str(copy), preset="five-task", workers=0)
    with pytest.raises(ConfigError, match=r"1 shard\(s\) missing, empty or not the size their manifest.json records "
                                          r".*first .*shard-000005\.tar: 3000 bytes, the manifest says \d+"):
        build_train_stream(cfg, seed=0, rank=0, world_size=1, micro_batch=2, crop=CROP)
    bare = copy_shards(shard_dir, tmp_path / "bare", manifest=False)    # no manifest: 0 bytes is still no tar
    (bare / "shard-000002.tar").write_bytes(b"")
    cfg = DataConfig(source="shards", shards=f"{bare}/shard-{{000000..000007}}.tar", preset="five-task", workers=0)
    with pytest.raises(ConfigError, match=r"first .*shard-000002\.tar: 0 bytes;"):
        build_train_stream(cfg, seed=0, rank=0, world_size=1, micro_batch=2, crop=CROP)


def test_damaged_shard_reads_are_counted_once_across_a_resume(shard_dir, tmp_path):
    """The round a stream resumes in is read again: its damaged shards were counted before the save."""
    copy = copy_shards(shard_dir, tmp_path / "copy", manifest=False)
    shard = copy / "shard-000004.tar"
    shard.write_bytes(shard.read_bytes()[:3000])    # a damaged tar: its first samples, then an error
    cfg = DataConfig(source="shards", shards=f"{copy}/shard-{{000000..000007}}.tar", preset="five-task", workers=0,
                     shuffle_buffer=12)
    def make():
        return build_train_stream(cfg, seed=3, rank=0, world_size=1, micro_batch=BATCH, crop=CROP)
    uninterrupted = make()
    reference = take(uninterrupted, 12)
    assert uninterrupted.stats()["corrupt_samples"] > 0
    for stop in range(1, 12):
        first = make()
        head = take(first, stop)
        resumed = make()
        resumed.load_state_dict(first.state_dict())
        assert same_batches(head + take(resumed, 12 - stop), reference)
        assert resumed.stats() == uninterrupted.stats(), stop


def test_a_sample_with_a_side_of_0_pixels_is_a_damaged_sample_not_a_crash(tmp_path):
    import zstandard
    from m2r.data.shard_format import RAW_HEADER, RAW_MAGIC, decode_image

    payload = zstandard.ZstdCompressor().compress(RAW_HEADER.pack(RAW_MAGIC, 0, 40, 3))
    with pytest.raises(CorruptSample, match="bad raw image header"):
        decode_image("rgb.zst", payload)


NODE_SCRIPT = """
import sys, torch.distributed as torch_dist
from m2r.data import DataConfig, build_train_stream
torch_dist.init_process_group("gloo")
cfg = DataConfig(source="shards", shards="shards", preset="five-task", workers=0)
try:
    build_train_stream(cfg, seed=0, rank=torch_dist.get_rank(), world_size=2, micro_batch=2, crop=16)
    print("started", flush=True)
except Exception as error:
    print(f"refused: {error}", flush=True)
torch_dist.barrier()
torch_dist.destroy_process_group()   # else gloo's teardown at exit may abort the process
"""


@pytest.mark.timeout(120)
def test_a_shard_cut_short_in_another_node_s_copy_is_refused_at_start_naming_that_host(shard_dir, tmp_path):
    """Node-local staging: every node reads the same path, its own copy. Rank 0 checks only its node's copy;
    the first rank of each other node checks its own (here two "nodes": a relative data.shards, two folders)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from m2r.dist import free_port

    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    node0.mkdir(), node1.mkdir()
    copy_shards(shard_dir, node0 / "shards")
    copy = copy_shards(shard_dir, node1 / "shards")
    shard = copy / "shard-000005.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    env = dict(os.environ, OMP_NUM_THREADS="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               LOCAL_RANK="0", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    ranks = [subprocess.Popen([sys.executable, "-c", NODE_SCRIPT], cwd=node, env=dict(env, RANK=str(rank)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank, node in enumerate((node0, node1))]
    outputs = [process.communicate(timeout=100)[0] for process in ranks]
    for output in outputs:
        assert "refused: data.shards=shards: 1 shard(s) on host " in output, output
        assert "shard-000005.tar: 3000 bytes, the manifest says" in output, output


def test_each_batch_names_only_the_damaged_samples_skipped_since_the_batch_before(shard_dir, tmp_path):
    """`damage` on a batch: at most MAX_DAMAGE_NOTES of the `corrupt` samples skipped since the previous
    batch. A list carried over (not reset at the yield) would name old samples again at every log step;
    one without the cap would send every message through the loader and the gather."""
    from m2r.data.stream import MAX_DAMAGE_NOTES, worker_batches

    good = sorted(shard_dir.glob("*.tar"))
    for i in range(2):   # every image of bad-0 and bad-1 truncated, bad-2 and bad-3 intact
        copy_damaged(good[i], tmp_path / f"bad-{i}.tar", lambda name: True)
        (tmp_path / f"bad-{i + 2}.tar").write_bytes(good[i + 2].read_bytes())
    cfg = DataConfig(source="shards", shards=f"{tmp_path}/bad-{{0..3}}.tar", preset="five-task", workers=0,
                     shuffle_buffer=20)
    stream = build_train_stream(cfg, seed=0, rank=0, world_size=1, micro_batch=3, crop=CROP)
    batches = list(itertools.islice(worker_batches(stream.plan, 0, (0, 0)), 12))
    assert [len(b["damage"]) for b in batches] == [min(b["corrupt"], MAX_DAMAGE_NOTES) for b in batches]
    corrupt = {b["corrupt"] for b in batches}
    assert max(corrupt) > MAX_DAMAGE_NOTES and min(corrupt) < MAX_DAMAGE_NOTES   # both sides of the cap seen
    assert all(re.match(rf"shard {tmp_path}/bad-[01]\.tar: sample", note) for b in batches for note in b["damage"])


def test_a_damaged_tar_is_counted_and_named_once_per_read(shard_dir, tmp_path):
    """A shard whose tar breaks off: one damaged read per round that draws it (a round reads each shard
    once), and its message (naming the shard) among the notes for the console."""
    copy = copy_shards(shard_dir, tmp_path / "copy", manifest=False)
    shard = copy / "shard-000004.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    cfg = DataConfig(source="shards", shards=f"{copy}/shard-{{000000..000007}}.tar", preset="five-task", workers=0,
                     shuffle_buffer=12)
    stream = build_train_stream(cfg, seed=3, rank=0, world_size=1, micro_batch=BATCH, crop=CROP)
    source = _ShardSource(stream.plan, 0)
    damaged = [source.round_records(i)[1] for i in range(6)]
    assert any(damaged) and all(len(d) <= 1 for d in damaged), damaged
    assert all("shard-000004.tar" in note for d in damaged for note in d)
    take(stream, 12)
    assert stream.stats()["corrupt_samples"] >= 1
    assert any("shard-000004.tar" in note for note in stream.take_damage_notes())


def test_keep_notes_never_adds_to_a_full_list():
    from m2r.data.stream import MAX_DAMAGE_NOTES, keep_notes

    notes = [f"old {i}" for i in range(MAX_DAMAGE_NOTES + 1)]   # over the cap (a caller's own list)
    keep_notes(notes, ["new 1", "new 2"])
    assert notes == [f"old {i}" for i in range(MAX_DAMAGE_NOTES + 1)]
    empty = []
    keep_notes(empty, [f"new {i}" for i in range(5)])
    assert empty == [f"new {i}" for i in range(MAX_DAMAGE_NOTES)]


def test_a_stream_started_afresh_counts_its_samples_from_zero():
    """`start_fresh` begins a new stream, its counters too: the samples per type it reports (and saves) are its own."""
    stream = build_train_stream(DataConfig(source="builtin", preset="cdd11", workers=0), seed=1, rank=0, world_size=1,
                                micro_batch=2, crop=CROP)
    take(stream, 2)
    stream.start_fresh(step=100)
    state = stream.state_dict()
    assert (state["batches"], sum(state["type_counts"]), state["corrupt"]) == (0, 0, 0)
    take(stream, 1)
    assert sum(stream.stats()["samples_by_type"].values()) == 2


def test_a_stream_started_afresh_resumes_exactly_twice_in_a_row():
    """A resumed stream keeps saying where it was started afresh: the next resume (preempted again) finds its
    stream, instead of a mismatch that would draw a third one."""
    def make():
        return build_train_stream(DataConfig(source="builtin", preset="cdd11", workers=0), seed=1, rank=0,
                                  world_size=1, micro_batch=2, crop=CROP)
    first = make()
    first.start_fresh(step=400)
    take(first, 1)
    second = make()
    second.load_state_dict(first.state_dict())
    take(second, 1)
    third = make()
    third.load_state_dict(second.state_dict())
    reference = make()
    reference.start_fresh(step=400)
    assert same_batches(take(third, 2), take(reference, 4)[2:])
