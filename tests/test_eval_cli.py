"""`python -m m2r.evaluate` and `python -m m2r.restore` end to end on a tiny model and tiny public layouts."""
import json

import pytest
import torch
from PIL import Image

from conftest import REPO_ROOT
from finetune_layouts import build_allweather, build_cdd11, export_tiny_model, write_image
from m2r import evaluate, restore
from m2r.eval.datasets import CDD11_TYPES
from m2r.eval.loading import load_inference_model
from m2r.models.convert import m2r_to_official

PROTOCOL_KEYS = {f"{m}_{p}" for m in ("psnr", "ssim") for p in ("rgb", "y", "official")}


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    return export_tiny_model(tmp_path_factory.mktemp("model"), REPO_ROOT)


def test_allweather_results_hold_every_metric_for_every_test_set(tmp_path, tiny_weights):
    root = build_allweather(tmp_path / "aw", size=(36, 44))
    out = tmp_path / "out"
    evaluate.main(["--weights", str(tiny_weights), "--dataset", "allweather", "--root", str(root),
                   "--out", str(out), "--save-images"])
    results = json.loads((out / "results.json").read_text())
    assert list(results["sets"]) == ["outdoor_rain", "snow100k_s", "snow100k_l", "raindrop_a"]
    for summary in results["sets"].values():
        assert summary["count"] == 2 and PROTOCOL_KEYS <= set(summary)
    assert PROTOCOL_KEYS == set(results["average"])
    assert "| official |" in (out / "results.md").read_text()
    assert Image.open(out / "images/raindrop_a/0_rain.png").size == (44, 36)


def test_cdd11_results_per_type_and_averaged(tmp_path, tiny_weights):
    root = build_cdd11(tmp_path / "cdd", size=(24, 32))
    out = tmp_path / "out"
    evaluate.main(["--weights", str(tiny_weights), "--dataset", "cdd11", "--root", str(root), "--out", str(out),
                   "--metrics", "rgb,official"])
    results = json.loads((out / "results.json").read_text())
    assert list(results["sets"]) == list(CDD11_TYPES)
    psnrs = [s["psnr_rgb"] for s in results["sets"].values()]
    assert results["average"]["psnr_rgb"] == pytest.approx(sum(psnrs) / 11)
    assert "psnr_y" not in results["average"]


def test_restore_keeps_the_input_sizes_and_folder_layout(tmp_path, tiny_weights):
    sizes = {"a.png": (17, 23), "sub/b.jpg": (30, 9), "c.png": (40, 40)}
    for name, size in sizes.items():
        write_image(tmp_path / "in" / name, size, seed=len(name))
    restore.main(["--weights", str(tiny_weights), str(tmp_path / "in"), "--out", str(tmp_path / "out")])
    for name, (h, w) in sizes.items():
        restored = tmp_path / "out" / name.replace(".jpg", ".png")
        assert Image.open(restored).size == (w, h)


def test_official_checkpoints_load_through_the_converter(tmp_path, tiny_weights):
    from safetensors.torch import load_file

    official = {"state_dict": {f"net.{k}": v for k, v in m2r_to_official(load_file(str(tiny_weights))).items()}}
    torch.save(official, tmp_path / "official.ckpt")
    model = load_inference_model(str(tmp_path / "official.ckpt"), torch.device("cpu"),
                                 f"{REPO_ROOT}/configs/model/tiny.yaml")
    reference = load_inference_model(str(tiny_weights), torch.device("cpu"))
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(Exception, match="--model-config"):
        load_inference_model(str(tmp_path / "official.ckpt"), torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bf16_tiled_restore_matches_fp32_closely(tmp_path, tiny_weights):
    write_image(tmp_path / "in/big.png", (72, 100), seed=7)
    for precision in ("fp32", "bf16"):
        restore.main(["--weights", str(tiny_weights), str(tmp_path / "in"), "--out", str(tmp_path / precision),
                      "--device", "cuda", "--precision", precision, "--tile", "48", "--overlap", "16"])
    fp32 = torch.tensor(list(Image.open(tmp_path / "fp32/big.png").getdata()), dtype=torch.float32)
    bf16 = torch.tensor(list(Image.open(tmp_path / "bf16/big.png").getdata()), dtype=torch.float32)
    assert fp32.shape == bf16.shape and (fp32 - bf16).abs().mean() < 3.0
