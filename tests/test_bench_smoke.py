"""The GPU benchmark runs end to end on CPU in --smoke mode (tiny model), so it cannot rot between GPU runs."""
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest


def strict_json(path):
    """JSON as strict readers (jq, browsers) take it: NaN and Infinity are not JSON."""
    def refuse(constant):
        raise ValueError(f"{path} holds {constant}, which is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_train_speed_smoke_writes_every_measurement(tmp_path, repo_root):
    out = tmp_path / "smoke.json"
    subprocess.run([sys.executable, "bench/train_speed.py", "--smoke", "--json", str(out)], cwd=repo_root,
                   check=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    results = strict_json(out)
    trained = [v for k, v in results.items() if k.startswith("train/")]
    assert len(trained) == 2 and all(r["img_per_s"] > 0 and r["mfu_pct"] > 0 for r in trained)
    assert all(r["scan_path"] == "torch" for r in trained)   # the row says which scan ran ("fused" on GPU)
    # Both variants train the tiny network: the same work, whichever way the depthwise convolutions run.
    assert trained[0]["flops_per_step"] == trained[1]["flops_per_step"] > 0
    assert results["scan_ms/torch"] > 0 and results["eval/fp32"]["eval_ms"] > 0
    assert 0 < results["clip"]["share_of_step_pct"] < 100
    # fp32 both ways: channels_last, recomputation and the traced graphs change rounding only.
    trajectory = results["trajectory"]
    assert all(len(losses) == trajectory["steps"] for losses in trajectory["losses"].values())
    assert max(trajectory["max_rel_diff_vs_first"].values()) < 1e-4
    assert all(drop > 0 for drop in trajectory["loss_drop"].values())
    assert "Self CPU" in open(results["profile"]["table"]).read()


def test_block_speed_smoke_checks_the_shifted_depthwise_candidate(tmp_path, repo_root):
    out = tmp_path / "block.json"
    subprocess.run([sys.executable, "bench/block_speed.py", "--smoke", "--json", str(out)], cwd=repo_root,
                   check=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    results = strict_json(out)
    assert results["shifted_vs_conv_max_diff"] < 1e-5
    timed = [v for k, v in results.items() if isinstance(v, dict)]
    assert len(timed) == 3 and all(r["ms"] > 0 for r in timed)


def test_activation_memory_smoke_shrinks_with_each_checkpointing_mode(tmp_path, repo_root):
    out = tmp_path / "memory.json"
    subprocess.run([sys.executable, "bench/activation_memory.py", "--smoke", "--json", str(out)], cwd=repo_root,
                   check=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    (run,) = strict_json(out)["runs"]
    saved = [run[f"saved_activations_gb/{mode}"] for mode in ("none", "bottleneck", "full_res", "levels_1_2", "all")]
    assert saved[0] > saved[1] > 0 and saved[0] > saved[2] > saved[3] > saved[4] > 0
    assert run["weights_grads_adamw_gb"] > 0 and run["frozen_clip_gb"] > 0


def test_every_variant_key_gpu_checks_names_is_one_train_speed_knows(repo_root, monkeypatch):
    spec = importlib.util.spec_from_file_location("train_speed", f"{repo_root}/bench/train_speed.py")
    train_speed = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "train_speed", train_speed)   # its dataclasses look themselves up there
    spec.loader.exec_module(train_speed)
    script = open(f"{repo_root}/bench/gpu_checks.sh").read()
    named = [key for keys in re.findall(r"--variants\s+(\S+)", script) for key in keys.split(",")]
    assert named, "bench/gpu_checks.sh names no --variants"
    for key in named:
        train_speed.variant_named(key, train_speed.GPU_VARIANTS)   # SystemExit on an unknown key


def test_the_gpu_engine_tests_that_launch_pretraining_come_last_the_compiled_one_last_of_all(repo_root):
    """gpu_checks.sh gives tests/test_engine_gpu.py what is left of its time budget, and pytest runs a file in order:
    the quick in-process tests first, so that a timeout in the slow pretraining launches (the inductor one slowest)
    costs only those."""
    import ast

    tree = ast.parse(open(f"{repo_root}/tests/test_engine_gpu.py").read())
    tests = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")]
    launches = ["_pretrain_on_one_gpu" in {n.id for n in ast.walk(test) if isinstance(n, ast.Name)} for test in tests]
    assert launches == sorted(launches), [test.name for test in tests]
    assert tests[-1].name == "test_pretrain_entry_point_with_every_speed_switch_on_gpu"


def _train_speed(repo_root, monkeypatch):
    spec = importlib.util.spec_from_file_location("train_speed", f"{repo_root}/bench/train_speed.py")
    train_speed = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "train_speed", train_speed)   # its dataclasses look themselves up there
    spec.loader.exec_module(train_speed)
    return train_speed


def test_train_flops_are_the_models_forward_and_backward(repo_root, monkeypatch):
    """The MFU numerator: the model's work, whatever way a variant computes it, and equal to a count of
    a real forward and backward (the official sparse MoE; the frozen CLIP's forward only)."""
    import math

    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from m2r.models.m2restore import build_model

    ts = _train_speed(repo_root, monkeypatch)
    cpu, crop = torch.device("cpu"), 32
    counted = ts.variant_flops("tiny", (), None, cpu, 1, crop)
    # The dense dispatch runs all experts on every token and masks E / top_k of it away; the shifted depthwise
    # form hides the convolutions from the counter: the model's work is the same.
    assert ts.variant_flops("tiny", ("moe.dispatch=dense", "depthwise=shifted"), None, cpu, 1, crop) == counted

    def conv_backward(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed, output_padding,
                      groups, output_mask, out_shape=None):
        # torch's rule ignores groups in the weight gradient; each of the two gradients costs a forward
        assert not transposed
        forward = 2 * grad_out_shape[0] * math.prod(grad_out_shape[2:]) * math.prod(w_shape)
        return forward * sum(map(bool, output_mask[:2]))

    def cpu_attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):   # not in torch's table
        return 4 * math.prod(query_shape[:3]) * key_shape[2] * query_shape[3]

    cfg = ts.model_config("tiny", None, ("moe.dispatch=sparse",))
    model = build_model(cfg).train()
    lq, gt = ts.random_pair(1, crop)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)   # count the frozen CLIP's attention too
    try:
        with FlopCounterMode(display=False, custom_mapping={
                torch.ops.aten.convolution_backward: conv_backward,
                torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention}) as counter:
            out = model(lq)
            loss = F.l1_loss(out.restored, gt) + cfg.moe.balance_loss_weight * out.balance_loss
            loss.backward()
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    assert abs(counted / counter.get_total_flops() - 1) < 0.02


