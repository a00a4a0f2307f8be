"""Public dataset layouts: pairs found exactly, problems reported with their path."""
import numpy as np
import pytest
import torch

from finetune_layouts import build_allweather, build_cdd11
from m2r.eval.datasets import (ALLWEATHER_PAPER_SETS, CDD11_TYPES, DatasetLayoutError, PairedImages,
                               allweather_test_sets, allweather_train_pairs, cdd11_pairs, evaluation_sets,
                               read_pair)
from m2r.eval.tiling import pad_to_multiple, restore_image, tile_starts


def test_allweather_train_follows_the_list_file(tmp_path):
    root = build_allweather(tmp_path / "aw", train=4)
    (root / "filenames.txt").write_text("./input/im_0001.png\nim_0003.png\n")
    pairs = allweather_train_pairs(root)
    assert [p.lq.name for p in pairs] == ["im_0001.png", "im_0003.png"]
    assert all(p.gt == root / "train/gt" / p.lq.name for p in pairs)


def test_allweather_train_in_transweathers_layout(tmp_path):
    """train/allweather/{input,gt} with train/allweather.txt: train/ exists too but holds no input folder."""
    root = build_allweather(tmp_path / "aw", train=3)
    (root / "train").rename(tmp_path / "allweather")
    (root / "train").mkdir()
    (tmp_path / "allweather").rename(root / "train/allweather")
    (root / "filenames.txt").unlink()
    (root / "train/allweather.txt").write_text("./allweather/input/im_0002.png\n")
    pairs = allweather_train_pairs(root)
    assert [(p.lq, p.gt) for p in pairs] == [(root / "train/allweather/input/im_0002.png",
                                             root / "train/allweather/gt/im_0002.png")]
    (root / "train/allweather/input").rename(root / "train/allweather/elsewhere")
    with pytest.raises(DatasetLayoutError,
                       match=r"none of \['train', 'train/allweather', 'allweather', '\.'\] holds an input folder"):
        allweather_train_pairs(root)


def test_allweather_test_sets_in_their_public_layouts(tmp_path):
    root = build_allweather(tmp_path / "aw")
    sets = allweather_test_sets(root)
    assert list(sets) == ["outdoor_rain", "snow100k_s", "snow100k_l", "raindrop_a"]
    assert set(ALLWEATHER_PAPER_SETS) <= set(sets)
    raindrop = sets["raindrop_a"][0]
    assert (raindrop.lq.parent.name, raindrop.lq.name, raindrop.gt.name) == ("data", "0_rain.png", "0_clean.png")
    assert sets["snow100k_l"][0].lq.parent == root / "test/Snow100K-L/synthetic"


def test_official_sizes_resize_raindrop_pairs_only_as_the_official_test_does(tmp_path):
    from PIL import Image

    sets = allweather_test_sets(build_allweather(tmp_path / "aw", size=(40, 48)))
    raindrop, rain = sets["raindrop_a"][0], sets["outdoor_rain"][0]
    lq, gt = read_pair(raindrop, official_sizes=True)
    assert lq.shape == gt.shape == (480, 720, 3)
    official = Image.open(raindrop.lq).convert("RGB").resize((720, 480), Image.BICUBIC)
    np.testing.assert_array_equal(lq, np.asarray(official))
    assert read_pair(raindrop)[0].shape == (40, 48, 3)
    assert read_pair(rain, official_sizes=True)[0].shape == (40, 48, 3)


def test_cdd11_pairs_every_type_with_clear_including_rain_in_train(tmp_path):
    root = build_cdd11(tmp_path / "cdd")
    train = cdd11_pairs(root, "train")
    assert list(train) == list(CDD11_TYPES)
    rain = train["rain"][0]
    assert rain.gt == root / "train/clear/000.png"  # not .../tclear/...
    assert len(evaluation_sets("cdd11", str(root))) == 11


