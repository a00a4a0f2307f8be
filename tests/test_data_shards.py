"""Shard builder and inspector on a folder of 210 real photos (crops of scikit-image samples)."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from m2r.config import ConfigError
from m2r.data.builtin import TRAIN_PHOTOS, load_photo
from m2r.data.shard_format import MAX_SIDE, CorruptSample, decode_image, decode_record, encode_image, read_shard
from m2r.data.shard_list import expand_braces, read_manifest, resolve_shards
from m2r.shards import build as build_module
from m2r.shards.__main__ import _build_options, _parser, _read_recipe, main
from m2r.shards.build import BuildOptions, build
from m2r.shards.inspect import inspect_shards

from conftest import REPO_ROOT

PHOTOS = 210
FORMATS = ("png", "jpg", "webp", "bmp", "tiff")


@pytest.fixture(scope="module")
def photo_tree(tmp_path_factory):
    """210 random crops of the sample photos in five formats over nested folders, plus one file
    that is not an image."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(PHOTOS):
        img = load_photo(TRAIN_PHOTOS[i % len(TRAIN_PHOTOS)])
        size = int(rng.integers(40, 72))
        y, x = (int(rng.integers(0, n - size)) for n in img.shape[:2])
        folder = root / f"part{i % 3}" / ("deep" if i % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[y:y + size, x:x + size]).save(folder / f"photo{i:03d}.{FORMATS[i % 5]}")
    (root / "part0" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated, not a jpeg")
    return root


@pytest.fixture(scope="module")
def four_photos(photo_tree, tmp_path_factory):
    """A small source folder, for builds that are run several times."""
    folder = tmp_path_factory.mktemp("four")
    for path in sorted((photo_tree / "part1").glob("*.png"))[:4]:
        (folder / path.name).write_bytes(path.read_bytes())
    return folder


@pytest.fixture(scope="module")
def clean_shards(photo_tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    manifest = build(BuildOptions(src=[str(photo_tree)], out=str(out), samples_per_shard=50), progress=False)
    return out, manifest


def test_build_writes_every_photo_and_reports_the_corrupt_file(clean_shards):
    out, manifest = clean_shards
    assert manifest["mode"] == "clean" and manifest["files"] == PHOTOS + 1
    assert manifest["samples"] == PHOTOS == sum(s["samples"] for s in manifest["shards"])
    assert [entry["path"].endswith("corrupt.jpg") for entry in manifest["skipped"]] == [True]
    assert len(manifest["shards"]) == 5 and manifest["type_counts"] == {"clean": PHOTOS}
    assert sorted(os.listdir(out)) == sorted(["manifest.json"] + [f"shard-{i:06d}.{e}" for i in range(5)
                                                                  for e in ("tar", "json")])


def test_samples_are_lossless_with_their_metadata(clean_shards):
    """Targets hold exactly the decoded source pixels (shard 0 also met the corrupt file)."""
    out, manifest = clean_shards
    records = list(read_shard(str(out / "shard-000000.tar")))
    assert len(records) == manifest["shards"][0]["samples"] == 49
    for record in records:
        clean, lq, meta = decode_record(record)
        assert lq is None and meta["size"] == list(clean.shape[:2])
        assert np.array_equal(clean, np.asarray(Image.open(meta["src"]).convert("RGB")))


def test_inspect_verifies_checksums_and_detects_tampering(clean_shards, tmp_path):
    out, _ = clean_shards
    report = inspect_shards(str(out))
    assert report["ok"] and report["type_counts"] == {"clean": PHOTOS}
    result = subprocess.run([sys.executable, "-m", "m2r.shards", "inspect", str(out)], capture_output=True,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0 and "checksums verified" in result.stdout and "corrupt.jpg" in result.stdout
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for name in os.listdir(out):
        (tampered / name).write_bytes((out / name).read_bytes())
    data = bytearray((tampered / "shard-000002.tar").read_bytes())
    data[5000] ^= 0xFF
    (tampered / "shard-000002.tar").write_bytes(bytes(data))
    report = inspect_shards(str(tampered))
    assert not report["ok"]
    (failed,) = [row for row in report["shards"] if not row["ok"]]
    assert failed["problem"] == "sha256 mismatch"
    # what a rebuild would bring back: the manifest's count, not the 0 samples read
    assert failed["samples"] == next(e["samples"] for e in read_manifest(str(out))["shards"]
                                     if e["name"] == "shard-000002.tar") > 0
    result = subprocess.run([sys.executable, "-m", "m2r.shards", "inspect", str(tampered)], capture_output=True,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0 and f"1 shards FAILED, holding {failed['samples']} samples" in result.stdout


def test_the_per_type_totals_count_verified_shards_only(clean_shards, tmp_path):
    """A shard whose checksum holds but whose count differs from the manifest's failed: the totals, printed as
    those of the verified shards, leave its samples out."""
    out, _ = clean_shards
    damaged = tmp_path / "count"
    damaged.mkdir()
    for name in os.listdir(out):
        (damaged / name).write_bytes((out / name).read_bytes())
    manifest = json.loads((damaged / "manifest.json").read_text())
    manifest["shards"][0]["samples"] += 1
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    report = inspect_shards(str(damaged))
    (failed,) = [row for row in report["shards"] if not row["ok"]]
    assert failed["problem"].endswith(f"manifest says {manifest['shards'][0]['samples']}")
    assert sum(report["type_counts"].values()) == sum(row["samples"] for row in report["shards"] if row["ok"])


def test_rerun_skips_finished_shards_and_redoes_unfinished_ones(clean_shards, photo_tree):
    out, manifest = clean_shards
    shard_1 = out / "shard-000001.tar"
    shard_1.write_bytes(shard_1.read_bytes()[:50000])   # cut short after its build (a full disk, a copy)
    stamps = {name: os.stat(out / name).st_mtime_ns for name in os.listdir(out) if name.endswith(".tar")}
    (out / "shard-000003.json").unlink()          # as if the build died before finishing shard 3
    (out / "shard-000004.tar.tmp").write_bytes(b"half")   # and a worker killed while writing shard 4 again
    again = build(BuildOptions(src=[str(photo_tree)], out=str(out), samples_per_shard=50), progress=False)
    assert again["shards"] == manifest["shards"]   # same bytes, same checksums
    changed = [n for n, t in stamps.items() if os.stat(out / n).st_mtime_ns != t]
    assert sorted(changed) == ["shard-000001.tar", "shard-000003.tar"]
    assert not list(out.glob("*.tmp"))   # on a full disk, the space a rerun needs


@pytest.mark.parametrize("option, value", [("preset", "cdd11"), ("seed", 1), ("encoding", "png"), ("max_side", 32),
                                           ("samples_per_shard", 3), ("src", "one photo")])
def test_rebuilding_into_an_out_dir_built_with_other_options_is_refused(four_photos, tmp_path, option, value):
    """Stale shards are never mixed into a build; an identical rerun still resumes."""
    out = tmp_path / "out"
    options = dict(src=[str(four_photos)], out=str(out), samples_per_shard=2)
    first = build(BuildOptions(**options), progress=False)
    if option == "src":
        (tmp_path / "one").mkdir()
        shutil.copy(next(four_photos.glob("*.png")), tmp_path / "one")
        value = [str(tmp_path / "one")]
    named = "source file list" if option == "src" else option
    with pytest.raises(ConfigError, match=f"--out {out} already holds shard-000000.tar, built with other options "
                                         f"\\({named} [^;]*\\); use a new --out, or delete {out}"):
        build(BuildOptions(**{**options, option: value}), progress=False)
    assert build(BuildOptions(**options), progress=False) == first


def test_only_unreadable_source_images_are_skipped_other_errors_stop_the_build(four_photos, tmp_path, monkeypatch):
    def broken_encoder(img, encoding):
        raise ValueError("a bug in the encoder")
    monkeypatch.setattr(build_module, "encode_image", broken_encoder)
    with pytest.raises(ValueError, match="a bug in the encoder"):
        build(BuildOptions(src=[str(four_photos)], out=str(tmp_path)), progress=False)


@pytest.mark.parametrize("encoding", ["zstd", "png"])
def test_an_image_the_format_cannot_hold_is_skipped_and_named_unless_max_side_downscales_it(tmp_path, encoding):
    """The stream refuses sides over MAX_SIDE; zstd's header holds at most 65535: neither is ever written."""
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (MAX_SIDE + 1, 2)).save(src / "panorama.png")
    Image.new("RGB", (8, 8)).save(src / "small.png")
    manifest = build(BuildOptions(src=[str(src)], out=str(tmp_path / "out"), encoding=encoding), progress=False)
    [skipped] = manifest["skipped"]
    assert manifest["samples"] == 1 and skipped["path"].endswith("panorama.png")
    assert f"{MAX_SIDE + 1}x2 exceeds the shard format's {MAX_SIDE} px per side; --max-side" in skipped["error"]
    capped = build(BuildOptions(src=[str(src)], out=str(tmp_path / "capped"), encoding=encoding, max_side=MAX_SIDE),
                   progress=False)
    assert capped["samples"] == 2 and not capped["skipped"]
    with pytest.raises(ValueError, match=f"exceeds the shard format's {MAX_SIDE} px per side"):
        encode_image(np.zeros((2, MAX_SIDE + 1, 3), np.uint8), encoding)


def test_a_tall_image_the_format_cannot_hold_is_named_with_the_max_side_advice(tmp_path):
    from m2r.data.shard_format import MAX_SIDE
    from m2r.shards.build import load_image

    Image.new("RGB", (2, MAX_SIDE + 1)).save(tmp_path / "tall.png")
    with pytest.raises(ValueError, match=f"tall.png: 2x{MAX_SIDE + 1} exceeds .* --max-side"):
        load_image(str(tmp_path / "tall.png"), 0)
    assert load_image(str(tmp_path / "tall.png"), MAX_SIDE).shape == (MAX_SIDE, 2, 3)


@pytest.mark.parametrize("recipe, flag, preset", [("clean_only: true", ["--degradations", "cdd11"], "cdd11"),
                                                  ("degradations: allweather", ["--clean-only"], None)])
def test_a_mode_on_the_command_line_replaces_the_recipes(tmp_path, recipe, flag, preset):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"src: [{tmp_path}]\nout: shards/x\nsamples_per_shard: 7\n{recipe}\n")
    opts = _build_options(_parser().parse_args(["build", "--recipe", str(path), *flag]))
    assert opts.preset == preset and opts.samples_per_shard == 7


@pytest.mark.parametrize("recipe, flags, message", [
    ("", ["--degradations", "cdd12"], "--degradations 'cdd12': unknown preset; choose one of cdd11, allweather"),
    ("degradations: cdd12", [], "recipe {recipe}: degradations 'cdd12': unknown preset"),
    ("src: [/nowhere/DIV2K]", [], "recipe {recipe}: src /nowhere/DIV2K: not a directory"),
    ("", ["--src", "/nowhere/DIV2K"], "--src /nowhere/DIV2K: not a directory"),
    ("samples_per_shard: 0", [], "recipe {recipe}: samples_per_shard 0: expected an integer >= 1"),
    ("samples_per_shard: 0", ["--samples-per-shard", "-1"], "--samples-per-shard -1: expected an integer >= 1"),
    ("encoding: jpeg", [], "recipe {recipe}: encoding 'jpeg': choose one of zstd, png"),
    ("", ["--max-side", "20000"], "--max-side 20000: the shard format holds at most 16384 px per side; choose 16384"),
    ("clean_only: true\ndegradations: cdd11", [], "recipe {recipe}: clean_only and recipe {recipe}: degradations"),
])
def test_bad_values_name_the_option_or_the_recipe_that_gave_them(tmp_path, recipe, flags, message):
    path = tmp_path / "recipe.yaml"
    source = "" if recipe.startswith("src:") else f"src: [{tmp_path}]\n"
    path.write_text(f"{source}out: {tmp_path / 'out'}\n{recipe}\n")
    args = _parser().parse_args(["build", "--recipe", str(path), *flags])
    with pytest.raises(ConfigError, match=re.escape(message.format(recipe=path))):
        _build_options(args)


@pytest.mark.parametrize("text", ["samples_per_shard: 4\nsamples_per_shard: 5\n", "src: [a\n"])
def test_a_recipe_that_is_not_yaml_is_named(tmp_path, text):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    with pytest.raises(ConfigError, match=f"recipe {recipe}: cannot read it: "):
        _read_recipe(str(recipe))


@pytest.mark.parametrize("name", ["clean-div2k", "allweather-pairs"])
def test_shipped_recipes_name_only_build_options(name):
    recipe = _read_recipe(f"{REPO_ROOT}/shards/recipes/{name}.yaml")
    assert recipe["src"] and recipe["out"] == f"shards/{name}"


def test_build_says_what_it_wrote_and_a_rerun_what_it_skipped(four_photos, tmp_path, capsys):
    argv = ["build", "--src", str(four_photos), "--out", str(tmp_path), "--samples-per-shard", "2"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "4 samples in 2 shards" in first and "already built" not in first
    assert main(argv) == 0
    assert f"2 of 2 shards already built in {tmp_path} with these options: skipped" in capsys.readouterr().out


def test_both_modes_on_the_command_line_are_refused():
    with pytest.raises(SystemExit):
        _parser().parse_args(["build", "--src", "a", "--out", "b", "--clean-only", "--degradations", "cdd11"])


def test_pre_degraded_pairs_carry_type_and_parameters(photo_tree, tmp_path):
    manifest = build(BuildOptions(src=[str(photo_tree / "part1")], out=str(tmp_path), preset="allweather",
                                  samples_per_shard=40, encoding="png"), progress=False)
    assert manifest["mode"] == "pairs" and manifest["preset"] == "allweather"
    assert set(manifest["type_counts"]) <= {"rain_fog", "snow", "raindrop"}
    assert sum(manifest["type_counts"].values()) == manifest["samples"] == PHOTOS // 3
    record = next(read_shard(str(tmp_path / "shard-000000.tar")))
    assert set(record) == {"__key__", "clean.png", "lq.png", "json"}
    clean, lq, meta = decode_record(record)
    assert lq.shape == clean.shape and not np.array_equal(lq, clean)
    assert meta["params"][0]["name"] in {"rain_fog", "snow", "raindrop"}
    assert inspect_shards(str(tmp_path))["ok"]


def test_codec_round_trips_and_rejects_damage():
    img = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    for encoding in ("zstd", "png"):
        ext, data = encode_image(img, encoding)
        assert np.array_equal(decode_image(ext, data), img)
        with pytest.raises(CorruptSample):
            decode_image(ext, data[: len(data) // 2])
    with pytest.raises(CorruptSample, match="unsupported"):
        decode_image("pickle", b"\x80\x04")


def test_a_damaged_record_is_named_by_its_key():
    ext, data = encode_image(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(CorruptSample, match="sample 000000042: cannot decode"):
        decode_record({"__key__": "000000042", f"clean.{ext}": data[:10]})


def test_unknown_fields_are_never_read(tmp_path):
    import tarfile
    from m2r.data.shard_format import add_member

    ext, data = encode_image(np.zeros((4, 4, 3), np.uint8))
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        add_member(tar, f"000000001.clean.{ext}", data)
        add_member(tar, "000000001.pyd", b"\x80\x04 pickled payload")
        add_member(tar, "000000001.json", json.dumps({"size": [4, 4]}).encode())
    assert list(read_shard(str(tmp_path / "s.tar"))) == [
        {"__key__": "000000001", f"clean.{ext}": data, "json": b'{"size": [4, 4]}'}]


def test_brace_patterns_and_missing_shards(clean_shards):
    out, _ = clean_shards
    assert expand_braces("a-{08..10}-{x,y}.tar") == ["a-08-x.tar", "a-08-y.tar", "a-09-x.tar", "a-09-y.tar",
                                                     "a-10-x.tar", "a-10-y.tar"]
    assert len(resolve_shards(str(out))) == 5
    assert len(resolve_shards(f"{out}/shard-{{000001..000004}}.tar")) == 4
    with pytest.raises(FileNotFoundError, match="missing"):
        resolve_shards(f"{out}/shard-{{000000..000009}}.tar")
    with pytest.raises(FileNotFoundError, match=f"data.val_shards={out}-typo is neither a directory nor a .tar "
                                                "file or brace pattern"):
        resolve_shards(f"{out}-typo", "data.val_shards")


def test_a_range_without_leading_zeros_is_not_padded():
    assert expand_braces("s-{0..10}.tar") == [f"s-{i}.tar" for i in range(11)]
    assert expand_braces("s-{8..10}.tar") == ["s-8.tar", "s-9.tar", "s-10.tar"]


def test_a_folder_without_shards_is_refused_not_streamed_as_an_empty_corpus(tmp_path):
    """An empty corpus would leave every data worker drawing shards from nothing, forever."""
    (tmp_path / "notes.txt").write_text("not a shard")
    with pytest.raises(FileNotFoundError, match="no shards found"):
        resolve_shards(str(tmp_path))


def test_a_folder_of_our_shards_without_a_manifest_is_an_unfinished_build_and_refused(clean_shards, tmp_path):
    """A build stopped by a full disk or a killed job writes no manifest: training would use part of the
    corpus. A WebDataset folder from elsewhere (no sidecars) is read as all its tars."""
    from m2r.config import ConfigError

    out, _ = clean_shards
    unfinished, foreign = tmp_path / "unfinished", tmp_path / "foreign"
    unfinished.mkdir(), foreign.mkdir()
    for name in ("shard-000000.tar", "shard-000000.json", "shard-000001.tar", "shard-000001.json"):
        shutil.copy(out / name, unfinished / name)
        if name.endswith(".tar"):
            shutil.copy(out / name, foreign / name)
    with pytest.raises(ConfigError, match=f"data.shards={unfinished}: 2 shard\\(s\\) of `m2r.shards build` but no "
                                          "manifest.json: the build did not finish"):
        resolve_shards(str(unfinished))
    assert [os.path.basename(p) for p in resolve_shards(str(foreign))] == ["shard-000000.tar", "shard-000001.tar"]
    (unfinished / "shard-000001.json").unlink()   # killed between a shard and its sidecar: still unfinished
    with pytest.raises(ConfigError, match="the build did not finish"):
        resolve_shards(str(unfinished))


def test_the_webdataset_library_reads_the_shards_as_our_stream_does(clean_shards):
    import webdataset

    out, manifest = clean_shards
    urls = [str(out / shard["name"]) for shard in manifest["shards"]]
    theirs = list(webdataset.WebDataset(urls, shardshuffle=False, empty_check=False))
    ours = [record for url in urls for record in read_shard(url)]
    assert [s["__key__"] for s in theirs] == [r["__key__"] for r in ours] and len(ours) == PHOTOS
    for sample, record in zip(theirs, ours):
        clean, _, meta = decode_record(sample)
        assert np.array_equal(clean, decode_record(record)[0]) and meta == json.loads(record["json"])


def test_each_pre_degraded_sample_has_a_draw_of_its_own(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "src").mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "src" / f"{i}.png")
    build(BuildOptions(src=[str(tmp_path / "src")], out=str(tmp_path / "out"), preset="allweather",
                       samples_per_shard=6, encoding="png"), progress=False)
    metas = [decode_record(record)[2] for record in read_shard(str(tmp_path / "out" / "shard-000000.tar"))]
    assert len({json.dumps(meta["params"], sort_keys=True) for meta in metas}) == len(metas) == 6


def test_inspect_reports_a_shard_whose_sample_count_differs_from_the_manifest(tmp_path):
    """A shard with its recorded checksum but another sample count than the manifest says."""
    import tarfile

    from m2r.data.shard_format import add_member
    from m2r.shards.build import sha256_file

    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for key in ("s0", "s1"):
            ext, data = encode_image(np.zeros((8, 8, 3), np.uint8))
            add_member(tar, f"{key}.clean.{ext}", data)
            add_member(tar, f"{key}.json", json.dumps({"type": "clean"}).encode())
    manifest = {"mode": "clean", "preset": None,
                "shards": [{"name": shard.name, "samples": 3, "sha256": sha256_file(shard)}]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    report = inspect_shards(str(tmp_path))
    assert not report["ok"] and report["shards"][0]["problem"] == "2 samples, manifest says 3"


def test_raw_images_are_written_with_zstds_content_checksum():
    """Without the frame checksum a flipped bit in the pixel payload decodes to wrong pixels silently."""
    import zstandard

    _, payload = encode_image(np.zeros((8, 8, 3), np.uint8))
    assert zstandard.get_frame_parameters(payload).has_checksum


def test_a_damaged_manifest_is_named_by_inspect_and_by_the_shard_listing(tmp_path):
    """A manifest cut short (a full disk, an interrupted copy) is named, not a bare JSONDecodeError."""
    from m2r.data.shard_list import resolve_shards
    from m2r.shards.inspect import inspect_shards

    (tmp_path / "shard-000000.tar").write_bytes(b"")
    (tmp_path / "manifest.json").write_text('{"format": "m2r-shards/1", "shards": [{"name": "sha')
    for read in (inspect_shards, resolve_shards):
        with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'manifest.json'}: not valid json")):
            read(str(tmp_path))


def test_a_recipe_naming_builds_preset_field_instead_of_degradations_is_refused(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"src: [{tmp_path}]\nout: {tmp_path / 'out'}\npreset: cdd11\n")
    with pytest.raises(ConfigError, match=r"unknown keys \['preset'\]"):
        _read_recipe(str(recipe))