def test_flop_counter_sees_attention_on_cpu(repo_root, monkeypatch):
    """nn.MultiheadAttention's inference fast path (CLIP's vision towers on the CPU) is one fused op that
    FlopCounterMode does not count; under the faithful config's CUDA autocast it is not taken."""
    import torch

    ts = _train_speed(repo_root, monkeypatch)
    batch, tokens, width, heads = 2, 50, 64, 2
    attention = torch.nn.MultiheadAttention(width, heads, batch_first=True).eval()
    x = torch.rand(batch, tokens, width)
    with torch.no_grad(), ts.flop_counter() as counter:
        attention(x, x, x, need_weights=False)
    projections = 2 * batch * tokens * width * (3 * width + width)
    scores_and_values = 4 * batch * tokens * tokens * width
    assert counter.get_total_flops() == projections + scores_and_values


def test_each_row_names_the_peak_its_mfu_divides_by(repo_root, monkeypatch):
    import pytest

    ts = _train_speed(repo_root, monkeypatch)
    fp32 = ts.variant_named("fp32-eager", ts.GPU_VARIANTS)
    bf16 = ts.variant_named("bf16-eager", ts.GPU_VARIANTS)
    row = ts.mfu_fields(fp32, 10.0, ts.H100_BF16_DENSE_TFLOPS)
    assert row["mfu_pct"] == pytest.approx(100 * 10.0 / 989.4) and row["mfu_peak_basis"] == "bf16 dense"
    assert row["precision_peak_basis"].startswith("TF32")
    assert row["mfu_pct_precision_peak"] == pytest.approx(100 * 10.0 / 494.7)
    assert ts.mfu_fields(fp32, 10.0, 312.0)["mfu_pct_precision_peak"] == pytest.approx(100 * 10.0 / 156.0)  # an A100
    bf16_row = ts.mfu_fields(bf16, 10.0, ts.H100_BF16_DENSE_TFLOPS)
    assert bf16_row["mfu_pct_precision_peak"] == pytest.approx(row["mfu_pct"])
    table = ts.markdown([{"variant": "v", "ms_per_step": 1.0, "img_per_s": 1.0, "x_official": 1.0, "peak_gb": 1.0,
                          "tflops": 10.0, **row}])
    assert "bf16 peak 989" in table and "TF32" in table