def test_missing_or_malformed_folders_name_the_path(tmp_path):
    root = build_cdd11(tmp_path / "cdd")
    (root / "test/clear/000.png").unlink()
    with pytest.raises(DatasetLayoutError, match=r"no target for .*test/low/000.png"):
        cdd11_pairs(root, "test")
    with pytest.raises(DatasetLayoutError, match=r"missing CDD-11 folder .*nowhere/train/clear"):
        cdd11_pairs(tmp_path / "nowhere", "train")
    with pytest.raises(DatasetLayoutError, match="no AllWeather test set under"):
        allweather_test_sets(tmp_path / "empty")
    aw = build_allweather(tmp_path / "aw")
    with pytest.raises(DatasetLayoutError, match="snow100k_s"):
        allweather_test_sets(tmp_path / "empty", ["snow100k_s"])
    (aw / "filenames.txt").write_text("im_9999.png\n")
    with pytest.raises(DatasetLayoutError, match="im_9999.png"):
        allweather_train_pairs(aw)


def test_training_crops_are_aligned_and_reproducible(tmp_path):
    root = build_allweather(tmp_path / "aw", size=(37, 53))
    pairs = allweather_train_pairs(root)
    data = PairedImages(pairs, ["allweather"], crop=16, seed=3)
    first, again = data[1], data[1]
    assert first["lq"].shape == (3, 16, 16) and first["lq"].dtype == torch.uint8
    assert torch.equal(first["gt"], again["gt"])
    data.set_epoch(1)
    assert not torch.equal(first["gt"], data[1]["gt"])
    # lq is gt + bounded noise, so an aligned crop stays within the noise amplitude
    assert (first["lq"].int() - first["gt"].int()).abs().max() <= 20


class Identity(torch.nn.Module):
    """Stands in for M2Restore: checks the size rule and returns its input."""

    def forward(self, x):
        assert x.shape[-1] % 8 == 0 and x.shape[-2] % 8 == 0 and min(x.shape[-2:]) >= 16
        return type("Out", (), {"restored": x})()


@pytest.mark.parametrize("size", [(5, 7), (21, 35), (64, 64)])
def test_padding_is_cropped_back_exactly(size):
    image = torch.rand(1, 3, *size)
    assert torch.equal(restore_image(Identity(), image), image)
    assert pad_to_multiple(image).shape[-2] % 8 == 0


def test_tiles_cover_the_image_and_blend_back_to_it():
    assert tile_starts(100, 32, 8) == [0, 24, 48, 68]
    image = torch.rand(1, 3, 61, 90)
    np.testing.assert_allclose(restore_image(Identity(), image, tile=32, overlap=8), image, atol=1e-6)


class TileCounter(torch.nn.Module):
    """Returns its input plus the number of windows restored before it (0 for the first tile), and records
    each window's size: where tiles overlap, the output shows how they were blended."""

    def __init__(self):
        super().__init__()
        self.windows = []

    def forward(self, x):
        self.windows.append(tuple(x.shape[-2:]))
        return type("Out", (), {"restored": x + len(self.windows) - 1})()


def test_overlapping_tiles_cross_fade_linearly_and_pixels_of_one_tile_are_that_tiles_output():
    """Two 32-px tiles over 56 columns overlap by exactly 8: columns 24..31 fade from the first tile to
    the second, (x - 23) / 9 of the way; columns only one tile covers take its output unchanged."""
    image = torch.rand(1, 3, 16, 56)
    blend = restore_image(TileCounter(), image, tile=32, overlap=8) - image
    expected = torch.cat([torch.zeros(24), torch.arange(1, 9) / 9, torch.ones(24)])
    torch.testing.assert_close(blend, expected.expand_as(blend), atol=1e-5, rtol=0)


