"""The GPU benchmark runs end to end on CPU in --smoke mode (tiny model), so it cannot rot between GPU runs."""
import importlib.util
import json
import os
import re
import subprocess
import sys


def test_train_speed_smoke_writes_every_measurement(tmp_path, repo_root):
    out = tmp_path / "smoke.json"
    subprocess.run([sys.executable, "bench/train_speed.py", "--smoke", "--json", str(out)], cwd=repo_root,
                   check=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    results = json.loads(out.read_text())
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
    results = json.loads(out.read_text())
    assert results["shifted_vs_conv_max_diff"] < 1e-5
    timed = [v for k, v in results.items() if isinstance(v, dict)]
    assert len(timed) == 3 and all(r["ms"] > 0 for r in timed)


def test_activation_memory_smoke_shrinks_with_each_checkpointing_mode(tmp_path, repo_root):
    out = tmp_path / "memory.json"
    subprocess.run([sys.executable, "bench/activation_memory.py", "--smoke", "--json", str(out)], cwd=repo_root,
                   check=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    (run,) = json.loads(out.read_text())["runs"]
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
