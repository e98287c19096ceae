# megatron_ext on NVIDIA's PyTorch container. CUDA, NCCL, cuDNN, torch, Transformer Engine (and apex, where
# the image has it) come from the pinned base image and are kept; megatron-core 0.16.x and the rest of
# setup.py's requirements are installed on top. Nothing is downloaded when a job runs.
# Build, push, and run with pyxis/enroot or Apptainer: docs/launch.md.
#
#   docker build -t megatron-ext:0.1.0 .
#
# NGC 25.11: Python 3.12, CUDA 13.0, torch 2.10 (NVIDIA build), Transformer Engine. Change the tag only
# together with a test run (megatron-core 0.16's dev extra asks for Transformer Engine >= 2.9, < 2.12).
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.11-py3
FROM ${BASE_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1

WORKDIR /opt/megatron_ext

# 1) The requirements of setup.py (with the dev extra: transformers, safetensors, matplotlib for
#    conversion and evaluation), in their own layer: rebuilt only when setup.py changes. The package
#    itself is a stub here. Not the [gpu] extra: Transformer Engine is the base image's.
COPY setup.py README.md ./
COPY megatron_ext/__init__.py megatron_ext/__init__.py
RUN pip install ".[dev]"

# 2) The package, without touching the dependencies again.
COPY . .
RUN pip install --no-deps . \
 && python -c "import torch; assert 'nv' in torch.__version__, f'torch {torch.__version__} replaced the NGC build'" \
 && python -c "import megatron.core, megatron_ext.launch.cli; from megatron.core.datasets import helpers_cpp" \
 && megatron-ext --help > /dev/null

CMD ["megatron-ext", "--help"]