def test_a_side_shorter_than_the_tile_is_restored_whole_and_the_other_side_tiled():
    """A wide strip (20 x 90 px, tile 32): windows are 24 px high (the padded height) and never wider than the
    tile; only an image that fits the tile on both sides is restored in one piece."""
    model, image = TileCounter(), torch.rand(1, 3, 20, 90)
    restored = restore_image(model, image, tile=32, overlap=8)
    assert restored.shape == image.shape
    assert model.windows == [(24, 32)] * 4
    with pytest.raises(ValueError, match="overlap=32"):
        restore_image(model, image, tile=32, overlap=32)


@pytest.mark.parametrize("size", [(8, 12), (16, 8)])
def test_padding_as_wide_as_the_image_side_is_replicated(size):
    """Reflect padding needs a pad smaller than the side: an 8-px side padded to 16 takes replicate."""
    image = torch.rand(1, 3, *size)
    padded = pad_to_multiple(image)
    assert padded.shape[-2:] == (16, 16)
    assert torch.equal(padded[..., :size[0], :size[1]], image)


def _png(path, seed, size=(40, 48)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def test_a_target_with_the_inputs_exact_name_wins_over_one_with_another_suffix(tmp_path):
    """Gt/a.png is a.png's target even when gt/a.jpg exists (sorted suffixes put .jpg first)."""
    from m2r.eval.datasets import folder_pairs

    _png(tmp_path / "input/a.png", 0)
    _png(tmp_path / "gt/a.png", 1)
    _png(tmp_path / "gt/a.jpg", 2)
    assert [p.gt.name for p in folder_pairs(tmp_path)["folder"]] == ["a.png"]


def test_inputs_sharing_a_stem_never_take_each_others_target(tmp_path):
    """input/a.jpg and input/a.png with only gt/a.png: a.jpg has no target (gt/a.png is a.png's); a
    lone input still finds its target under another suffix."""
    from m2r.eval.datasets import folder_pairs

    for name in ("input/a.jpg", "input/a.png", "gt/a.png", "input/b.jpg", "gt/b.png"):
        _png(tmp_path / name, 0)
    with pytest.raises(DatasetLayoutError, match=r"no target for .*input/a\.jpg .*with the suffix \.jpg "
                                                 r"\(another input shares its stem\)"):
        folder_pairs(tmp_path)
    _png(tmp_path / "gt/a.jpg", 0)
    assert [(p.lq.name, p.gt.name) for p in folder_pairs(tmp_path)["folder"]] == [
        ("a.jpg", "a.jpg"), ("a.png", "a.png"), ("b.jpg", "b.png")]


def test_a_folder_trains_on_the_images_its_list_file_names(tmp_path):
    """data.list_file selects a folder's training images as it does AllWeather's (else a held-out subset named
    in a list would be trained on); evaluation still reads the whole folder."""
    from m2r.eval.datasets import folder_pairs, train_pairs

    for name in ("a", "b", "c"):
        _png(tmp_path / f"data/input/{name}.png", 0)
        _png(tmp_path / f"data/gt/{name}.png", 1)
    (tmp_path / "train.txt").write_text("./input/c.png\na.png\n")
    pairs = train_pairs("folder", str(tmp_path / "data"), str(tmp_path / "train.txt"))
    assert [(p.lq.name, p.gt.name) for p in pairs] == [("c.png", "c.png"), ("a.png", "a.png")]
    assert len(folder_pairs(tmp_path / "data")["folder"]) == 3
    with pytest.raises(DatasetLayoutError, match="list file .*missing.txt not found"):
        train_pairs("folder", str(tmp_path / "data"), str(tmp_path / "missing.txt"))


def test_a_folder_with_its_own_folder_names_is_told_the_names_taken_and_how_to_give_them(tmp_path):
    from m2r.eval.datasets import folder_pairs

    _png(tmp_path / "noisy/a.png", 0)
    _png(tmp_path / "clean/a.png", 1)
    with pytest.raises(DatasetLayoutError, match=r"none of the folders \['input', .*\] \(it holds \['clean', "
                                                 r"'noisy'\]\).*ln -s <yours> .*/input"):
        folder_pairs(tmp_path)


def test_a_folder_of_set_subfolders_holds_one_set_per_subfolder_named_after_it(tmp_path):
    """Per-camera test sets under one root: <root>/<set>/{input,gt}; a subfolder holding neither is no set, a set
    named like an input folder (data/) is a set all the same, and names choose among the sets in their order."""
    from m2r.eval.datasets import evaluation_sets, folder_pairs

    for folder in ("night", "day", "data"):
        _png(tmp_path / folder / "input/a.png", 0)
        _png(tmp_path / folder / "gt/a.png", 1)
    _png(tmp_path / "notes/plot.png", 2)
    sets = folder_pairs(tmp_path)
    assert list(sets) == ["data", "day", "night"]
    assert [(p.lq, p.group) for p in sets["night"]] == [(tmp_path / "night/input/a.png", "night")]
    assert list(evaluation_sets("folder", str(tmp_path), ["night", "day"])) == ["night", "day"]
    with pytest.raises(DatasetLayoutError, match=r"folder sets \['fog'\] are not under .*: its sets \(subfolders "
                                                 r"holding an input or target folder, input/.*\) are "
                                                 r"\['data', 'day', 'night'\]"):
        folder_pairs(tmp_path, ["fog", "day"])


def test_a_folder_that_is_itself_a_layout_stays_the_one_set_folder_and_refuses_set_names(tmp_path):
    from m2r.eval.datasets import folder_pairs

    _png(tmp_path / "input/a.png", 0)
    _png(tmp_path / "gt/a.png", 1)
    _png(tmp_path / "night/input/a.png", 0)   # beside a layout of its own: not a set
    assert list(folder_pairs(tmp_path)) == ["folder"]
    with pytest.raises(DatasetLayoutError, match=rf"sets \['night'\] asked for, but {tmp_path} is itself one folder "
                                                 r"set \(it holds \['input', 'gt'\]\), named 'folder'"):
        folder_pairs(tmp_path, ["night"])


def test_a_half_made_set_subfolder_is_refused_not_skipped(tmp_path):
    """A set whose inputs are missing would drop out of the table and of the validation without a word."""
    from m2r.eval.datasets import folder_pairs

    _png(tmp_path / "day/input/a.png", 0)
    _png(tmp_path / "day/gt/a.png", 1)
    _png(tmp_path / "night/gt/a.png", 1)
    with pytest.raises(DatasetLayoutError, match=r"night has none of the folders \['input', .*\(it holds \['gt'\]\)"):
        folder_pairs(tmp_path)


def test_a_set_subfolder_named_otherwise_is_left_out_in_a_warning_naming_it(tmp_path, capsys):
    """A set whose folders are not named input/gt (night/{noisy,clean}), or a sibling run's folder beside the sets,
    is no set: the warning says so, where it would otherwise drop out of the table without a word."""
    from m2r.eval.datasets import folder_pairs

    _png(tmp_path / "day/input/a.png", 0)
    _png(tmp_path / "day/gt/a.png", 1)
    _png(tmp_path / "night/noisy/a.png", 0)
    _png(tmp_path / ".cache/a.png", 0)   # hidden: never a set, never named
    assert list(folder_pairs(tmp_path)) == ["day"]
    assert f"WARNING: {tmp_path}: subfolders ['night'] hold no input or target folder" in capsys.readouterr().out


def test_a_set_linked_to_a_missing_folder_is_refused_not_left_out(tmp_path):
    """A set on a file system not mounted on this node would drop out of the validation of a 64-GPU run."""
    from m2r.eval.datasets import folder_pairs

    _png(tmp_path / "day/input/a.png", 0)
    _png(tmp_path / "day/gt/a.png", 1)
    (tmp_path / "cam_nfs").symlink_to(tmp_path / "unmounted/cam_nfs")
    with pytest.raises(DatasetLayoutError, match=r"\['cam_nfs'\] link to missing folders"):
        folder_pairs(tmp_path)


def test_a_root_that_is_a_sets_input_folder_says_to_name_its_parent(tmp_path):
    from m2r.eval.datasets import folder_pairs

    _png(tmp_path / "day/input/a.png", 0)
    _png(tmp_path / "day/gt/a.png", 1)
    with pytest.raises(DatasetLayoutError, match=rf"holds images itself .*input folder: {tmp_path / 'day'}\)"):
        folder_pairs(tmp_path / "day/input")


def test_a_folder_with_neither_a_layout_nor_set_subfolders_names_both_and_what_it_holds(tmp_path):
    from m2r.eval.datasets import folder_pairs

    _png(tmp_path / "day/noisy/a.png", 0)
    with pytest.raises(DatasetLayoutError, match=r"has none of the folders \['input', .*\] \(it holds \['day'\]\) "
                                                 r"and no subfolder holding one \(<root>/<set>/input, one set each\)"):
        folder_pairs(tmp_path)
    with pytest.raises(DatasetLayoutError, match=f"missing folder {tmp_path / 'nowhere'}"):
        folder_pairs(tmp_path / "nowhere")


def test_cdd11_inputs_sharing_a_stem_never_take_each_others_target(tmp_path):
    from m2r.eval.datasets import cdd11_pairs

    for name in ("test/low/a.jpg", "test/low/a.png", "test/clear/a.png"):
        _png(tmp_path / name, 0)
    with pytest.raises(DatasetLayoutError, match=r"no target for .*low/a\.jpg .*another input shares its stem"):
        cdd11_pairs(tmp_path, "test", types=["low"])


def test_a_listed_input_whose_stem_another_input_shares_keeps_its_suffix(tmp_path):
    """names=['a.jpg'] with input/a.png beside it: gt/a.png is a.png's target, not a.jpg's."""
    from m2r.eval.datasets import paired_folder

    for name in ("input/a.jpg", "input/a.png", "gt/a.png"):
        _png(tmp_path / name, 0)
    with pytest.raises(DatasetLayoutError, match="another input shares its stem"):
        paired_folder(tmp_path, "set", names=["a.jpg"])


def test_finetuning_crops_are_drawn_again_every_epoch(tmp_path):
    """The random crop (and flip) of an image depends on the epoch, or every epoch trains on the
    same windows of every image."""
    from m2r.eval.datasets import Pair, PairedImages

    pairs = []
    for i in range(4):
        _png(tmp_path / f"lq{i}.png", i, (64, 64))
        pairs.append(Pair(tmp_path / f"lq{i}.png", tmp_path / f"lq{i}.png", "g"))
    data = PairedImages(pairs, ["g"], crop=16, seed=0, augment=True)
    first = [data[i]["lq"] for i in range(4)]
    data.set_epoch(1)
    second = [data[i]["lq"] for i in range(4)]
    assert any(not torch.equal(a, b) for a, b in zip(first, second))


def test_training_inputs_shorter_than_the_crop_are_counted_in_a_warning(tmp_path, capsys):
    """Training upscales them (m2r.data.augment): pre-cut patches smaller than the recipe's crop would otherwise
    train on blurred copies without a word."""
    from m2r.eval.datasets import train_pairs

    for name, (height, width) in (("a", (64, 64)), ("b", (32, 32)), ("c", (48, 48)), ("d", (40, 96))):
        _png(tmp_path / f"input/{name}.png", 0, (height, width))   # d: only its height is short of 48
        _png(tmp_path / f"gt/{name}.png", 1, (height, width))
    train_pairs("folder", str(tmp_path), crop=48)
    assert "WARNING: 2 of 4 training inputs have a side shorter than train.crop=48 (first: " \
           f"{tmp_path / 'input/b.png'}, 32x32)" in capsys.readouterr().out
    train_pairs("folder", str(tmp_path), crop=32)
    assert "WARNING" not in capsys.readouterr().out
