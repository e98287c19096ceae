"""The evaluation tasks, each declared once: its name, help line, settings dataclass and implementation module.

`megatron-ext eval <task>`, the suite's YAML sections and report, and the package's exports all iterate
TASKS; `register` adds a task (a plug-in, a test). Standard library only, and implementations load on
first use: the command-line parser is built from this at every `megatron-ext` start, without torch.

A name is an identifier (a YAML key); the subcommand spells it with '-' for '_', the registered name
working too: the task `lm_eval` (the suite's section) is `megatron-ext eval lm-eval`.
"""

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

from megatron_ext.eval.harness.settings import LmEvalSettings
from megatron_ext.eval.settings import (
    AttentionSettings,
    CompareSettings,
    EvalSettingsError,
    NeedleSettings,
    PasskeySettings,
    PerplexitySettings,
    RulerSettings,
)

# What a task's implementation module defines, under these names:
#   evaluate(model, settings) -> an EvalResult; evaluate(model, settings, reference=None) when it uses_reference
#   report_section(settings, results, files, report_dir) -> the suite report's Markdown lines, given the
#       results and the files output_files wrote, both by model name; links relative to report_dir
# and, where it has any:
#   output_files(result, directory) -> [paths]: the files written besides the JSON (default: none)
#   summary_columns(result) -> {label: {length: value}}: its columns in the suite's summary (default: none)
#   prepare(settings): checks beyond the settings' own values (an installed package, task data), run before
#       any model loads (default: none)
#   prompts(tokenizer, settings): the prompts evaluate asks, built from the model's tokenizer alone before the
#       model loads, so a length too short for them is refused first (default: none)
HOOKS = ("evaluate", "report_section")

RESERVED_NAMES = ("suite",)  # `megatron-ext eval suite` is not a task


@dataclass(frozen=True)
class EvalTask:
    name: str  # the subcommand `megatron-ext eval <name>` and the suite's YAML section `<name>: {...}`
    help: str  # one line
    settings: type  # a dataclass: defaults for every field (they become flags) and validate()
    module: str  # the implementation, imported on first use; defines HOOKS
    uses_reference: bool = False  # compares with a second model: `--reference`, the suite's attention_reference
    needs_reference: bool = False  # ... and means nothing without one: `--reference` required, and so is the
    # suite's attention_reference when it lists the task
    in_default_suite: bool = True  # run by a suite whose config lists no `tasks` (False: needs settings or installs)
    pipeline_parallel: bool = True  # runs with pipeline_parallel_size > 1 (False: needs every layer on one rank)

    @property
    def command(self) -> str:
        """The subcommand: `megatron-ext eval <command>`."""
        return self.name.replace("_", "-")

    def implementation(self) -> ModuleType:
        module = importlib.import_module(self.module)
        missing = [hook for hook in HOOKS if not callable(getattr(module, hook, None))]
        if missing:
            raise ImportError(f"eval task {self.name!r}: {self.module} lacks {', '.join(missing)}; "
                              f"a task's module defines {', '.join(HOOKS)}")
        return module

    def evaluate(self, model, settings, reference=None):
        """The task's result for `model`; `reference` is passed only to tasks that use one."""
        if self.uses_reference:
            return self.implementation().evaluate(model, settings, reference=reference)
        return self.implementation().evaluate(model, settings)

    def prepare(self, settings, *, pipeline_parallel_size: int = 1) -> None:
        """The task's checks that must pass before any model loads."""
        if pipeline_parallel_size > 1 and not self.pipeline_parallel:
            raise EvalSettingsError(f"{self.name} holds every layer on one rank, but the pipeline parallel size is "
                                    f"{pipeline_parallel_size}: evaluate it with pipeline parallel size 1 (any saved "
                                    "layout loads; use tensor or context parallelism to spread the model)")
        check = getattr(self.implementation(), "prepare", None)
        if check:
            check(settings)

    def check_prompts(self, settings, tokenizer: Callable[[], object]) -> None:
        """Build the task's prompts (its `prompts` hook) from `tokenizer()`, the model's tokenizer read without the
        weights, before the model loads: a length they do not fit in is a UserError now, not after the load."""
        build = getattr(self.implementation(), "prompts", None)
        if build:
            build(tokenizer(), settings)

    def output_files(self, result, directory) -> list:
        write = getattr(self.implementation(), "output_files", None)
        return write(result, directory) if write else []

    def report_section(self, settings, results: dict, files: dict, report_dir) -> list[str]:
        return self.implementation().report_section(settings, results, files, report_dir)

    def summary_columns(self, result) -> dict:
        columns = getattr(self.implementation(), "summary_columns", None)
        return columns(result) if columns else {}


TASKS: dict[str, EvalTask] = {}  # in registration order: the order of subcommands and summary columns


def register(task: EvalTask) -> EvalTask:
    """Add `task` to TASKS (the CLI and the suite pick it up from then on); its name must be new."""
    if task.name in TASKS or task.name in RESERVED_NAMES:
        raise ValueError(f"eval task name {task.name!r} is taken: choose another")
    if not task.name.isidentifier():
        raise ValueError(f"eval task name {task.name!r} must be an identifier (a subcommand and a YAML key)")
    TASKS[task.name] = task
    return task


register(EvalTask("perplexity", "sliding-window perplexity per evaluated length", PerplexitySettings,
                  "megatron_ext.eval.perplexity"))
register(EvalTask("passkey", "passkey retrieval accuracy per length (PoSE template)", PasskeySettings,
                  "megatron_ext.eval.passkey"))
register(EvalTask("needle", "needle-in-a-haystack grid: heatmap PNG and CSV", NeedleSettings,
                  "megatron_ext.eval.needle"))
register(EvalTask("ruler", "RULER-style tasks: multi-key NIAH, multi-value NIAH, variable tracking", RulerSettings,
                  "megatron_ext.eval.ruler"))
register(EvalTask("attention", "attention entropy per layer/head, JS divergence to a reference", AttentionSettings,
                  "megatron_ext.eval.attention", uses_reference=True, pipeline_parallel=False))
register(EvalTask("compare", "a model against a second one on the same token ids (a checkpoint and its Hugging Face "
                  "export): max logit difference, top-1 agreement, perplexity of both", CompareSettings,
                  "megatron_ext.eval.compare", uses_reference=True, needs_reference=True, in_default_suite=False))
register(EvalTask("lm_eval", "EleutherAI lm-evaluation-harness tasks (short-context regression), offline",
                  LmEvalSettings, "megatron_ext.eval.harness.task", in_default_suite=False))
