"""Paired image sets in the public layouts of AllWeather and CDD-11, and plain input/gt folders.

AllWeather (TransWeather / WeatherDiff / M2Restore lineage), under one root:
    train:  train/input/<name> + train/gt/<name>  (or TransWeather's train/allweather/{input,gt},
            WeatherDiffusion's allweather/{input,gt}, Histoformer's {input,gt} at the root); optional list
            file (first found: filenames.txt, allweather.txt, train/allweather.txt, allweather/allweather.txt,
            or the one given); list lines may be bare names or paths ("./input/x.png"): the basename counts.
    tests:  outdoor_rain  Outdoor-Rain Test1   test_rain/ | test1/ | Test1/ | test/test1/ | test/Test1/ |
                                               outdoor-rain/test1/
            snow100k_s    Snow100K-S           Snow100K-S/ | test/Snow100K-S/ | snow100k/test/Snow100K-S/
            snow100k_l    Snow100K-L           test_snow/ | Snow100K-L/ | test/Snow100K-L/ | snow100k/test/Snow100K-L/
            raindrop_a    RainDrop test_a      test_raindrop/ | test_a/ | raindrop/test_a/ |
                                               raindrop_data/test_a/ | test/RainDrop/ | raindrop/test/
    each holding degraded images in input/ (Snow100K: synthetic/, RainDrop: data/, Outdoor-Rain's release:
    in/) and targets in gt/. A target has the input's name, or for RainDrop `<id>_clean.<ext>` for
    `<id>_rain.<ext>`, or for Outdoor-Rain `im_<n>.<ext>` for `im_<n>_s<..>_a<..>.<ext>` (one target a scene).
CDD-11 (OneRestore): <root>/<train|test>/<type>/<name> (or the download's CDD-11_<split>/, also nested once)
    with targets <split folder>/clear/<name>, for the 11 types below. Types are found by folder name, never
    by string replacement in the path (the official code turns train/rain into tclear).
folder: <root>/input/ (or another of INPUT_DIRS) and <root>/gt/ (or target/), matched by name; for training, an
    optional list file (data.list_file, never looked for) selects the inputs, in the list's format above.
    For evaluation and validation such a root is the one set `folder`; a root without an input or target folder
    of its own whose subfolders are such layouts (<root>/<set>/{input,gt}) holds one set per subfolder, named
    after it (subfolders holding neither are left out, named in a warning; a link to a missing folder is refused),
    and set names choose among them.

Every problem (missing folder, image without target, empty set) raises DatasetLayoutError naming the path.
The training pairs (and the pairs `m2r.evaluate` will read) are checked up front from the image headers:
an unidentifiable image or a pair whose sizes differ stops the run before it starts, not when that pair is
drawn.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from m2r import dist
from m2r.data.augment import random_crop, random_dihedral
from m2r.data.images import IMAGE_SUFFIXES, list_image_files, read_rgb, read_size

CDD11_TYPES = ("low", "haze", "rain", "snow", "low_haze", "low_rain", "low_snow", "haze_rain", "haze_snow",
               "low_haze_rain", "low_haze_snow")
CDD11_CLEAR = "clear"
ALLWEATHER_TEST_DIRS: Dict[str, Sequence[str]] = {
    # Test1 (capital T) is the name in Outdoor-Rain's own release and in Histoformer's AllWeather layout
    "outdoor_rain": ("test_rain", "test1", "Test1", "test/test1", "test/Test1", "outdoor-rain/test1"),
    "snow100k_s": ("Snow100K-S", "test/Snow100K-S", "snow100k/test/Snow100K-S"),
    "snow100k_l": ("test_snow", "Snow100K-L", "test/Snow100K-L", "snow100k/test/Snow100K-L"),
    # test/RainDrop: Histoformer's layout; raindrop/test: WeatherDiffusion's (datasets/allweather.py)
    # raindrop_data/test_a: as the DeRaindrop download unpacks
    "raindrop_a": ("test_raindrop", "test_a", "raindrop/test_a", "raindrop_data/test_a", "test/RainDrop",
                   "raindrop/test"),
}
ALLWEATHER_PAPER_SETS = ("outdoor_rain", "snow100k_l", "raindrop_a")   # the paper's columns and average
# The official test resizes RainDrop pairs (input and target) to 720x480 with Pillow's default filter
# (bicubic); every other set is scored at its own size. m2r does the same only when asked.
OFFICIAL_TEST_SIZES = {"raindrop_a": (720, 480)}   # set -> (width, height)
# train/allweather: TransWeather's; allweather: WeatherDiffusion's; the root itself: Histoformer's (last)
ALLWEATHER_TRAIN_DIRS = ("train", "train/allweather", "allweather", ".")
ALLWEATHER_LIST_FILES = ("filenames.txt", "allweather.txt", "train/allweather.txt", "allweather/allweather.txt")
INPUT_DIRS = ("input", "synthetic", "data", "in", "lq")   # in/: Outdoor-Rain's own release
TARGET_DIRS = ("gt", "target")
DATASETS = ("allweather", "cdd11", "folder")
# CDD-11 as OneRestore's download unpacks (CDD-11_train/, CDD-11_test/, sometimes nested once) or renamed
CDD11_SPLIT_DIRS = ("{split}", "CDD-11_{split}", "CDD-11_{split}/CDD-11_{split}")
# Outdoor-Rain inputs im_0301_s80_a04 share one target per scene: im_0301
_OUTDOOR_RAIN_INPUT = re.compile(r"^(im_\d+)_s\d+_a\d+$")


class DatasetLayoutError(FileNotFoundError):
    """A dataset folder is missing or malformed; the message names the path."""


@dataclass(frozen=True)
class Pair:
    lq: Path
    gt: Path
    group: str   # test set or degradation type


def list_images(folder: Path) -> List[Path]:
    """The image files directly in `folder`, sorted."""
    if not folder.is_dir():
        raise DatasetLayoutError(f"missing folder {folder}")
    return list_image_files(folder)


def _first_dir(parent: Path, names: Sequence[str]) -> Path:
    for name in names:
        if (parent / name).is_dir():
            return parent / name
    raise _none_of_the_folders(parent, names, sorted(child.name for child in parent.iterdir() if child.is_dir()))


def _none_of_the_folders(parent: Path, names: Sequence[str], present: Sequence[str], also: str = ""
                         ) -> DatasetLayoutError:
    """`parent` lacks every folder of `names` (the fixed names of a layout): what it holds, and how to give yours."""
    return DatasetLayoutError(f"{parent} has none of the folders {list(names)} (it holds {list(present)}){also}; the "
                              f"names are fixed: rename yours, or link one, e.g. ln -s <yours> {parent / names[0]}")


def _target_for(lq: Path, gt_dir: Path, stem_shared: bool = False) -> Path:
    """Same name in gt_dir; for RainDrop's <id>_rain, <id>_clean; else the same stem with another
    suffix, unless another input shares the stem (a.jpg and a.png): the other's target is not this one's."""
    stems = [lq.stem] + ([lq.stem[: -len("_rain")] + "_clean"] if lq.stem.endswith("_rain") else [])
    scene = _OUTDOOR_RAIN_INPUT.match(lq.stem)
    stems += [scene.group(1)] if scene else []
    suffixes = [lq.suffix] if stem_shared else sorted(IMAGE_SUFFIXES)
    candidates = [gt_dir / lq.name] + [gt_dir / (stem + suffix) for stem in stems for suffix in suffixes]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked_for = (f"with the suffix {lq.suffix} (another input shares its stem)" if stem_shared
                  else "with an image suffix")
    raise DatasetLayoutError(f"no target for {lq} in {gt_dir} (looked for {' or '.join(stems)} {looked_for})")


def paired_folder(folder: Path, group: str, names: Optional[Sequence[str]] = None) -> List[Pair]:
    """Pairs from <folder>/<input dir> and <folder>/<target dir>; `names` restricts to those basenames."""
    if not folder.is_dir():
        raise DatasetLayoutError(f"missing folder {folder}")
    lq_dir, gt_dir = _first_dir(folder, INPUT_DIRS), _first_dir(folder, TARGET_DIRS)
    images = in_folder = list_images(lq_dir)
    if names is not None:
        by_name = {p.name: p for p in in_folder}
        absent = [name for name in names if name not in by_name]
        if absent:
            raise DatasetLayoutError(f"{len(absent)} listed images are not in {lq_dir}, e.g. {absent[:3]}")
        images = [by_name[name] for name in names]
    if not images:
        raise DatasetLayoutError(f"no images in {lq_dir}")
    return _with_targets(images, in_folder, gt_dir, group)


def _with_targets(images: Sequence[Path], in_folder: Sequence[Path], gt_dir: Path, group: str) -> List[Pair]:
    """`images` paired with their targets in `gt_dir`; `in_folder`: every input beside them (whose stems
    decide whether a target may differ in suffix)."""
    stems = Counter(lq.stem for lq in in_folder)
    return [Pair(lq, _target_for(lq, gt_dir, stems[lq.stem] > 1), group) for lq in images]


def read_list_file(path: Path) -> List[str]:
    """Basenames from a TransWeather/WeatherDiff list ('./input/x.png') or M2Restore filenames.txt ('x.png')."""
    lines = [line.strip().split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise DatasetLayoutError(f"list file {path} is empty")
    return [Path(line).name for line in lines]


def _allweather_train_folder(root: Path) -> Path:
    """The first of ALLWEATHER_TRAIN_DIRS that holds an input folder (train/ exists in TransWeather's too)."""
    for name in ALLWEATHER_TRAIN_DIRS:
        if any((root / name / input_dir).is_dir() for input_dir in INPUT_DIRS):
            return root / name
    raise DatasetLayoutError(f"{root}: none of {list(ALLWEATHER_TRAIN_DIRS)} holds an input folder "
                             f"({' or '.join(INPUT_DIRS)})")


def _given_list_file(list_file: str) -> Path:
    """data.list_file, which must exist."""
    if not Path(list_file).is_file():
        raise DatasetLayoutError(f"list file {list_file} not found")
    return Path(list_file)


def allweather_list_file(root: Path, list_file: Optional[str] = None) -> Optional[Path]:
    """The list file that selects the AllWeather training images: `list_file`, else the first of
    ALLWEATHER_LIST_FILES under `root`, else None (every image of the training folder)."""
    if list_file is not None:
        return _given_list_file(list_file)
    return next((Path(root) / name for name in ALLWEATHER_LIST_FILES if (Path(root) / name).is_file()), None)


def training_list_file(dataset: str, root: str, list_file: Optional[str] = None) -> Optional[Path]:
    """The list file that selects a dataset's training images, None for every image: AllWeather's (given or
    found under `root`), the one given for a folder; CDD-11 has none (its configs refuse data.list_file)."""
    if dataset == "allweather":
        return allweather_list_file(Path(root), list_file)
    if dataset == "folder" and list_file is not None:
        return _given_list_file(list_file)
    return None


def allweather_train_pairs(root: Path, list_file: Optional[str] = None) -> List[Pair]:
    folder = _allweather_train_folder(Path(root))
    chosen = allweather_list_file(root, list_file)
    names = read_list_file(chosen) if chosen is not None else None
    return paired_folder(folder, "allweather", names)


def allweather_test_sets(root: Path, names: Optional[Sequence[str]] = None) -> Dict[str, List[Pair]]:
    """The requested test sets (default: every one present); a requested but absent set is an error."""
    root = Path(root)
    unknown = [name for name in names or () if name not in ALLWEATHER_TEST_DIRS]
    if unknown:
        raise DatasetLayoutError(f"unknown AllWeather test sets {unknown}; known: {list(ALLWEATHER_TEST_DIRS)}")
    sets = {}
    for name in names or ALLWEATHER_TEST_DIRS:
        folder = next((root / d for d in ALLWEATHER_TEST_DIRS[name] if (root / d).is_dir()), None)
        if folder is None:
            if names:
                raise DatasetLayoutError(f"AllWeather test set {name}: none of {list(ALLWEATHER_TEST_DIRS[name])} "
                                         f"under {root}")
            continue
        sets[name] = paired_folder(folder, name)
    if not sets:
        raise DatasetLayoutError(f"no AllWeather test set under {root}; expected one of "
                                 + ", ".join(f"{k}: {list(v)}" for k, v in ALLWEATHER_TEST_DIRS.items()))
    return sets


def cdd11_pairs(root: Path, split: str, types: Sequence[str] = CDD11_TYPES) -> Dict[str, List[Pair]]:
    """{type: pairs} for a CDD-11 split; every type folder and the clear folder must exist."""
    candidates = [Path(root) / name.format(split=split) for name in CDD11_SPLIT_DIRS]
    split_dir = next((c for c in candidates if (c / CDD11_CLEAR).is_dir()), candidates[0])
    clear_dir = split_dir / CDD11_CLEAR
    if not clear_dir.is_dir():
        raise DatasetLayoutError(f"missing CDD-11 folder {clear_dir} (targets of every type; also looked in "
                                 f"{', '.join(str(c) for c in candidates[1:])})")
    sets = {}
    for kind in types:
        images = list_images(split_dir / kind)
        if not images:
            raise DatasetLayoutError(f"no images in {split_dir / kind}")
        sets[kind] = _with_targets(images, images, clear_dir, kind)
    return sets


def _pair_folders(folder: Path) -> List[Path]:
    return [folder / name for name in INPUT_DIRS + TARGET_DIRS if (folder / name).is_dir()]


def _is_folder_layout(folder: Path) -> bool:
    """Whether `folder` holds an input or target folder of its own; a set named like one (data/ holding
    input/ and gt/) is a set, not the inputs of its parent."""
    return any(not _pair_folders(child) for child in _pair_folders(folder))


def folder_pairs(root: Path, names: Optional[Sequence[str]] = None) -> Dict[str, List[Pair]]:
    """A folder layout at `root` is the one set `folder`; else each subfolder that is one is a set named after
    it (all of them, or those `names` chooses). Which it is, and the sets found, are named in every error."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"missing folder {root}")
    if _is_folder_layout(root):
        if names:
            raise DatasetLayoutError(
                f"sets {list(names)} asked for, but {root} is itself one folder set (it holds "
                f"{[p.name for p in _pair_folders(root)]}), named 'folder': ask for no sets, or make each set a "
                f"subfolder <root>/<set>/{{input,gt}}")
        return {"folder": paired_folder(root, "folder")}
    found = _set_subfolders(root)
    unknown = [name for name in names or () if name not in found]
    if unknown:
        raise DatasetLayoutError(f"folder sets {unknown} are not under {root}: its sets (subfolders holding an input "
                                 f"or target folder, {'/'.join(INPUT_DIRS + TARGET_DIRS)}) are {found}")
    return {name: paired_folder(root / name, name) for name in names or found}


def _set_subfolders(root: Path) -> List[str]:
    """The names of `root`'s set subfolders, sorted. The others are named in a warning, and a link to a missing
    folder is refused: a set whose folders are named otherwise, or whose file system is not mounted, would drop
    out of the table and the validation without a word."""
    children = sorted(root.iterdir())
    broken = [child.name for child in children if child.is_symlink() and not child.exists()]
    if broken:
        raise DatasetLayoutError(f"{root}: {broken} link to missing folders (a file system not mounted?): mount "
                                 "it, or remove the link")
    folders = [child for child in children if child.is_dir()]
    found = [child.name for child in folders if _is_folder_layout(child)]
    if not found:
        _refuse_a_root_without_sets(root, folders)
    left_out = [child.name for child in folders if child.name not in found and not child.name.startswith(".")]
    if left_out:
        dist.print0(f"WARNING: {root}: subfolders {left_out} hold no input or target folder "
                    f"({'/'.join(INPUT_DIRS + TARGET_DIRS)}): no sets, left out")
    return found


def _refuse_a_root_without_sets(root: Path, folders: Sequence[Path]) -> None:
    if list_image_files(root):   # e.g. --root <root>/<set>/input
        raise DatasetLayoutError(f"{root} holds images itself and no input or target folder: name the folder "
                                 f"holding input/ and gt/ (if this is an input folder: {root.parent})")
    raise _none_of_the_folders(root, INPUT_DIRS, [folder.name for folder in folders],
                               also=" and no subfolder holding one (<root>/<set>/input, one set each)")


def evaluation_sets(dataset: str, root: str, names: Optional[Sequence[str]] = None) -> Dict[str, List[Pair]]:
    """The evaluation sets of a dataset (all, or those `names` chooses): AllWeather test sets, CDD-11 test types,
    or a folder's (`folder_pairs`). Not checked here: callers read a few of them (`check_pairs` what will be read)."""
    if dataset == "allweather":
        return allweather_test_sets(Path(root), names)
    if dataset == "cdd11":
        return cdd11_pairs(Path(root), "test", names or CDD11_TYPES)
    if dataset == "folder":
        return folder_pairs(Path(root), names)
    raise ValueError(f"dataset {dataset!r} is not one of {DATASETS}")


def train_pairs(dataset: str, root: str, list_file: Optional[str] = None, crop: int = 0) -> List[Pair]:
    """The training pairs of a dataset (those its list file names, when it has one: `training_list_file`),
    every one checked by `check_pairs`; a warning counts the inputs with a side shorter than `crop`."""
    if dataset == "allweather":
        pairs = allweather_train_pairs(Path(root), list_file)
    elif dataset == "cdd11":
        pairs = [pair for pairs in cdd11_pairs(Path(root), "train").values() for pair in pairs]
    elif dataset == "folder":
        chosen = training_list_file("folder", root, list_file)
        pairs = paired_folder(Path(root), "folder", read_list_file(chosen) if chosen is not None else None)
    else:
        raise ValueError(f"dataset {dataset!r} is not one of {DATASETS}")
    sizes = check_pairs(pairs)
    _warn_upscaled(pairs, sizes, crop)
    return pairs


def _warn_upscaled(pairs: Sequence[Pair], sizes: Sequence[Tuple[int, int]], crop: int) -> None:
    """Training upscales an input shorter than the crop (m2r.data.augment, never padded): fine for a few,
    but a set of pre-cut patches smaller than the crop would train on blurred copies without a word."""
    small = [(pair, size) for pair, size in zip(pairs, sizes) if min(size) < crop]
    if small:
        (first, (width, height)) = small[0]
        dist.print0(f"WARNING: {len(small)} of {len(pairs)} training inputs have a side shorter than "
                    f"train.crop={crop} (first: {first.lq}, {width}x{height}): training upscales them "
                    "(bilinear) to the crop; choose a train.crop they hold to train on their own pixels")


def _size_mismatch(pair: Pair, lq_size: Tuple[int, int], gt_size: Tuple[int, int]) -> str:
    return f"{pair.lq} is {lq_size[0]}x{lq_size[1]} but its target {pair.gt} is {gt_size[0]}x{gt_size[1]}"


def _header_check(pair: Pair) -> Tuple[Optional[str], Tuple[int, int]]:
    """(why `pair` cannot be used, None if it looks usable; its (width, height)), from its image headers alone."""
    try:
        lq_size, gt_size = read_size(pair.lq), read_size(pair.gt)
    except OSError as exc:
        return str(exc), (0, 0)
    return (_size_mismatch(pair, lq_size, gt_size) if lq_size != gt_size else None), lq_size


def check_pairs(pairs: Sequence[Pair]) -> List[Tuple[int, int]]:
    """Each pair's (width, height). Raise DatasetLayoutError, naming the first bad pair and counting them all,
    if any image cannot be identified or any pair's sizes differ. Reads headers only (well under a millisecond
    a pair on a local disk); damage inside the pixel data still surfaces only when the pair is read."""
    problems, sizes = zip(*map(_header_check, pairs)) if pairs else ((), ())
    problems = [problem for problem in problems if problem is not None]
    if problems:
        raise DatasetLayoutError(f"{len(problems)} of {len(pairs)} image pairs cannot be used, first: {problems[0]}")
    return list(sizes)


def read_pair(pair: Pair, official_sizes: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Both images as (H, W, 3) uint8 RGB; a pair whose sizes differ is a DatasetLayoutError naming both.
    With `official_sizes`, a set in OFFICIAL_TEST_SIZES comes resized as the official test resizes it."""
    lq, gt = read_rgb(pair.lq), read_rgb(pair.gt)
    if lq.shape != gt.shape:
        raise DatasetLayoutError(_size_mismatch(pair, (lq.shape[1], lq.shape[0]), (gt.shape[1], gt.shape[0])))
    size = OFFICIAL_TEST_SIZES.get(pair.group) if official_sizes else None
    if size is not None:
        lq, gt = _pil_resize(lq, size), _pil_resize(gt, size)
    return lq, gt


def _pil_resize(image: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC))


def to_chw_uint8(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


class PairedImages(Dataset):
    """uint8 `lq`, `gt` (3, H, W) and `type_id` per pair. With `crop`, the same random window of both
    (images smaller than the crop are upscaled, see m2r.data.augment) and, with `augment`, the same
    flip/rot90, all drawn from (seed, epoch, index)."""

    def __init__(self, pairs: Sequence[Pair], groups: Sequence[str], crop: Optional[int] = None, seed: int = 0,
                 augment: bool = False):
        self.pairs, self.groups = list(pairs), list(groups)
        self.crop, self.seed, self.augment, self.epoch = crop, seed, augment, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        pair = self.pairs[index]
        lq, gt = read_pair(pair)
        rng = np.random.default_rng((self.seed, self.epoch, index))
        if self.crop:
            lq, gt = random_crop([lq, gt], self.crop, rng)
        if self.augment:
            lq, gt = random_dihedral([lq, gt], rng)
        return {"lq": to_chw_uint8(lq), "gt": to_chw_uint8(gt),
                "type_id": torch.tensor(self.groups.index(pair.group), dtype=torch.int64)}
