"""`python -m m2r.evaluate` and `python -m m2r.restore` end to end on a tiny model and tiny public layouts,
in one process and under `accelerate launch`."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from conftest import REPO_ROOT
from finetune_layouts import build_allweather, build_cdd11, export_tiny_model, write_image, write_pair
from m2r import evaluate, restore
from m2r.config import ConfigError, load_config
from m2r.eval.datasets import CDD11_TYPES, DatasetLayoutError
from m2r.eval.loading import load_inference_model
from m2r.models.config import ModelConfig
from m2r.models.convert import m2r_to_official

PROTOCOL_KEYS = {f"{m}_{p}" for m in ("psnr", "ssim") for p in ("rgb", "y", "official")}


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    return export_tiny_model(tmp_path_factory.mktemp("model"), REPO_ROOT)


def test_allweather_results_hold_every_metric_for_every_test_set(tmp_path, tiny_weights, capsys):
    root = build_allweather(tmp_path / "aw", size=(36, 44))
    out = tmp_path / "out"
    evaluate.main(["--weights", str(tiny_weights), "--dataset", "allweather", "--root", str(root),
                   "--out", str(out), "--save-images"])
    assert "metrics rgb,y,official, precision fp32" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert list(results["sets"]) == ["outdoor_rain", "snow100k_s", "snow100k_l", "raindrop_a"]
    for summary in results["sets"].values():
        assert summary["count"] == 2 and PROTOCOL_KEYS <= set(summary)
    assert PROTOCOL_KEYS == set(results["average"])
    paper_sets = ["outdoor_rain", "snow100k_l", "raindrop_a"]   # the paper's average leaves Snow100K-S out
    assert results["average_over"] == paper_sets
    assert results["average"]["psnr_rgb"] == pytest.approx(sum(results["sets"][n]["psnr_rgb"] for n in paper_sets) / 3)
    table = (out / "results.md").read_text()
    assert "| official |" in table and "| Average (Outdoor-Rain, Snow100K-L, RainDrop) |" in table
    assert Image.open(out / "images/raindrop_a/0_rain.png").size == (44, 36)


def test_an_average_missing_a_paper_set_says_so_in_its_title(tmp_path, tiny_weights):
    """Without RainDrop the average is over two of the paper's three sets: not comparable to its table."""
    import shutil

    root = build_allweather(tmp_path / "aw", size=(36, 44), per_set=1)
    shutil.rmtree(root / "test_a")
    shutil.rmtree(root / "test" / "Snow100K-S")
    out = tmp_path / "out"
    evaluate.main(["--weights", str(tiny_weights), "--dataset", "allweather", "--root", str(root), "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert results["average_over"] == ["outdoor_rain", "snow100k_l"]
    assert results["paper_sets_left_out"] == ["raindrop_a"]
    assert "| Average (Outdoor-Rain, Snow100K-L; RainDrop not evaluated) |" in (out / "results.md").read_text()


def test_results_that_cannot_be_written_are_printed_first_and_the_old_files_stay_whole(tmp_path, tiny_weights,
                                                                                         capsys, monkeypatch):
    """An evaluation's numbers are its work: a full disk must neither lose them nor truncate the last results."""
    import errno

    import m2r.atomic

    root, out = build_allweather(tmp_path / "aw", size=(36, 44), per_set=1), tmp_path / "out"
    arguments = ["--weights", str(tiny_weights), "--dataset", "allweather", "--root", str(root), "--out", str(out)]
    evaluate.main(arguments)
    before = (out / "results.json").read_text()
    capsys.readouterr()

    def full_disk_replace(tmp, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(m2r.atomic.os, "replace", full_disk_replace)
    with pytest.raises(m2r.atomic.StorageError, match=f"writing {out / 'results.json'} and {out / 'results.md'} "
                                                      "failed: No space left"):
        evaluate.main(arguments)
    assert "| rgb |" in capsys.readouterr().out
    assert (out / "results.json").read_text() == before and not list(out.glob("*.tmp"))
    assert "| rgb |" in (out / "results.md").read_text()


def test_saved_images_of_inputs_sharing_a_stem_keep_both(tmp_path, tiny_weights):
    """input/a.jpg and input/a.png would both be saved as a.png: each keeps its suffix, as m2r.restore does."""
    for folder in ("input", "gt"):
        (tmp_path / "pairs" / folder).mkdir(parents=True)
        for suffix, value in ((".jpg", 40), (".png", 200), (".bmp", 120)):
            name = "b.bmp" if suffix == ".bmp" else f"a{suffix}"
            Image.new("RGB", (24, 16), (value,) * 3).save(tmp_path / "pairs" / folder / name)
    out = tmp_path / "out"
    evaluate.main(["--weights", str(tiny_weights), "--dataset", "folder", "--root", str(tmp_path / "pairs"),
                   "--out", str(out), "--metrics", "rgb", "--save-images"])
    assert json.loads((out / "results.json").read_text())["sets"]["folder"]["count"] == 3
    assert sorted(p.name for p in (out / "images/folder").iterdir()) == ["a.jpg.png", "a.png.png", "b.png"]
    with pytest.raises(DatasetLayoutError, match=r"sets \['outdoor_rain'\] asked for, but .*pairs is itself one "
                                                 "folder set"):
        evaluate.main(["--weights", str(tiny_weights), "--dataset", "folder", "--root", str(tmp_path / "pairs"),
                       "--out", str(out), "--sets", "outdoor_rain"])


def test_a_folder_of_set_subfolders_is_one_results_column_each_and_sets_chooses_among_them(tmp_path, tiny_weights):
    """A lab's own test sets (one per camera) in one table; the Average is the mean of the sets' means."""
    root, out = tmp_path / "cameras", tmp_path / "out"
    for camera, count in (("cam_b", 1), ("cam_a", 2)):
        for i in range(count):
            write_pair(root / camera / "input" / f"{i}.png", root / camera / "gt" / f"{i}.png", (16, 24), i)
    command = ["--weights", str(tiny_weights), "--dataset", "folder", "--root", str(root), "--out", str(out),
               "--metrics", "rgb"]
    evaluate.main(command)
    results = json.loads((out / "results.json").read_text())
    assert {name: s["count"] for name, s in results["sets"].items()} == {"cam_a": 2, "cam_b": 1}
    assert results["average_over"] == ["cam_a", "cam_b"]
    assert results["average"]["psnr_rgb"] == pytest.approx(
        (results["sets"]["cam_a"]["psnr_rgb"] + results["sets"]["cam_b"]["psnr_rgb"]) / 2)
    assert "| Protocol | cam_a | cam_b | Average |" in (out / "results.md").read_text()
    evaluate.main([*command, "--sets", "cam_b"])
    assert list(json.loads((out / "results.json").read_text())["sets"]) == ["cam_b"]
    with pytest.raises(DatasetLayoutError, match=r"folder sets \['cam_c'\] are not under .*cameras: its sets .* are "
                                                 r"\['cam_a', 'cam_b'\]"):
        evaluate.main([*command, "--sets", "cam_b,cam_c"])


def test_official_sizes_resize_raindrop_and_the_table_says_so(tmp_path, tiny_weights, capsys):
    root = build_allweather(tmp_path / "aw", size=(36, 44), per_set=1)
    out = tmp_path / "out"
    evaluate.main(["--weights", str(tiny_weights), "--dataset", "allweather", "--root", str(root), "--out", str(out),
                   "--sets", "outdoor_rain,raindrop_a", "--metrics", "rgb", "--official-sizes", "--save-images"])
    assert "(outdoor_rain, raindrop_a (720x480))" in capsys.readouterr().out
    assert "| Outdoor-Rain | RainDrop (720x480) |" in (out / "results.md").read_text()
    assert json.loads((out / "results.json").read_text())["official_sizes"] is True
    assert Image.open(out / "images/raindrop_a/0_rain.png").size == (720, 480)
    assert Image.open(out / "images/outdoor_rain/im_0000_s80_a04.png").size == (44, 36)
    with pytest.raises(ConfigError, match="--official-sizes: none of the sets evaluated"):
        evaluate.main(["--weights", str(tiny_weights), "--dataset", "allweather", "--root", str(root),
                       "--out", str(out), "--sets", "outdoor_rain", "--official-sizes"])


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


def run_cli(args, cwd, env_extra=(), timeout=120):
    """A CLI in fresh processes: Accelerate's state (device, precision) is fixed once per process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **dict(env_extra))
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_two_processes_under_accelerate_launch_give_the_single_process_results(tmp_path, tiny_weights):
    # 11 CDD-11 images split 6 / 5; CPU on every machine so the numbers must agree exactly.
    root = build_cdd11(tmp_path / "cdd", size=(24, 32))
    evaluate_args = ["-m", "m2r.evaluate", "--weights", str(tiny_weights), "--dataset", "cdd11", "--root", str(root),
                     "--metrics", "rgb,y,official"]
    launch = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    cpu_only = {"CUDA_VISIBLE_DEVICES": ""}
    single = run_cli(evaluate_args + ["--out", str(tmp_path / "single")], REPO_ROOT, cpu_only)
    launched = run_cli(launch + evaluate_args + ["--out", str(tmp_path / "two")], REPO_ROOT, cpu_only)
    assert "on 1 process(es)" in single and "on 2 process(es)" in launched
    assert launched.count("| official |") == 1, "only the main process writes and prints results"
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("single", "two"))
    assert list(two["images"]) == list(CDD11_TYPES)
    assert two["images"] == one["images"] and two["sets"] == one["sets"] and two["average"] == one["average"]
    assert (tmp_path / "two/results.md").read_text() == (tmp_path / "single/results.md").read_text()


def test_restore_keeps_the_input_sizes_and_folder_layout(tmp_path, tiny_weights):
    sizes = {"a.png": (17, 23), "sub/b.jpg": (30, 9), "c.png": (40, 40)}
    for name, size in sizes.items():
        write_image(tmp_path / "in" / name, size, seed=len(name))
    restore.main(["--weights", str(tiny_weights), str(tmp_path / "in"), "--out", str(tmp_path / "out")])
    for name, (h, w) in sizes.items():
        restored = tmp_path / "out" / name.replace(".jpg", ".png")
        assert Image.open(restored).size == (w, h)


def test_processes_restore_process_0s_listing_of_the_inputs(tmp_path, tiny_weights):
    """A process listing fewer images would split the work otherwise and leave some unrestored."""
    for name in ("a.png", "b.png", "c.png"):
        write_image(tmp_path / "in" / name, (16, 16), seed=ord(name[0]))
    run_cli(["-m", "torch.distributed.run", "--nproc_per_node", "2", "tests/stale_listing.py", "-m", "m2r.restore",
             "--weights", str(tiny_weights), str(tmp_path / "in"), "--out", str(tmp_path / "out")],
            REPO_ROOT, {"CUDA_VISIBLE_DEVICES": ""})
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.png", "c.png"]


def test_unreadable_inputs_are_skipped_and_named_and_a_rerun_can_leave_what_was_restored(tmp_path, tiny_weights):
    """Two processes, one damaged image in each share: the others are restored, both bad ones named on
    process 0, exit status 1; --skip-existing then restores only what is missing."""
    for name in ("a.png", "b.png", "c.png", "d.png"):
        write_image(tmp_path / "in" / name, (16, 16), seed=ord(name[0]))
    for name in ("b.png", "d.png"):
        (tmp_path / "in" / name).write_bytes((tmp_path / "in" / name).read_bytes()[:60])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "m2r.restore",
               "--weights", str(tiny_weights), str(tmp_path / "in"), "--out", str(tmp_path / "out")]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "restored 2 images" in result.stdout
    assert "2 inputs could not be read and were skipped:" in result.stdout
    assert all(f"{tmp_path / 'in' / name}: cannot read image" in result.stdout for name in ("b.png", "d.png"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "c.png"]

    restored_a = (tmp_path / "out/a.png").stat().st_mtime_ns
    for name in ("b.png", "d.png"):
        write_image(tmp_path / "in" / name, (16, 16), seed=1)
    output = run_cli(["-m", "m2r.restore", "--weights", str(tiny_weights), str(tmp_path / "in"), "--out",
                      str(tmp_path / "out"), "--skip-existing"], REPO_ROOT, {"CUDA_VISIBLE_DEVICES": ""})
    assert "restored 2 images into" in output and "(2 restored before: --skip-existing)" in output
    assert (tmp_path / "out/a.png").stat().st_mtime_ns == restored_a
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.png", "c.png", "d.png"]


def test_an_input_gone_since_the_listing_is_skipped_and_named(tmp_path):
    from m2r import restore

    args = SimpleNamespace(out=str(tmp_path / "out"), tile=0, overlap=0)
    unreadable = restore.restore_files(None, [(tmp_path / "gone.png", Path("gone.png"))], args,
                                       SimpleNamespace(device=torch.device("cpu")))
    assert len(unreadable) == 1 and "gone.png" in unreadable[0]


def test_skip_existing_counts_the_outputs_left(tmp_path):
    from m2r import restore

    for name in ("a", "b", "c"):
        Image.new("RGB", (4, 4)).save(tmp_path / f"{name}.png")
    (tmp_path / "out").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "out" / "a.png")
    args = SimpleNamespace(inputs=[str(tmp_path / n) for n in ("a.png", "b.png", "c.png")],
                           out=str(tmp_path / "out"), skip_existing=True)
    jobs, existing = restore.inputs_to_restore(args)
    assert [output.name for _, output in jobs] == ["b.png", "c.png"] and existing == 1


def test_inputs_differing_only_in_suffix_keep_it_instead_of_overwriting_each_other(tmp_path):
    for name in ("a.png", "a.jpg", "sub/a.png", "b.jpg"):
        write_image(tmp_path / "in" / name, (8, 8), seed=1)
    outputs = {str(image.relative_to(tmp_path)): str(output)
               for image, output in restore.collect_inputs([str(tmp_path / "in")], tmp_path / "out")}
    assert outputs == {"in/a.png": "a.png.png", "in/a.jpg": "a.jpg.png", "in/sub/a.png": "sub/a.png",
                       "in/b.jpg": "b.png"}


def test_an_out_folder_inside_an_input_folder_is_not_restored_again(tmp_path):
    """`restore photos/ --out photos/restored`: a rerun would otherwise restore its outputs into restored/restored."""
    for name in ("a.png", "restored/a.png", "restored/sub/b.png"):
        write_image(tmp_path / "photos" / name, (8, 8), seed=1)
    jobs = restore.collect_inputs([str(tmp_path / "photos")], tmp_path / "photos" / "restored")
    assert [str(image.relative_to(tmp_path)) for image, _ in jobs] == ["photos/a.png"]


def test_an_out_that_is_a_file_is_refused_before_any_work(tmp_path, tiny_weights):
    """Evaluate ran every image and then died making the folder, its numbers lost; restore died at its first image."""
    taken = tmp_path / "results"
    taken.write_text("not a folder")
    root = build_allweather(tmp_path / "aw", size=(36, 44), per_set=1)
    write_image(tmp_path / "in" / "a.png", (8, 8), seed=1)
    message = f"--out {taken} is a file: name a folder"
    with pytest.raises(ConfigError, match=message):
        evaluate.main(["--weights", str(tiny_weights), "--dataset", "allweather", "--root", str(root),
                       "--out", str(taken)])
    with pytest.raises(ConfigError, match=message):
        restore.main(["--weights", str(tiny_weights), str(tmp_path / "in"), "--out", str(taken)])


def test_fp16_without_a_gpu_is_refused_rather_than_run_in_fp32_under_its_name(tmp_path, tiny_weights, monkeypatch):
    from m2r.eval.loading import make_accelerator

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="--precision fp16 needs a CUDA GPU; on CPU use bf16 or fp32"):
        make_accelerator("fp16")


def test_one_file_of_a_checkpoint_as_weights_is_refused_naming_its_directory(tmp_path):
    from m2r.eval.loading import load_inference_model

    tag = tmp_path / "checkpoints" / "step00000002"
    tag.mkdir(parents=True)
    (tag / "meta.json").write_text("{}")
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"deepspeed's")
    with pytest.raises(ConfigError, match=f"is one file of an m2r checkpoint: pass its directory, {tag}"):
        load_inference_model(str(tag / "mp_rank_00_model_states.pt"), torch.device("cpu"))


def test_two_inputs_restored_to_one_output_stop_the_run_naming_both(tmp_path):
    for folder in ("day", "night"):
        write_image(tmp_path / folder / "street.png", (8, 8), seed=1)
    with pytest.raises(ConfigError, match=f"inputs {tmp_path}/day/street.png and {tmp_path}/night/street.png "
                                          "would both be written to street.png under --out"):
        restore.collect_inputs([str(tmp_path / "day"), str(tmp_path / "night")], tmp_path / "out")


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
        run_cli(["-m", "m2r.restore", "--weights", str(tiny_weights), str(tmp_path / "in"), "--out",
                 str(tmp_path / precision), "--device", "cuda", "--precision", precision, "--tile", "48",
                 "--overlap", "16"], REPO_ROOT)
    fp32 = torch.tensor(list(Image.open(tmp_path / "fp32/big.png").getdata()), dtype=torch.float32)
    bf16 = torch.tensor(list(Image.open(tmp_path / "bf16/big.png").getdata()), dtype=torch.float32)
    assert fp32.shape == bf16.shape and (fp32 - bf16).abs().mean() < 3.0


def test_the_average_is_over_sets_not_over_images():
    """The paper's 'Average' is the mean of the per-set means; an image-weighted mean lets the
    largest set dominate (Snow100K-L has ~16k images, RainDrop 58)."""
    from m2r.evaluate import summarize

    records = ([{"set": "a", "image": "1.png", "psnr_rgb": 10.0}]
               + [{"set": "b", "image": f"{i}.png", "psnr_rgb": 30.0} for i in range(3)])
    summary = summarize(records, ["a", "b"], ["psnr_rgb"], ["a", "b"])
    assert summary["sets"]["a"]["count"] == 1 and summary["sets"]["b"]["count"] == 3
    assert summary["average"]["psnr_rgb"] == pytest.approx(20.0)


def test_inference_builds_every_expert_locally_whatever_the_checkpoints_ep_size():
    from m2r.eval.loading import inference_model_config

    stored = {"dim": 8, "moe": {"ep_size": 2, "num_experts": 4}}
    cfg = inference_model_config(stored, None, [], "ckpt")
    assert cfg.moe.ep_size == 1 and cfg.moe.num_experts == 4 and cfg.dim == 8


def test_a_model_config_file_replaces_the_stored_one_and_set_overrides_adjust_it(tmp_path):
    """--model-config is the whole model description: keys it leaves out take the schema defaults,
    not the checkpoint's (e.g. clip.weights, a path on the training machine)."""
    from m2r.eval.loading import inference_model_config

    stored = {"dim": 8, "moe": {"num_experts": 4}, "clip": {"weights": "/train/machine/daclip.pt"}}
    model_yaml = tmp_path / "model.yaml"
    model_yaml.write_text("dim: 16\n")
    cfg = inference_model_config(stored, str(model_yaml), ["moe.top_k=1"], "ckpt")
    defaults = load_config(ModelConfig)
    assert cfg.dim == 16 and cfg.moe.top_k == 1
    assert cfg.moe.num_experts == defaults.moe.num_experts and cfg.clip.weights == defaults.clip.weights
    assert inference_model_config(stored, None, ["dim=24"], "ckpt").dim == 24
    with pytest.raises(ConfigError, match="carries no model config: pass --model-config"):
        inference_model_config(None, None, [], "official.ckpt")


def test_model_keys_that_do_not_fit_together_are_named_as_set_takes_them(tiny_weights):
    with pytest.raises(ConfigError, match=r"key 'heads': value \[1, 2, 5, 8\] does not divide"):
        load_inference_model(str(tiny_weights), torch.device("cpu"), overrides=["heads=[1,2,5,8]"])


def test_each_sets_value_is_the_mean_of_its_images_and_the_average_the_mean_of_the_sets():
    from m2r.evaluate import summarize

    records = ([{"set": "a", "image": "1.png", "psnr_rgb": 10.0}]
               + [{"set": "b", "image": f"{i}.png", "psnr_rgb": v} for i, v in enumerate((20.0, 30.0, 40.0))])
    summary = summarize(records, ["a", "b"], ["psnr_rgb"], ["a", "b"])
    assert summary["sets"]["b"] == {"count": 3, "psnr_rgb": pytest.approx(30.0)}
    assert summary["average"]["psnr_rgb"] == pytest.approx(20.0)


def test_pretrain_val_refuses_the_benchmark_options_and_benchmarks_need_a_dataset(tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--weights", "runs/x", "--pretrain-val", "--dataset", "cdd11", "--precision", "bf16",
                             "--out", str(tmp_path)])
    assert "--pretrain-val scores the run's own validation set, with its precision and network: --dataset, " \
           "--precision do not apply" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--weights", "runs/x", "--pretrain-val", "--dataset", "cdd11", "--out", str(tmp_path)])
    assert ": --dataset does not apply" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--weights", "model.safetensors", "--root", str(tmp_path), "--out", str(tmp_path)])
    assert "--dataset and --root are required (or --pretrain-val" in capsys.readouterr().err


def test_pretrain_val_refuses_exported_weights_and_finetuning_checkpoints(tmp_path, tiny_weights):
    from m2r.eval.pretrain_validation import pretraining_checkpoint

    with pytest.raises(FileNotFoundError, match="exported weights carry no run config"):
        pretraining_checkpoint(str(tiny_weights))
    with pytest.raises(ConfigError, match="the EMA weights are read from a checkpoint directory, not a file"):
        load_inference_model(str(tiny_weights), torch.device("cpu"), use_ema=True)
    tag = tmp_path / "run" / "checkpoints" / "step00000010"
    tag.mkdir(parents=True)
    (tag / "meta.json").write_text(json.dumps({"step": 10, "kind": "finetune"}))
    (tag / "config.yaml").write_text("init: {weights: runs/m2restore/checkpoints}\n")
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"deepspeed's")
    with pytest.raises(ConfigError, match=f"{tag} is a finetune checkpoint; --pretrain-val recomputes a "
                                          "pretraining run's validation"):
        pretraining_checkpoint(str(tmp_path / "run"))


def test_pretrain_val_compares_with_the_validation_record_of_the_checkpoints_step(tmp_path):
    """The step's val_* record, not the step's other records (loss, expert load); none when the step has no
    validation, or when the checkpoint directory is not a run's `checkpoints/` (its metrics.jsonl is not beside it)."""
    import json

    from m2r.engine.checkpoint import CheckpointRef
    from m2r.eval.pretrain_validation import logged_validation

    records = [{"step": 4, "loss": 0.5}, {"step": 4, "val_psnr": 20.0, "val_ssim": 0.5},
               {"step": 4, "moe/level1/max_load": 0.5}, {"step": 6, "loss": 0.4}]
    for run in ("run", "elsewhere"):
        (tmp_path / run).mkdir()
        (tmp_path / run / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    checkpoints = CheckpointRef(tmp_path / "run" / "checkpoints", "step00000004")
    assert logged_validation(checkpoints, 4) == {"val_psnr": 20.0, "val_ssim": 0.5}
    assert logged_validation(checkpoints, 6) is None
    assert logged_validation(CheckpointRef(tmp_path / "elsewhere" / "ckpts", "step00000004"), 4) is None


def test_pretrain_val_reads_a_non_finite_logged_validation_as_a_float(tmp_path):
    """metrics.jsonl writes a diverged validation's NaN as the string "NaN" (standard JSON); the comparison
    reads it back as the float the run logged, which the report prints."""
    import math

    from m2r.engine.checkpoint import CheckpointRef
    from m2r.engine.monitor import Monitor
    from m2r.eval.pretrain_validation import logged_validation, report_lines

    (tmp_path / "run").mkdir()
    monitor = Monitor(tmp_path / "run", total_steps=4, start_step=0, world_size=1, progress_bar=False,
                      tensorboard=False)
    monitor.log_val(4, {"psnr": float("nan"), "ssim": 0.5})
    monitor.close()
    logged = logged_validation(CheckpointRef(tmp_path / "run" / "checkpoints", "step00000004"), 4)
    assert math.isnan(logged["val_psnr"]) and logged["val_ssim"] == 0.5
    report = report_lines({"checkpoint": "c", "step": 4, "validated_weights": "ema", "precision": "fp32",
                           "val": {"val_psnr": 20.0}, "logged": logged})
    assert "run logged nan" in report


@pytest.mark.parametrize("clip_key", ["clip.weights", "model.clip.weights"])
def test_pretrain_val_takes_data_keys_for_the_runs_config_and_the_others_for_the_network(monkeypatch, tmp_path,
                                                                                         clip_key):
    """A run copied to another cluster: `--set data.val_shards=<where they are now>` moves its validation set,
    `--set clip.weights=...` the network's CLIP file (the network's config has no data section), also named as the
    run's config.yaml names it, model.clip.weights."""
    from m2r.engine.checkpoint import CheckpointRef
    from m2r.eval import loading, pretrain_validation

    tag = tmp_path / "run" / "checkpoints" / "step00000004"
    tag.mkdir(parents=True)
    (tag / "config.yaml").write_text("data: {val_shards: /old/cluster/val}\ntrain: {precision: fp32}\n")
    seen = {}

    def load_model(weights, device, overrides, use_ema):
        seen["network"] = overrides
        raise RuntimeError("stop after the loads")

    monkeypatch.setattr(loading, "load_inference_model", load_model)
    monkeypatch.setattr(pretrain_validation, "load_config", lambda schema, path, overrides: seen.setdefault(
        "config", load_config(schema, path, overrides)))
    with pytest.raises(RuntimeError, match="stop after the loads"):
        pretrain_validation.recompute_validation(CheckpointRef(tag.parent, tag.name), torch.device("cpu"),
                                                 ["data.val_shards=/new/val", f"{clip_key}=/new/daclip.pt"])
    assert seen["config"].data.val_shards == "/new/val"
    assert seen["network"] == ["clip.weights=/new/daclip.pt"]
