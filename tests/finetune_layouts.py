"""Tiny datasets in the exact public layouts (AllWeather, CDD-11) and a tiny exported model, for tests."""
from pathlib import Path
from typing import Tuple

import numpy as np
from PIL import Image

from m2r.eval.datasets import CDD11_TYPES


def write_image(path: Path, size: Tuple[int, int], seed: int) -> None:
    """A smooth random RGB image of (height, width)."""
    rng = np.random.default_rng(seed)
    h, w = size
    base = rng.uniform(0, 255, (h // 4 + 2, w // 4 + 2, 3)).astype(np.uint8)
    image = Image.fromarray(base).resize((w, h), Image.BILINEAR)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def write_pair(lq: Path, gt: Path, size: Tuple[int, int], seed: int) -> None:
    write_image(gt, size, seed)
    write_degraded(lq, gt, seed)


def write_degraded(lq: Path, gt: Path, seed: int) -> None:
    """`gt` plus uniform noise of +-20 grey levels."""
    clean = np.asarray(Image.open(gt)).astype(np.int16)
    noise = np.random.default_rng(seed + 1).integers(-20, 21, clean.shape)
    lq.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(clean + noise, 0, 255).astype(np.uint8)).save(lq)


def build_allweather(root: Path, size=(40, 48), per_set: int = 2, train: int = 6) -> Path:
    """M2Restore's AllWeather layout with its filenames.txt, Snow100K's synthetic/ and RainDrop's _rain/_clean."""
    for i in range(train):
        write_pair(root / "train/input" / f"im_{i:04d}.png", root / "train/gt" / f"im_{i:04d}.png", size, i)
    (root / "filenames.txt").write_text("".join(f"im_{i:04d}.png\n" for i in range(train)))
    for i in range(per_set):
        write_pair(root / "test_rain/input" / f"im_{i:04d}_s80_a04.png", root / "test_rain/gt" /
                   f"im_{i:04d}_s80_a04.png", size, 100 + i)
        for variant in ("S", "L"):
            write_pair(root / f"test/Snow100K-{variant}/synthetic/beautiful_{i}.jpg",
                       root / f"test/Snow100K-{variant}/gt/beautiful_{i}.jpg", size, 200 + i)
        write_pair(root / "test_a/data" / f"{i}_rain.png", root / "test_a/gt" / f"{i}_clean.png", size, 300 + i)
    return root


def build_cdd11(root: Path, size=(40, 48), per_type: int = 1) -> Path:
    """OneRestore's CDD-11: <split>/<type>/<id>.png with targets in <split>/clear/<id>.png."""
    for split, count in (("train", per_type + 1), ("test", per_type)):
        for i in range(count):
            write_image(root / split / "clear" / f"{i:03d}.png", size, 400 + i)
            for t, kind in enumerate(CDD11_TYPES):
                write_degraded(root / split / kind / f"{i:03d}.png", root / split / "clear" / f"{i:03d}.png",
                               500 + 20 * t + i)
    return root


def export_tiny_model(out_dir: Path, repo_root: str) -> Path:
    """A randomly initialised tiny M2Restore saved as `m2r.export` does: model.safetensors + model.yaml."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from m2r.config import load_config
    from m2r.models.config import ModelConfig
    from m2r.models.m2restore import build_model

    cfg = load_config(ModelConfig, Path(repo_root) / "configs/model/tiny.yaml")
    model = build_model(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    OmegaConf.save(OmegaConf.create({"model": OmegaConf.to_container(cfg)}), out_dir / "model.yaml")
    return weights
