#!/usr/bin/env bash
# Everything this project checks on a GPU (the GPU machine is lent for minutes), in two parts that
# each fit one device call's 10-minute limit; run them back to back while the machine is warm, the
# training benchmark first (it is what the speed issue is judged by):
#   bash bench/gpu_checks.sh bench   # train_speed: every variant, the loss trajectory, the profile (<= 10 min; compiles)
#   bash bench/gpu_checks.sh tests   # wheels, every GPU-marked test, block and activation-memory benchmarks,
#                                    # then train_speed's scan, evaluation and largest-crop parts (<= 8.5 min)
#   bash bench/gpu_checks.sh         # both
# Results under $OUT (default /tmp/m2r-gpu). Every benchmark writes its JSON after each measurement,
# so a timeout keeps what was measured. bench/scan_speed.py alone also gives the scan kernels' memory.
# Wheels: run `bash bench/fetch_gpu_wheels.sh` here first; .gpu_wheels/ must travel with the checkout.
set -u
PART=${1:-all}
OUT=${OUT:-/tmp/m2r-gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu_wheels/*.whl > "$OUT/install.txt" 2>&1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)"; } > "$OUT/machine.txt" 2>&1

if [ "$PART" = tests ] || [ "$PART" = all ]; then
  # The scan files run whole: their mamba_ssm cross-checks need the kernels' package, present only here.
  { timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_scan.py tests/test_mamba.py
    echo "scan tests exit $?"
    timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -m gpu -p no:cacheprovider \
        tests/test_clip_prior.py tests/test_network.py tests/test_eval_cli.py tests/test_engine_gpu.py
    echo "gpu tests exit $?"; } > "$OUT/gpu_tests.txt" 2>&1
  timeout 60 python3 bench/block_speed.py --json "$OUT/block_speed.json" > "$OUT/block_speed.txt" 2>&1
  echo "block_speed exit $?" >> "$OUT/block_speed.txt"
  timeout 45 python3 bench/activation_memory.py --json "$OUT/activation_memory.json" > "$OUT/activation_memory.txt" 2>&1
  echo "activation_memory exit $?" >> "$OUT/activation_memory.txt"
  timeout "${REST_TIMEOUT:-90}" python3 bench/train_speed.py --only scan,eval,crop \
      --json "$OUT/train_speed_rest.json" > "$OUT/train_speed_rest.txt" 2>&1
  echo "train_speed exit $?" >> "$OUT/train_speed_rest.txt"
fi
if [ "$PART" = bench ] || [ "$PART" = all ]; then
  # Two processes, so that a slow compilation costs the least important measurements: first the
  # official recipe and the compiled faithful variant, with the loss trajectory and the profile (both
  # reuse its compiled graphs) and DA-CLIP's share; then the other variants, most wanted first.
  timeout "${BENCH_TIMEOUT:-300}" python3 bench/train_speed.py --only train,trajectory,profile,clip \
      --variants 0,2 --steps 6 --warmup 2 --json "$OUT/train_speed.json" > "$OUT/train_speed.txt" 2>&1
  echo "train_speed exit $?" >> "$OUT/train_speed.txt"
  timeout "${MORE_TIMEOUT:-270}" python3 bench/train_speed.py --only train --variants 4,3,1,5 \
      --steps 6 --warmup 2 --json "$OUT/train_speed_more.json" > "$OUT/train_speed_more.txt" 2>&1
  echo "train_speed exit $?" >> "$OUT/train_speed_more.txt"
fi
tail -n 3 "$OUT"/*.txt
