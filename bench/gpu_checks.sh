#!/usr/bin/env bash
# Everything this project checks on a GPU, in one run (the GPU machine is lent for minutes):
# install the carried wheels, run every GPU-marked test, then the block and training benchmarks
# (train_speed measures the scan kernels too; bench/scan_speed.py alone gives their memory).
# The timeouts below add up to about 9 minutes, inside one device call's 10-minute limit; every
# benchmark writes its JSON after each measurement, so a timeout keeps what was measured.
#   bash bench/gpu_checks.sh            # results under $OUT (default /tmp/m2r-gpu)
# Wheels: run `bash bench/fetch_gpu_wheels.sh` here first; .gpu_wheels/ must travel with the checkout.
set -u
OUT=${OUT:-/tmp/m2r-gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu_wheels/*.whl > "$OUT/install.txt" 2>&1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)"; } > "$OUT/machine.txt" 2>&1

# The scan files run whole: their mamba_ssm cross-checks need the kernels' package, present only here.
{ timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_scan.py tests/test_mamba.py
  echo "scan tests exit $?"
  timeout "${TEST_TIMEOUT:-130}" python3 -m pytest -q -m gpu -p no:cacheprovider \
      tests/test_clip_prior.py tests/test_network.py tests/test_eval_cli.py tests/test_engine_gpu.py
  echo "gpu tests exit $?"; } > "$OUT/gpu_tests.txt" 2>&1
timeout 90 python3 bench/block_speed.py --json "$OUT/block_speed.json" > "$OUT/block_speed.txt" 2>&1
timeout "${BENCH_TIMEOUT:-300}" python3 bench/train_speed.py --steps 6 --warmup 2 --json "$OUT/train_speed.json" > "$OUT/train_speed.txt" 2>&1
echo "train_speed exit $?" >> "$OUT/train_speed.txt"
tail -n 3 "$OUT"/*.txt
