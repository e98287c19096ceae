"""Long-context evaluation on megatron_ext checkpoints and Hugging Face causal LMs: sliding-window perplexity,
passkey retrieval, needle-in-a-haystack grid, RULER-style tasks, attention entropy / JS divergence, EleutherAI's
lm-evaluation-harness tasks (the tasks of registry.TASKS; `register` adds one), and a suite that writes one Markdown
report. Also the `megatron-ext eval` command (`add_eval_args`, `run_eval`) and `EvalModelLM`, lm-eval's `LM` over
an EvalModel, for `lm_eval.simple_evaluate(model=EvalModelLM(load_eval_model(...)), ...)`.

Importing this package imports neither torch nor megatron: names load from their modules on first use.
"""

from typing import TYPE_CHECKING

from megatron_ext.eval.registry import TASKS, EvalTask, register
from megatron_ext.lazy import lazy_getattr

_LOADED_ON_FIRST_USE = {
    "EvalModel": "megatron_ext.eval.models",
    "EvalModelLM": "megatron_ext.eval.harness.lm",
    "HFCausalLM": "megatron_ext.eval.models",
    "MegatronExtModel": "megatron_ext.eval.models",
    "load_eval_model": "megatron_ext.eval.models",
    "attention_entropy": "megatron_ext.eval.attention",
    "js_divergence": "megatron_ext.eval.attention",
    "check_answers": "megatron_ext.eval.scoring",
    "greedy_generate": "megatron_ext.eval.scoring",
    "build_prompt": "megatron_ext.data.prompts",
    "passkey_prompt": "megatron_ext.data.prompts",
    "EvalSettingsError": "megatron_ext.eval.settings",
    "SuiteConfig": "megatron_ext.eval.suite",
    "load_suite_config": "megatron_ext.eval.suite",
    "run_suite": "megatron_ext.eval.suite",
    "add_eval_args": "megatron_ext.eval.cli",
    "run_eval": "megatron_ext.eval.cli",
}
# each built-in task's evaluate_<name> and settings class
_LOADED_ON_FIRST_USE |= {f"evaluate_{task.name}": task.module for task in TASKS.values()}
_LOADED_ON_FIRST_USE |= {task.settings.__name__: task.settings.__module__ for task in TASKS.values()}

if TYPE_CHECKING:
    from megatron_ext.data.prompts import build_prompt, passkey_prompt
    from megatron_ext.eval.attention import attention_entropy, evaluate_attention, js_divergence
    from megatron_ext.eval.cli import add_eval_args, run_eval
    from megatron_ext.eval.compare import evaluate_compare
    from megatron_ext.eval.harness.lm import EvalModelLM
    from megatron_ext.eval.harness.settings import LmEvalSettings
    from megatron_ext.eval.harness.task import evaluate_lm_eval
    from megatron_ext.eval.models import EvalModel, HFCausalLM, MegatronExtModel, load_eval_model
    from megatron_ext.eval.needle import evaluate_needle
    from megatron_ext.eval.passkey import evaluate_passkey
    from megatron_ext.eval.perplexity import evaluate_perplexity
    from megatron_ext.eval.ruler import evaluate_ruler
    from megatron_ext.eval.scoring import check_answers, greedy_generate
    from megatron_ext.eval.settings import (
        AttentionSettings,
        CompareSettings,
        EvalSettingsError,
        NeedleSettings,
        PasskeySettings,
        PerplexitySettings,
        RulerSettings,
    )
    from megatron_ext.eval.suite import SuiteConfig, load_suite_config, run_suite

__all__ = sorted(["EvalTask", "TASKS", "register", *_LOADED_ON_FIRST_USE])

__getattr__ = lazy_getattr(__name__, _LOADED_ON_FIRST_USE)
