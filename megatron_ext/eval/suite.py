"""`megatron-ext eval suite`: run a chosen set of evaluations on one or more models and write one Markdown report
(summary table, one section per task, needle heatmaps, attention plots) plus every result as JSON.

The YAML holds the suite's own keys (SuiteConfig) and one section per task, named after it in the registry
(megatron_ext/eval/registry.py) and read into its settings dataclass; see examples/configs/eval_tiny_harpe.yaml.
lm-evaluation-harness tasks run beside the in-tree ones as the task `lm_eval` (`tasks: [passkey, lm_eval]`,
`lm_eval: {tasks: [hellaswag], limit: 100}`), so one report holds long-context retrieval and short-context
regression.
"""

import dataclasses
import difflib
import functools
import gc
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from megatron_ext.config import ConfigError, check, from_dict, read_raw
from megatron_ext.eval.registry import TASKS
from megatron_ext.eval.results import is_reporting_rank, markdown_table


@dataclass
class ModelEntry:
    path: str  # a megatron_ext checkpoint (root or iter_ directory) or a Hugging Face model directory
    name: str | None = None  # shown in tables; default: the directory's name
    tokenizer_model: str | None = None  # megatron checkpoints whose tokenizer.model has moved

    @property
    def label(self) -> str:
        return self.name or Path(self.path).name


@dataclass
class SuiteConfig:
    models: list[dict] = field(default_factory=list)  # ModelEntry mappings, evaluated in order
    attention_reference: str | None = None  # the model that tasks with a reference compare the others with
    # default: every registered task a suite runs unasked (not lm_eval: it needs its task list and lm-eval)
    tasks: list[str] = field(default_factory=lambda: [name for name, task in TASKS.items() if task.in_default_suite])
    title: str = "Long-context evaluation"
    output_dir: str = "runs/eval"
    report: str = "eval_report.md"  # inside output_dir; pictures and JSON go to output_dir/<report stem>/
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    context_parallel_size: int = 1  # each prompt split zig-zag over CP ranks; the ranks left over split the prompts
    precision: str | None = None  # bf16 | fp32 | null: bf16 on GPU, fp32 on CPU
    # task -> its settings dataclass, from the YAML section named after the task; defaults where none is given
    settings: dict[str, object] = field(default_factory=dict)

    def __post_init__(self):
        self.settings = {name: self.settings.get(name) or task.settings() for name, task in TASKS.items()}

    def model_entries(self) -> list[ModelEntry]:
        return [from_dict(ModelEntry, raw, prefix=f"models[{i}].") for i, raw in enumerate(self.models)]

    def validate(self) -> None:
        entries = self.model_entries()
        check(bool(entries), "models is empty: list at least one {path: ..., name: ...}")
        unknown = [t for t in self.tasks if t not in TASKS]
        check(not unknown, f"tasks: unknown {unknown}; choose from {list(TASKS)}")
        names = [entry.label for entry in entries]
        check(len(set(names)) == len(names), f"model names {names} repeat: give each model a distinct name")
        check(self.attention_reference is None or self.attention_reference in names,
              f"attention_reference ({self.attention_reference!r}) is not one of the models {names}")
        needing = [t for t in self.tasks if TASKS[t].needs_reference]
        check(self.attention_reference is not None or not needing,
              f"tasks {needing} compare each model with a reference: set attention_reference to one of {names}")
        check(self.precision in (None, "bf16", "fp32"), f"precision ({self.precision!r}) must be bf16, fp32 or null")
        for task in self.tasks:
            self.settings[task].validate()

    def to_dict(self) -> dict:
        """The YAML mapping this config reads from: the suite's keys, then one section per task."""
        raw = dataclasses.asdict(self)
        sections = raw.pop("settings")
        return {**raw, **sections}


SUITE_KEYS = tuple(f.name for f in dataclasses.fields(SuiteConfig) if f.name != "settings")


def suite_config_from_dict(raw: dict) -> SuiteConfig:
    """A YAML mapping -> SuiteConfig: the sections named after registered tasks build their settings, the rest
    the suite's own keys; an unknown key is refused with the closest known one."""
    known = [*SUITE_KEYS, *TASKS]
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(sorted(known))}"
            raise ConfigError(f"unknown key '{key}': {hint}")
    settings = {name: from_dict(task.settings, raw[name], prefix=f"{name}.")
                for name, task in TASKS.items() if name in raw}
    config = from_dict(SuiteConfig, {key: raw[key] for key in SUITE_KEYS if key in raw}, prefix="")
    config.settings.update(settings)
    return config


def load_suite_config(path, overrides: list[str] = ()) -> SuiteConfig:
    """YAML + `key.sub=value` overrides -> a validated SuiteConfig (errors, UserErrors, name the key)."""
    config = suite_config_from_dict(read_raw(path, overrides, example="examples/configs/eval_*.yaml"))
    config.validate()
    return config


@dataclass
class LoadedModel:
    """What the report says of a model once the model itself is gone from memory."""

    name: str
    source: str | None
    context_window: int | None


