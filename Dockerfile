# megatron_ext in a container, two images from this one file (docs/launch.md, "The container"):
#
# GPU (the default; what the SLURM scripts run): NVIDIA's PyTorch container. CUDA, NCCL, cuDNN, torch,
# Transformer Engine (and apex, where the image has it) come from the pinned base image and are kept;
# megatron-core 0.16.x and the rest of setup.py's requirements are installed on top.
#
#   docker build -t megatron-ext:0.1.0 .                                          (make image)
#
# CPU: a plain Python 3.11 base with the CPU torch of requirements-cpu.txt, for what needs no GPU:
# conversion, planning, rendering launch scripts, evaluating small models, tiny training runs, CI.
#
#   docker build --build-arg BASE_IMAGE=python:3.11-slim-bookworm --build-arg FLAVOR=cpu \
#       -t megatron-ext:0.1.0-cpu .                          (make image-cpu: buildah, no Docker engine needed)
#
# Nothing is downloaded when a job runs. Layers, from the rarely to the often changed: torch (CPU image
# only), setup.py's requirements, the package. A change to the package's code rebuilds only the last.
#
# NGC 25.11: Python 3.12, CUDA 13.0, torch 2.10 (NVIDIA build), Transformer Engine. Change the tag only
# together with a test run (megatron-core 0.16's dev extra asks for Transformer Engine >= 2.9, < 2.12).
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.11-py3
FROM ${BASE_IMAGE}

# gpu: keep the base image's torch (checked below); cpu: install requirements-cpu.txt's torch, the CPU build
# from PyTorch's CPU index (PyPI's Linux torch is the CUDA build, several GB).
ARG FLAVOR=gpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Build-time only, for hosts behind a TLS-inspecting proxy or holding wheels locally: paths of a CA bundle
# and a wheel directory that the builder bind-mounts into the RUN steps (buildah bud -v ...:ro). pip reads
# them from the environment; no file of the host is copied into a layer.
ARG PIP_CERT
ARG PIP_FIND_LINKS

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1

WORKDIR /opt/megatron_ext

# 1) torch (CPU image only; the GPU image's comes with its base): rebuilt only when the pins change.
COPY requirements-cpu.txt constraints-cpu.txt ./
RUN case "$FLAVOR" in \
      gpu) ;; \
      cpu) pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} -r requirements-cpu.txt ;; \
      *) echo "FLAVOR=$FLAVOR: give gpu or cpu" >&2; exit 2 ;; \
    esac

# 2) The requirements of setup.py (with the dev extra: transformers, safetensors, matplotlib, lm-eval for
#    conversion and evaluation), in their own layer: rebuilt only when setup.py changes (not the README, nor
#    any other file: this layer is 2 GB). The package itself is a stub here. Not the [gpu] extra: Transformer Engine is the base image's.
#    setup.py's ranges are the pins (the CPU image adds constraints-cpu.txt's), hence hadolint's DL3013 off.
COPY setup.py ./
COPY megatron_ext/__init__.py megatron_ext/__init__.py
# hadolint ignore=DL3013
RUN if [ "$FLAVOR" = cpu ]; then pip install ".[dev]" -c constraints-cpu.txt; else pip install ".[dev]"; fi

# 3) The package, without touching the dependencies again; then check that the torch is the one this
#    image was made for and that megatron-core's compiled dataset helpers import.
COPY . .
RUN pip install --no-deps . \
 && rm -rf build megatron_ext.egg-info \
 && if [ "$FLAVOR" = gpu ]; then \
      python -c "import torch; assert 'nv' in torch.__version__, f'torch {torch.__version__} replaced the NGC build'"; \
    else \
      python -c "import torch; assert torch.__version__.endswith('+cpu'), f'torch {torch.__version__}: not the CPU build'"; \
    fi \
 && python -c "import megatron.core, megatron_ext.launch.cli; from megatron.core.datasets import helpers_cpp" \
 && megatron-ext --help > /dev/null

CMD ["megatron-ext", "--help"]
