#!/usr/bin/env bash
# Fill .gpu_wheels/ (git-ignored) with what the GPU machine (CPython 3.12, torch 2.11 preinstalled, no
# internet) lacks, so `bash bench/gpu_checks.sh` can install it there. Run here, before the GPU call.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu_wheels
cp ../shared/wheels/gpu/*.whl .gpu_wheels/   # mamba-ssm and causal-conv1d built for that machine
chmod u+w .gpu_wheels/*.whl
# sdist-only pure-Python packages: build their wheels here
.venv/bin/pip wheel -q --no-deps -w .gpu_wheels deepspeed==0.19.8 antlr4-python3-runtime==4.9.3
.venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d .gpu_wheels webdataset omegaconf open_clip_torch ftfy \
    wcwidth braceexpand zstandard hjson ninja py-cpuinfo msgpack safetensors pydantic pydantic-core \
    annotated-types typing-inspection nvidia-ml-py psutil regex packaging accelerate pyyaml \
    pytest pluggy iniconfig pytest-timeout
du -sh .gpu_wheels
