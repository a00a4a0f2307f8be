#!/usr/bin/env bash
# Fill .gpu_wheels/ (git-ignored) with what the GPU machine (CPython 3.12, torch 2.11 preinstalled, no
# internet) lacks, so `bash bench/gpu_checks.sh` can install it there. Run here, before the GPU call.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu_wheels   # two versions of one package stop the whole install there
mkdir -p .gpu_wheels
cp ../shared/wheels/gpu/*.whl .gpu_wheels/   # mamba-ssm and causal-conv1d built for that machine
chmod u+w .gpu_wheels/*.whl
# The versions this checkout's .venv runs (the tests' versions; pydantic needs its exact pydantic-core),
# else the newest.
pinned() {
  for package in "$@"; do
    .venv/bin/python -c "import importlib.metadata as m, sys; print(sys.argv[1] + '==' + m.version(sys.argv[1]))" \
        "$package" 2>/dev/null || echo "$package"
  done
}
# sdist-only pure-Python packages: build their wheels here
.venv/bin/pip wheel -q --no-deps -w .gpu_wheels deepspeed==0.19.8 antlr4-python3-runtime==4.9.3
.venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d .gpu_wheels $(pinned webdataset omegaconf open_clip_torch ftfy \
    wcwidth braceexpand zstandard hjson pydantic pydantic-core annotated-types typing-inspection \
    typing-extensions)
# What the machine's image holds already (/work/.library/device/KINDS.md) goes to if-missing/: installed
# there only when one of them fails to import, since copies first on PYTHONPATH shadow the image's own
# (a newer pytest would load the image's older plugins).
.venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d .gpu_wheels/if-missing pytest pluggy iniconfig pytest-timeout accelerate packaging psutil pyyaml \
    regex safetensors msgpack ninja py-cpuinfo nvidia-ml-py
du -sh .gpu_wheels
