#!/usr/bin/env bash
# Create .venv in the repo root and install m2r with its test tools.
# The torch/torchvision pair is installed first and pinned, together: given torch alone, pip takes the
# newest torchvision, which may require (and install) another torch. README, Install: TORCH_PAIR picks
# another pair or index (e.g. the CPU-only wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

case "$(uname -m)" in
  x86_64)  TORCH_PAIR=${TORCH_PAIR:-"torch==2.14.1 torchvision==0.29.1"} ;;
  aarch64) TORCH_PAIR=${TORCH_PAIR:-"torch==2.9.1 torchvision==0.24.1"} ;;
  *)       TORCH_PAIR=${TORCH_PAIR:-"torch torchvision"} ;;
esac

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# shellcheck disable=SC2086
.venv/bin/python -m pip install -q $TORCH_PAIR
.venv/bin/python -m pip install -q -e ".[test]"
touch .venv/.m2r-setup-done
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