def run_suite(config: SuiteConfig, command: str | None = None) -> Path:
    """Evaluate every model on every task, write JSON, pictures and the report; return the report's path.

    One model is in memory at a time (a 7B checkpoint at 128k is tens of GiB): each is loaded, runs every
    task, and is released before the next one loads. The attention reference, when a task compares with it,
    stays loaded beside them."""
    from megatron_ext.eval.models import eval_tokenizer

    started = time.perf_counter()
    for task in config.tasks:  # lm-eval installed, its tasks and their data here: before minutes of model loading
        TASKS[task].prepare(config.settings[task], pipeline_parallel_size=config.pipeline_parallel_size)
    output_dir = Path(config.output_dir)
    assets = output_dir / Path(config.report).stem
    tasks = [TASKS[task] for task in config.tasks]
    entries = config.model_entries()
    sources = [_resolve(entry, index) for index, entry in enumerate(entries)]  # once, before any model loads
    for index, (entry, source) in enumerate(zip(entries, sources)):  # prompts too long for a length: refused now
        tokenizer = functools.cache(functools.partial(eval_tokenizer, source, tokenizer_model=entry.tokenizer_model,
                                                      setting=f"models[{index}].path"))
        for task in tasks:
            task.check_prompts(config.settings[task.name], tokenizer)
    reference = None
    if any(task.uses_reference for task in tasks) and config.attention_reference is not None:
        index = next(i for i, entry in enumerate(entries) if entry.label == config.attention_reference)
        reference = _load(config, entries[index], index, sources[index])
    results = {task: {} for task in config.tasks}  # task -> model name -> result
    files = {task: {} for task in config.tasks}  # task -> model name -> the files written besides the JSON
    models = {}  # model name -> LoadedModel, for the report
    for index, entry in enumerate(entries):
        is_reference = reference is not None and entry.label == reference.name
        model = reference if is_reference else _load(config, entry, index, sources[index])
        models[model.name] = LoadedModel(model.name, model.source, model.context_window)
        for task in tasks:
            if task.uses_reference and is_reference:
                continue  # the reference is not compared with itself
            result = task.evaluate(model, config.settings[task.name], reference=reference)
            results[task.name][model.name] = result
            if is_reporting_rank():
                print(f"\n{task.name} — {model.name}\n{result.table()}", flush=True)
                result.save_json(assets / _slug(model.name) / f"{task.name}.json")
                files[task.name][model.name] = task.output_files(result, assets / _slug(model.name))
        del model
        gc.collect()  # the next model loads into the memory this one held
    report = output_dir / config.report
    if is_reporting_rank():
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(render_report(config, models, results, files, report.parent, command,
                                        time.perf_counter() - started))
    return report


def _resolve(entry: ModelEntry, index: int):
    """The model directory or checkpoint a suite entry names (megatron_ext.eval.models.resolve_eval_model)."""
    from megatron_ext.eval.models import resolve_eval_model

    return resolve_eval_model(entry.path, setting=f"models[{index}].path")


def _load(config: SuiteConfig, entry: ModelEntry, index: int, source):
    from megatron_ext.eval.models import load_eval_model

    return load_eval_model(source, name=entry.label, precision=config.precision,
                           tensor_parallel_size=config.tensor_parallel_size,
                           pipeline_parallel_size=config.pipeline_parallel_size,
                           context_parallel_size=config.context_parallel_size,
                           tokenizer_model=entry.tokenizer_model, setting=f"models[{index}].path")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


# --- the report -----------------------------------------------------------------------------


def render_report(config: SuiteConfig, models: dict, results: dict, files: dict, report_dir: Path,
                  command: str | None, seconds: float) -> str:
    """The Markdown report: models, summary, one section per task, and every setting."""
    lines = [f"# {config.title}", ""]
    if command:
        lines += ["Made with:", "", "```bash", command, "```", ""]
    lines += [f"Wall time {seconds / 60:.1f} min. Lengths are in tokens (prompts: answer included). In the summary, "
              "`*` marks the lengths beyond the trained window, shown only when all models share one window; in "
              "the needle heatmaps, a dashed line separates the lengths within the model's trained window from "
              "those beyond it.", "",
              markdown_table(["model", "loaded from", "trained window"],
                             [[name, f"`{model.source}`", model.context_window] for name, model in models.items()]),
              ""]
    lines += ["## Summary", "", summary_table(results, models), ""]
    for task in config.tasks:
        lines += TASKS[task].report_section(config.settings[task], results[task], files[task], report_dir) + [""]
    settings = yaml.safe_dump(config.to_dict(), sort_keys=False, width=110, default_flow_style=None)
    lines += ["## Settings", "", "```yaml", settings.rstrip(), "```", ""]
    return "\n".join(lines)


def summary_table(results: dict, models: dict) -> str:
    """Per length, per model, the columns each task gives (perplexity, passkey and needle accuracy, RULER mean)."""
    columns = []  # (header, {length: value})
    for name in models:
        for task in TASKS.values():  # registry order, whatever the order of the suite's tasks
            if name in results.get(task.name, {}):
                columns += [(f"{name} {label}", values)
                            for label, values in task.summary_columns(results[task.name][name]).items()]
    lengths = sorted({length for _, values in columns for length in values})
    windows = {model.context_window for model in models.values()}
    window = windows.pop() if len(windows) == 1 else None  # a star only when every model has the same window
    rows = [[f"{n}*" if window and n > window else str(n), *[values.get(n) for _, values in columns]]
            for n in lengths]
    return markdown_table(["length", *[header for header, _ in columns]], rows)
