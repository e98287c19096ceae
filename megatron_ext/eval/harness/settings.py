"""Settings of `megatron-ext eval lm-eval` (the suite's `lm_eval` section), and the check that lm-eval is installed.

Standard library only: the command line is built from this at every `megatron-ext` start.
"""

import importlib.metadata
import importlib.util
import json
from dataclasses import dataclass, field

from megatron_ext.eval.settings import EvalSettingsError

LM_EVAL_VERSION = "0.4.13"  # what setup.py's `eval` extra (and tools/serve_env.sh) installs and the tests run
BACKENDS = ("default", "vllm")
SERVE_ENV_HINT = ("make serve-env, then run .venv-serve/bin/megatron-ext eval lm-eval --backend vllm ... "
                  "(vLLM has its own environment: it pins its own torch)")


@dataclass
class LmEvalSettings:
    tasks: list[str] = field(default_factory=list, metadata=dict(
        help="lm-eval task, group or tag names (e.g. hellaswag arc_easy), task YAML files, or directories of task "
             "YAMLs (every task in them)"))
    limit: int | None = field(default=None, metadata=dict(help="examples per task (default: all)"))
    num_fewshot: int | None = field(default=None, metadata=dict(
        help="few-shot examples per prompt (default: each task's own, else 0)"))
    batch_size: int = field(default=1, metadata=dict(help="sequences per forward pass of loglikelihood requests"))
    max_length: int | None = field(default=None, metadata=dict(
        help="longest sequence the model sees, prompts cut from the left beyond it (default: the model's trained "
             "window; more is allowed, with a warning)"))
    max_gen_tokens: int = field(default=256, metadata=dict(
        help="tokens generated when a task sets no max_gen_toks (lm-eval's own default)"))
    log_samples: bool = field(default=False, metadata=dict(
        help="also write every request with the model's response (samples_<task>.jsonl)"))
    backend: str = field(default="default", metadata=dict(
        help="what computes the scores: 'default' (megatron_ext's own forward passes on the loaded model) or "
             "'vllm' (a vLLM engine on the model's export, a checkpoint exported first; run it from the serving "
             "environment, `make serve-env`: .venv-serve/bin/megatron-ext eval lm-eval --backend vllm ...)"))
    metadata: str | None = field(default=None, metadata=dict(
        help="JSON object handed to the tasks, as lm-eval's --metadata; its RULER tasks need "
             "'{\"tokenizer\": \"<Hugging Face tokenizer dir>\", \"max_seq_lengths\": [4096]}'"))

    def validate(self) -> None:
        if not self.tasks:
            raise EvalSettingsError("lm_eval.tasks is empty: name lm-eval tasks (e.g. --tasks hellaswag arc_easy), "
                                    "task YAML files or directories of them")
        if min(self.batch_size, self.max_gen_tokens) < 1 or (self.limit is not None and self.limit < 1):
            raise EvalSettingsError(f"lm_eval: batch_size ({self.batch_size}), max_gen_tokens "
                                    f"({self.max_gen_tokens}) and limit ({self.limit}) must be >= 1")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise EvalSettingsError(f"lm_eval.num_fewshot ({self.num_fewshot}) must be >= 0")
        if self.max_length is not None and self.max_length < 2:
            raise EvalSettingsError(f"lm_eval.max_length ({self.max_length}) must be >= 2")
        if self.backend not in BACKENDS:
            raise EvalSettingsError(f"lm_eval.backend ({self.backend!r}) must be one of {', '.join(BACKENDS)}")
        if self.metadata is not None and not isinstance(_json_or_none(self.metadata), dict):
            raise EvalSettingsError(f"lm_eval.metadata ({self.metadata}) must be a JSON object, e.g. "
                                    '\'{"max_seq_lengths": [4096]}\'')


def _json_or_none(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def require_lm_eval() -> str:
    """The installed lm-eval's version; an EvalSettingsError saying how to install it if there is none."""
    if importlib.util.find_spec("lm_eval") is None:
        raise EvalSettingsError(f"lm_eval: lm-evaluation-harness is not installed: pip install -e \".[eval]\" "
                                f"(lm-eval=={LM_EVAL_VERSION})")
    return importlib.metadata.version("lm_eval")


def require_vllm() -> None:
    """An EvalSettingsError naming the serving environment where this Python has no vLLM."""
    if importlib.util.find_spec("vllm") is None:
        raise EvalSettingsError(f"lm_eval.backend vllm: vLLM is not installed in this Python: {SERVE_ENV_HINT}")