def test_full_benchmark_refuses_to_run_on_a_cpu(tmp_path, repo_root):
    """On the GPU machine a CUDA failure must cost seconds, not the device window spent on CPU numbers."""
    result = subprocess.run([sys.executable, "bench/train_speed.py", "--only", "train", "--variants", "fp32-eager",
                             "--json", str(tmp_path / "out.json")], cwd=repo_root, capture_output=True, text=True,
                            timeout=120, env=dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1"))
    assert result.returncode != 0 and "no CUDA device" in result.stderr


def test_largest_crop_answers_for_an_80_gb_gpu_on_a_larger_one(repo_root, monkeypatch):
    """The question is the largest crop that trains in 80 GB: on an H200 (141 GB) the search must neither
    predict from its whole memory nor let a crop pass that only fits there."""
    import math
    import types

    import torch

    ts = _train_speed(repo_root, monkeypatch)
    h200 = 143771 * 2**20
    fractions, tried = [], []
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: types.SimpleNamespace(total_memory=h200))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, device=None: fractions.append(f))

    class Runner:   # peak memory 4 GB + 80 GB per megapixel, trained at no cost
        def __init__(self, variant, cfg, device, batch, crop, cudnn_benchmark=None):
            tried.append(crop)

        def time_steps(self, warmup, steps):
            return 0.0

    monkeypatch.setattr(ts, "VariantRunner", Runner)
    monkeypatch.setattr(ts, "reset_peak", lambda device: None)
    monkeypatch.setattr(ts, "peak_gb", lambda device: 4 + 80e-6 * tried[-1] ** 2)
    args = types.SimpleNamespace(batch=4)
    result = ts.largest_crop(ts.CROP_VARIANT, args, torch.device("cuda"), None, lambda partial: None)
    capacity = ts.CROP_DEVICE_MEMORY
    assert result["budget_gb"] == capacity * ts.CROP_MEMORY_BUDGET / 1e9 < 80
    assert fractions == [capacity / h200, 1.0]    # capped while searching, released after
    # (budget - 4) / 80e-6 pixels: about 920 px, not the 1024 that 0.9 x 141 GB would allow
    assert abs(result["predicted_by_memory"] - math.sqrt((result["budget_gb"] - 4) / 80e-6)) < 8
    assert result["predicted_by_memory"] < 1024
    assert tried == [224, 320, 768, result["predicted_by_memory"]]


