# Quick start:  make demo   (built-in CPU pretraining demo, 2 ranks)   |   make test   (CPU test suite)
# Both create .venv on first use (scripts/setup.sh).
SHELL := /bin/bash
VENV := .venv/bin
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test
setup: .venv/.m2r-setup-done

.venv/.m2r-setup-done: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

demo: setup
	$(VENV)/deepspeed --num_gpus 2 pretrain.py --config configs/pretrain/demo.yaml

test: setup
	$(VENV)/python -m pytest tests -q
