"""Damaged inputs fail loudly and name themselves: shard samples, image files, weight files, and
pairs of a finetuning or evaluation dataset (checked before the first step, not when drawn)."""
import re

import numpy as np
import pytest
import safetensors.torch
import torch
import zstandard
from PIL import Image

from finetune_layouts import build_allweather
from m2r.data.images import UnreadableImage, read_rgb, read_size
from m2r.data.shard_format import RAW_HEADER, RAW_MAGIC, CorruptSample, decode_image, decode_record, encode_image
from m2r.eval.datasets import DatasetLayoutError, PairedImages, train_pairs
from m2r.models.convert import CheckpointMismatch, read_checkpoint
from m2r.shards.build import BuildOptions, build


def noisy_image(height=40, width=48, seed=0):
    return np.random.default_rng(seed).integers(0, 40, (height, width, 3), dtype=np.uint8)


def truncate(path, keep=200):
    """Keep the first `keep` bytes: the header still reads, the pixel data does not."""
    path.write_bytes(path.read_bytes()[:keep])


# ---------------------------------------------------------------------------------------- shard samples
def test_a_bit_flipped_zstd_sample_is_corrupt_not_wrong_pixels():
    ext, data = encode_image(noisy_image())
    damaged = bytearray(data)
    for i in range(100, 600):   # inside the compressed pixels; the frame header stays intact
        damaged[i] ^= 0x5A
    with pytest.raises(CorruptSample, match="checksum"):
        decode_image(ext, bytes(damaged))
    with pytest.raises(CorruptSample, match="sample 000000007: cannot decode"):   # what the stream counts
        decode_record({"__key__": "000000007", f"clean.{ext}": bytes(damaged)})


def test_samples_written_before_the_checksum_still_decode():
    image = noisy_image()
    raw = RAW_HEADER.pack(RAW_MAGIC, *image.shape) + image.tobytes()
    without_checksum = zstandard.ZstdCompressor(level=3).compress(raw)
    ext, with_checksum = encode_image(image)
    assert len(with_checksum) == len(without_checksum) + 4   # zstd's 32-bit content checksum
    assert np.array_equal(decode_image(ext, without_checksum), image)


# ---------------------------------------------------------------------------------------- image files
def test_a_truncated_image_names_its_file_but_its_header_still_reads(tmp_path):
    path = tmp_path / "cut.png"
    Image.fromarray(noisy_image()).save(path)
    truncate(path)
    assert read_size(path) == (48, 40)
    with pytest.raises(UnreadableImage, match=f"{re.escape(str(path))}: cannot read image .*truncated"):
        read_rgb(path)


def test_the_shard_builder_skips_a_truncated_source_image_and_lists_it(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(noisy_image()).save(source / name)
    truncate(source / "b.png")
    manifest = build(BuildOptions(src=[str(source)], out=str(tmp_path / "out")), progress=False)
    assert manifest["samples"] == 1
    assert [(entry["path"], entry["error"].split(":")[0]) for entry in manifest["skipped"]] == \
        [(str(source / "b.png"), "UnreadableImage")]


def test_a_pair_damaged_inside_its_pixels_is_named_when_read(tmp_path):
    """The up-front check reads headers only, so such a pair fails when it is drawn, naming the file."""
    root = build_allweather(tmp_path / "aw", train=2)
    truncate(root / "train/input/im_0001.png")
    pairs = train_pairs("allweather", str(root))
    dataset = PairedImages(pairs, ["allweather"])
    assert dataset[0]["lq"].shape == (3, 40, 48)
    with pytest.raises(UnreadableImage, match="train/input/im_0001.png: cannot read image"):
        dataset[1]


# ---------------------------------------------------------------------------------------- weight files
def _text(path):
    path.write_text("hello\n")


def _truncated_safetensors(path):
    safetensors.torch.save_file({"w": torch.zeros(4)}, str(path))
    truncate(path, keep=20)


def _truncated_torch_archive(path):
    torch.save({"w": torch.zeros(4)}, path)
    truncate(path, keep=300)


def _safetensors_under_another_suffix(path):
    path.write_bytes(safetensors.torch.save({"w": torch.zeros(4)}))


@pytest.mark.parametrize("name, write", [("text.pt", _text), ("cut.safetensors", _truncated_safetensors),
                                         ("cut.pt", _truncated_torch_archive),
                                         ("safetensors.pt", _safetensors_under_another_suffix)])
def test_a_file_that_is_no_checkpoint_is_named_as_such(tmp_path, name, write):
    path = tmp_path / name
    write(path)
    with pytest.raises(CheckpointMismatch, match=f"{re.escape(str(path))} is not a readable checkpoint"):
        read_checkpoint(path)


class NotATensor:
    pass


def test_a_torch_archive_of_other_objects_gets_the_weights_only_advice(tmp_path):
    path = tmp_path / "objects.pt"
    torch.save({"w": NotATensor()}, path)
    advice = "(?s)objects.pt holds more than tensors .* load it with weights_only=False"
    with pytest.raises(CheckpointMismatch, match=advice):
        read_checkpoint(path)


# ---------------------------------------------------------------------------------------- dataset pairs
def test_training_pairs_are_checked_before_any_is_drawn(tmp_path):
    root = build_allweather(tmp_path / "aw", size=(40, 48), train=6)
    Image.new("RGB", (20, 20)).save(root / "train/gt/im_0002.png")
    (root / "train/gt/im_0004.png").write_bytes(b"not a png")
    expected = (f"2 of 6 image pairs cannot be used, first: {root}/train/input/im_0002.png is 48x40 but its "
                f"target {root}/train/gt/im_0002.png is 20x20")
    with pytest.raises(DatasetLayoutError, match=re.escape(expected)):
        train_pairs("allweather", str(root))


def test_evaluate_checks_the_pairs_it_will_read_before_loading_the_model(tmp_path):
    from m2r import evaluate

    root = build_allweather(tmp_path / "aw", train=2)
    Image.new("RGB", (48, 41)).save(root / "test_rain/gt/im_0001_s80_a04.png")   # the second pair of its set
    command = ["--weights", str(tmp_path / "missing.safetensors"), "--dataset", "allweather", "--root", str(root),
               "--out", str(tmp_path / "out")]
    with pytest.raises(DatasetLayoutError, match="1 of 8 image pairs cannot be used, first: .*im_0001_s80_a04.png "
                                                 "is 48x40 but its target .* is 48x41"):
        evaluate.main(command)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):   # --limit 1 never reads that pair
        evaluate.main([*command, "--limit", "1"])
