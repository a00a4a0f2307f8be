"""The benchmarks as their public downloads unpack, names and folders as published: Outdoor-Rain's Test1
(Test1/in/im_0301_s80_a04.png -> Test1/gt/im_0301.png), Histoformer's AllWeather test folders (test/Test1,
test/RainDrop), WeatherDiffusion's raindrop/test, and CDD-11's CDD-11_train/ and CDD-11_test/ folders."""
import shutil
from types import SimpleNamespace

import pytest

from finetune_layouts import write_image
from m2r.eval.datasets import (CDD11_TYPES, DatasetLayoutError, allweather_test_sets, cdd11_pairs, evaluation_sets,
                               train_pairs)

RAIN = ("_s80_a04", "_s90_a05", "_s100_a06")


def test_outdoor_rain_test1_as_released_pairs_every_input_with_its_scene(tmp_path):
    for scene in (301, 302):
        write_image(tmp_path / f"Test1/gt/im_{scene:04d}.png", (16, 16), scene)
        for k, setting in enumerate(RAIN):
            write_image(tmp_path / f"Test1/in/im_{scene:04d}{setting}.png", (16, 16), scene * 10 + k)
    pairs = allweather_test_sets(tmp_path, ["outdoor_rain"])["outdoor_rain"]
    assert len(pairs) == 6
    assert all(p.gt.name == p.lq.name[:7] + ".png" for p in pairs)


def test_histoformers_test_folders_are_found_and_none_of_the_paper_sets_is_left_out(tmp_path):
    for rel in ("test/Test1/input/im_0301_s80_a04.png", "test/Test1/gt/im_0301_s80_a04.png",
                "test/RainDrop/input/0_rain.png", "test/RainDrop/gt/0_rain.png",
                "test/Snow100K-L/synthetic/a.jpg", "test/Snow100K-L/gt/a.jpg"):
        write_image(tmp_path / rel, (16, 16), 0)
    assert list(allweather_test_sets(tmp_path)) == ["outdoor_rain", "snow100k_l", "raindrop_a"]


@pytest.mark.parametrize("folder", ["raindrop/test", "raindrop_data/test_a"])   # WeatherDiffusion's, DeRaindrop's
def test_other_raindrop_test_folders_are_found(tmp_path, folder):
    write_image(tmp_path / folder / "input/0_rain.png", (16, 16), 0)
    write_image(tmp_path / folder / "gt/0_clean.png", (16, 16), 0)
    assert [p.gt.name for p in allweather_test_sets(tmp_path, ["raindrop_a"])["raindrop_a"]] == ["0_clean.png"]


@pytest.mark.parametrize("folder, list_file", [("allweather", "allweather/allweather.txt"), (".", None)])
def test_weatherdiffusions_and_histoformers_training_folders_are_found(tmp_path, folder, list_file):
    for name in ("a.png", "b.png"):
        write_image(tmp_path / folder / "input" / name, (16, 16), 0)
        write_image(tmp_path / folder / "gt" / name, (16, 16), 1)
    if list_file:   # WeatherDiffusion's list: one input path a line
        (tmp_path / list_file).write_text("allweather/input/b.png\n")
    pairs = train_pairs("allweather", str(tmp_path))
    assert [p.lq.name for p in pairs] == (["b.png"] if list_file else ["a.png", "b.png"])
    assert all(p.gt.parent.name == "gt" for p in pairs)


@pytest.mark.parametrize("nested", [False, True])
def test_cdd11_as_downloaded_in_cdd11_train_and_cdd11_test(tmp_path, nested):
    for split, count in (("train", 2), ("test", 1)):
        base = tmp_path / f"CDD-11_{split}" / (f"CDD-11_{split}" if nested else "")
        for i in range(count):
            write_image(base / "clear" / f"{i + 1:06d}.png", (16, 16), i)
            for kind in CDD11_TYPES:
                write_image(base / kind / f"{i + 1:06d}.png", (16, 16), i + 1)
    test = evaluation_sets("cdd11", str(tmp_path))
    assert list(test) == list(CDD11_TYPES) and all(len(pairs) == 1 for pairs in test.values())
    assert test["rain"][0].gt.parent.name == "clear"
    assert len(train_pairs("cdd11", str(tmp_path))) == 2 * 11
    assert len(cdd11_pairs(tmp_path, "test")["low"]) == 1


def test_evaluate_warns_when_a_paper_set_is_not_found_and_the_average_shrinks(tmp_path, capsys):
    from m2r.evaluate import listed_sets

    write_image(tmp_path / "test/Snow100K-L/synthetic/a.jpg", (16, 16), 0)
    write_image(tmp_path / "test/Snow100K-L/gt/a.jpg", (16, 16), 0)
    args = SimpleNamespace(dataset="allweather", root=str(tmp_path), sets="", limit=0, official_sizes=False,
                           out=str(tmp_path / "out"))
    assert list(listed_sets(args)) == ["snow100k_l"]
    printed = capsys.readouterr().out
    assert "outdoor_rain (looked for" in printed and "raindrop_a (looked for" in printed
    assert "the average covers only snow100k_l" in printed


def test_an_outdoor_rain_input_takes_a_target_of_its_own_name_before_its_scenes(tmp_path):
    """Histoformer's test/Test1 ships one target per input, named as the input; the scene rule is a fallback,
    and only for names exactly im_<n>_s<n>_a<n>."""
    for rel in ("Test1/input/im_0301_s80_a04.png", "Test1/gt/im_0301_s80_a04.png", "Test1/gt/im_0301.png",
                "Test1/input/im_0302_s80_a04_copy.png", "Test1/gt/im_0302.png"):
        write_image(tmp_path / rel, (16, 16), 0)
    with pytest.raises(DatasetLayoutError, match="no target for .*im_0302_s80_a04_copy.png"):
        allweather_test_sets(tmp_path, ["outdoor_rain"])
    (tmp_path / "Test1/input/im_0302_s80_a04_copy.png").unlink()
    pairs = allweather_test_sets(tmp_path, ["outdoor_rain"])["outdoor_rain"]
    assert [p.gt.name for p in pairs] == ["im_0301_s80_a04.png"]


def test_a_training_folder_of_a_published_layout_wins_over_input_and_gt_at_the_root(tmp_path):
    """The root itself (Histoformer's layout) is the last candidate: a TransWeather or WeatherDiffusion root
    that also holds input/ and gt/ for another purpose trains on its own training folder."""
    for folder in ("train/allweather", "allweather", "."):
        write_image(tmp_path / folder / "input" / "a.png", (16, 16), 0)
        write_image(tmp_path / folder / "gt" / "a.png", (16, 16), 1)
    assert train_pairs("allweather", str(tmp_path))[0].lq == tmp_path / "train/allweather/input/a.png"
    shutil.rmtree(tmp_path / "train")
    assert train_pairs("allweather", str(tmp_path))[0].lq == tmp_path / "allweather/input/a.png"


def test_evaluate_says_nothing_of_the_paper_sets_it_was_not_asked_for(tmp_path, capsys):
    from m2r.evaluate import listed_sets

    write_image(tmp_path / "test/Snow100K-L/synthetic/a.jpg", (16, 16), 0)
    write_image(tmp_path / "test/Snow100K-L/gt/a.jpg", (16, 16), 0)
    args = SimpleNamespace(dataset="allweather", root=str(tmp_path), sets="snow100k_l", limit=0,
                           official_sizes=False, out=str(tmp_path / "out"))
    assert list(listed_sets(args)) == ["snow100k_l"]
    assert "warning" not in capsys.readouterr().out