def test_a_crop_search_failing_after_its_tries_keeps_them_in_the_json(repo_root, monkeypatch, tmp_path):
    """An error after some tries (a CUDA error is sticky: the next CUDA call raises it again) must leave what the
    search saved after each try in the JSON, beside the error, not replace it."""
    import torch

    ts = _train_speed(repo_root, monkeypatch)
    out = tmp_path / "rest.json"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    monkeypatch.setattr(ts, "write_random_clip", lambda path: None)

    def search(variant, args, device, clip_weights, report):
        report({"largest_crop": 768, "failed": {"crop": 920, "error": "CUBLAS_STATUS_EXECUTION_FAILED"}})
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(ts, "largest_crop", search)
    monkeypatch.setattr(sys, "argv", ["train_speed.py", "--only", "crop", "--json", str(out)])
    ts.main()
    saved = strict_json(out)["largest_crop"]
    assert saved["largest_crop"] == 768 and saved["failed"]["crop"] == 920
    assert saved["error"] == "RuntimeError: CUDA error: an illegal memory access was encountered"


def _engine_speed(repo_root, monkeypatch):
    monkeypatch.syspath_prepend(f"{repo_root}/bench")   # it imports train_speed from beside it
    spec = importlib.util.spec_from_file_location("engine_speed", f"{repo_root}/bench/engine_speed.py")
    engine_speed = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "engine_speed", engine_speed)
    spec.loader.exec_module(engine_speed)
    return engine_speed


