#!/usr/bin/env bash
# Everything this project checks on a GPU. The GPU machine is lent for 15 minutes of device time in
# all (its start included), so the checks come in parts sized to fit, most wanted first; run them
# back to back while the machine is warm, then hand it back:
#   bash bench/gpu_checks.sh bench   # train_speed: every variant, the loss trajectory, the profile (<= 7.5 min; compiles)
#   bash bench/gpu_checks.sh tests   # every GPU-marked test, then train_speed's scan, evaluation and largest crop
#                                    # parts (<= 5 min: give it what device time is left)
#   bash bench/gpu_checks.sh engine  # engine_speed: the pretraining step through m2r's engine (DeepSpeed ZeRO,
#                                    # data stream, EMA, report) for the official recipe and the fast rows (<= 3 min)
#   bash bench/gpu_checks.sh extra   # block and activation-memory benchmarks (<= 3 min), if time is left
# The machine stays warm about 30 s after a call: two calls, `bench` then `engine; tests` (their $OUT is
# emptied per call: engine rows then compare with the official figure; `engine_speed.py --table` later).
# Results under $OUT (default /tmp/m2r-gpu), at most 8 files per part. Every benchmark writes its JSON
# after each measurement, so a timeout keeps what was measured. bench/scan_speed.py alone also gives
# the scan kernels' memory.
# Wheels: run `bash bench/fetch_gpu_wheels.sh` here first; .gpu_wheels/ must travel with the checkout.
set -u
cd "$(dirname "$0")/.."   # .gpu_wheels and bench/ are relative to the repository root
PART=${1:-bench}
case "$PART" in
  bench|tests|engine|extra) ;;
  *) echo "usage: bash bench/gpu_checks.sh bench|tests|engine|extra" >&2; exit 2 ;;
esac
OUT=${OUT:-/tmp/m2r-gpu}
mkdir -p "$OUT"
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
{
  ls .gpu_wheels/*.whl >/dev/null || echo "NO .gpu_wheels: name .gpu_wheels in the run's carry"
  timeout 120 python3 -m pip install -q --no-compile --no-index --no-deps --upgrade --target /tmp/site .gpu_wheels/*.whl 2>&1 | tail -n 5
  python3 -c "import pytest, pytest_timeout, accelerate, packaging, psutil, yaml, regex, safetensors, msgpack, cpuinfo, pynvml" \
    || timeout 60 python3 -m pip install -q --no-compile --no-index --no-deps --upgrade --target /tmp/site \
         .gpu_wheels/if-missing/*.whl 2>&1 | tail -n 5
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)"
  # A kernel that fails to import makes the scan fall back to our PyTorch one, 10x slower: say so first.
  timeout 60 python3 -c "import deepspeed, open_clip, causal_conv1d
import mamba_ssm.ops.selective_scan_interface as kernels
print('kernels importable; fused Mamba path:', kernels.causal_conv1d_fn is not None)"
} > "$OUT/machine-$PART.txt" 2>&1
# Without CUDA or the carried packages every measurement below fails or runs on the CPU: stop now.
timeout 60 python3 -c "import torch, deepspeed, open_clip; assert torch.cuda.is_available(), 'no CUDA device'" \
    >> "$OUT/machine-$PART.txt" 2>&1 || { echo "STOPPED: CUDA or the wheels missing" | tee -a "$OUT/machine-$PART.txt"; exit 1; }

case "$PART" in
bench)
  # Two processes, so that a slow compilation costs the least important measurements: first the
  # official recipe and the compiled faithful variant, with the loss trajectory and the profile (both
  # reuse its compiled graphs) and DA-CLIP's share; then the other variants, the memory-target
  # candidate first, then the eager ones, the shifted depthwise compile last.
  timeout -k 10 "${BENCH_TIMEOUT:-250}" python3 bench/train_speed.py --only train,trajectory,profile,clip \
      --variants fp32-eager,bf16-compiled --steps 6 --warmup 2 --json "$OUT/train_speed.json" > "$OUT/train_speed.txt" 2>&1
  echo "train_speed exit $?" >> "$OUT/train_speed.txt"
  timeout -k 10 "${MORE_TIMEOUT:-160}" python3 bench/train_speed.py --only train \
      --variants bf16-compiled-ac-full-res,bf16-eager,plus-bf16-ac-full-res,bf16-compiled-shifted \
      --steps 6 --warmup 2 --json "$OUT/train_speed_more.json" > "$OUT/train_speed_more.txt" 2>&1
  echo "train_speed exit $?" >> "$OUT/train_speed_more.txt"
  ;;
tests)
  # Quick files first, the engine's (compiles; subprocesses) last, each test capped by pytest-timeout, so
  # that a slow compile costs one test's result rather than every later file's; -v shows each result as it
  # comes. The scan files run whole: their mamba_ssm cross-checks need the kernels' package, present only here.
  { timeout 60 python3 -m pytest -v --tb=short -p no:cacheprovider --timeout 40 tests/test_scan.py tests/test_mamba.py
    echo "scan tests exit $?"
    timeout -k 10 "${TEST_TIMEOUT:-150}" python3 -m pytest -v --tb=short -m gpu -p no:cacheprovider --timeout 120 \
        tests/test_stop_signals.py tests/test_moe.py tests/test_clip_prior.py tests/test_network.py tests/test_eval_cli.py \
        tests/test_engine_gpu.py
    echo "gpu tests exit $?"; } > "$OUT/gpu_tests.txt" 2>&1
  timeout -k 10 "${REST_TIMEOUT:-75}" python3 bench/train_speed.py --only scan,eval,crop \
      --json "$OUT/train_speed_rest.json" > "$OUT/train_speed_rest.txt" 2>&1
  echo "train_speed exit $?" >> "$OUT/train_speed_rest.txt"
  ;;
engine)
  # One process per row, most wanted first: the official recipe through the engine, bf16 ZeRO 2 + channels_last
  # eagerly (each estimated under 40 s: start-up, then 5 steps of 4 images at the 2026-11-26 step times), then
  # the same compiled, whose compile may need more than is left; a timeout keeps the rows done.
  # Rows are compared with train_speed's figures for the same variant where this call's $OUT holds them (else
  # with the official 8.54 img/s; `engine_speed.py --table engine_speed.json --reference ...` compares later).
  references=()
  for json in "$OUT"/train_speed.json "$OUT"/train_speed_more.json; do
    [ -f "$json" ] && references+=(--reference "$json")
  done
  timeout -k 10 "${ENGINE_TIMEOUT:-130}" python3 bench/engine_speed.py \
      --variants fp32-eager,bf16-eager,bf16-compiled --steps 4 --warmup 1 ${references[@]+"${references[@]}"} \
      --json "$OUT/engine_speed.json" > "$OUT/engine_speed.txt" 2>&1
  echo "engine_speed exit $?" >> "$OUT/engine_speed.txt"
  ;;
extra)
  timeout -k 10 120 python3 bench/block_speed.py --json "$OUT/block_speed.json" > "$OUT/block_speed.txt" 2>&1
  echo "block_speed exit $?" >> "$OUT/block_speed.txt"
  timeout -k 10 45 python3 bench/activation_memory.py --json "$OUT/activation_memory.json" > "$OUT/activation_memory.txt" 2>&1
  echo "activation_memory exit $?" >> "$OUT/activation_memory.txt"
  ;;
esac
tail -n 3 "$OUT"/*.txt