def test_engine_speed_smoke_times_the_pretraining_step_per_row(tmp_path, repo_root):
    """Each row trains through the Trainer (ZeRO 1 fp32; ZeRO 2 bf16 channels_last compiled) and is compared with
    its variant's plain-torch figure when the reference has it, else with the official recipe's."""
    out, reference = tmp_path / "engine.json", tmp_path / "train_speed.json"
    reference.write_text(json.dumps({"train/tiny fp32": {"img_per_s": 4.0},
                                     "train/tiny bf16 + channels_last + compile(eager)": {"error": "failed"}}))
    # each row's process ends within --row-timeout: a hung row is not left running after this test's timeout
    result = subprocess.run([sys.executable, "bench/engine_speed.py", "--smoke", "--json", str(out), "--reference",
                             str(reference), "--row-timeout", "140"], cwd=repo_root, capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = strict_json(out)["rows"]
    fp32, bf16 = rows["tiny-fp32"], rows["tiny-bf16-compiled"]
    assert (fp32["precision"], fp32["zero_stage"], bf16["precision"], bf16["zero_stage"]) == ("fp32", 1, "bf16", 2)
    for row in (fp32, bf16):
        assert row["ms_per_step"] > 0 and 0 <= row["data_wait_share"] < 1 and row["peak_gb"] is None
        assert row["img_per_s"] == pytest.approx(row["images_per_step"] / (row["ms_per_step"] / 1e3))
        assert row["scan_path"] == "torch" and row["x_vs"] == pytest.approx(row["img_per_s"] / row["vs_img_per_s"])
    assert "train.compile=true" in bf16["overrides"] and "train.channels_last=true" in bf16["overrides"]
    assert fp32["vs_img_per_s"] == 4.0 and fp32["vs"].startswith("plain PyTorch")
    assert bf16["vs_img_per_s"] == 8.54 and bf16["vs"].startswith("official")   # its reference row failed
    assert "| tiny fp32 | fp32, 1 |" in result.stdout


def test_engine_speed_tables_earlier_rows_against_a_later_reference(tmp_path, repo_root, monkeypatch, capsys):
    """The GPU machine's $OUT is per call: rows measured in one call compare with train_speed's from another."""
    es = _engine_speed(repo_root, monkeypatch)
    row = {"variant": "faithful fp32 eager (official recipe)", "precision": "fp32", "zero_stage": 1,
           "images_per_step": 16, "ms_per_step": 2000.0, "img_per_s": 8.0, "peak_gb": 40.0, "data_wait_share": 0.01}
    measured, reference = tmp_path / "engine.json", tmp_path / "train_speed.json"
    measured.write_text(json.dumps({"rows": {"fp32-eager": row, "bf16-compiled": {"error": "timeout"}}}))
    reference.write_text(json.dumps({"train/faithful fp32 eager (official recipe)": {"img_per_s": 6.4}}))
    es.main(["--table", str(measured), "--reference", str(reference)])
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| faithful")]
    assert "| 8.00 | 40.00 | 1.0 | 1.25 | plain PyTorch" in line


def test_engine_speed_smoke_rows_run_on_the_cpu_of_a_gpu_machine(repo_root, monkeypatch, tmp_path):
    es = _engine_speed(repo_root, monkeypatch)
    seen = {}

    def child(command, env=None, **kwargs):
        seen["env"] = env
        return subprocess.CompletedProcess(command, 1, "", "stopped here")

    monkeypatch.setattr(es.subprocess, "run", child)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    args = es.parse_args(["--smoke"])[0]
    with pytest.raises(RuntimeError, match="row process exit 1: stopped here"):
        es.run_row_in_child(es.SMOKE_VARIANTS[0], args, [], tmp_path)
    assert seen["env"]["CUDA_VISIBLE_DEVICES"] == ""


def test_engine_speed_rows_train_on_synthetic_shards_where_scikit_image_is_missing(repo_root, monkeypatch, tmp_path):
    """The built-in photos are scikit-image's, which the GPU machine's image may lack: every engine row would fail at
    its start there. The rows then train and validate on synthetic shards, at the recipe's crop."""
    from m2r.config import load_config
    from m2r.data import build_train_stream, build_val_set
    from m2r.engine.config import PretrainConfig

    es = _engine_speed(repo_root, monkeypatch)
    for module in ("skimage", "skimage.data"):   # importing either raises ImportError, even once imported before
        monkeypatch.setitem(sys.modules, module, None)
    overrides = [*es.bench_data(tmp_path), f"run.dir={tmp_path / 'run'}", "data.workers=0"]
    cfg = load_config(PretrainConfig, f"{repo_root}/configs/pretrain/m2restore.yaml", overrides)
    assert cfg.data.source == "shards" and cfg.data.val_shards == cfg.data.shards
    stream = iter(build_train_stream(cfg.data, seed=0, rank=0, world_size=1, micro_batch=2, crop=cfg.train.crop))
    batch = next(stream)
    stream.close()
    assert batch["lq"].shape == batch["gt"].shape == (2, 3, cfg.train.crop, cfg.train.crop)
    assert len(build_val_set(cfg.data, cfg.train.crop)) > 0


def test_engine_speed_refuses_to_run_on_a_cpu(tmp_path, repo_root):
    result = subprocess.run([sys.executable, "bench/engine_speed.py", "--variants", "fp32-eager", "--json",
                             str(tmp_path / "out.json")], cwd=repo_root, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1"))
    assert result.returncode != 0 and "no CUDA device" in result.stderr
    assert not (tmp_path / "out.json").exists()


def test_every_engine_row_is_a_pretraining_config_m2r_accepts(repo_root, monkeypatch, tmp_path):
    """The GPU rows' settings, checked here: on the GPU a misspelt key would cost a row of the device window."""
    from m2r.config import load_config
    from m2r.engine.config import PretrainConfig, validate_pretrain_config

    es = _engine_speed(repo_root, monkeypatch)
    for key in es.GPU_ROWS:
        variant = es.train_speed.variant_named(key, es.train_speed.GPU_VARIANTS)
        overrides = [*es.BENCH_DATA, f"run.dir={tmp_path}", *es.engine_overrides(variant)]
        cfg = load_config(PretrainConfig, f"{repo_root}/{es.PRETRAIN_CONFIGS[variant.config]}", overrides)
        validate_pretrain_config(cfg, 1)
        assert (cfg.train.precision, cfg.train.zero_stage) == (("bf16", 2) if variant.bf16 else ("fp32", 1))
        assert cfg.train.compile == bool(variant.compile) and cfg.train.channels_last == variant.channels_last
        assert cfg.train.activation_checkpointing == variant.checkpointing
