"""The `lm_eval` task of the registry: lm-evaluation-harness tasks on one model, its table, its files and its
section of the suite's report (models side by side, each compared with the first).

The harness runs as `lm_eval.simple_evaluate` runs it (its seeds, few-shot rule and `evaluate`), on tasks built
offline before any model loads (`prepare`), without simple_evaluate's report of the environment (git, pip,
GPUs). lm-eval, torch and megatron are imported when a run starts, so the registry can import this module
without them.
"""

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from megatron_ext.eval.harness.settings import LM_EVAL_VERSION, LmEvalSettings, require_lm_eval, require_vllm
from megatron_ext.eval.results import EvalResult, markdown_table

log = logging.getLogger("megatron_ext")

RESULTS_FILE = "lm_eval_results.json"  # lm-eval's own JSON, as `lm-eval --output_path` writes it


@dataclass
class LmEvalRow:
    task: str  # a task or a group (its alias, as lm-eval's table shows it)
    metric: str
    filter: str  # lm-eval's filter the metric was read after ("none": the raw responses)
    num_fewshot: int | None
    value: float | None
    stderr: float | None  # None where lm-eval gives none (bootstrap off, one sample)


@dataclass
class LmEvalResult(EvalResult):
    model: str
    context_window: int | None
    max_length: int  # the longest sequence the model was given
    lm_eval_version: str
    rows: list[LmEvalRow] = field(default_factory=list)
    harness: dict = field(default_factory=dict, repr=False)  # what lm-eval's evaluate returned, JSON-safe
    task: str = "lm_eval"

    def table(self) -> str:
        return markdown_table(["task", "filter", "n-shot", "metric", "value", "stderr"],
                              [[r.task, r.filter, r.num_fewshot, r.metric, r.value, r.stderr] for r in self.rows])

    def to_json(self) -> dict:
        """Our summary; lm-eval's own JSON goes to its own file (`output_files`)."""
        summary = super().to_json()
        del summary["harness"]
        return summary

    def value(self, task: str, metric: str, filter: str = "none") -> float | None:
        return next((r.value for r in self.rows if (r.task, r.metric, r.filter) == (task, metric, filter)), None)


def prepare(settings: LmEvalSettings) -> None:
    """Before any model loads: lm-eval is installed, every task name is known, its data is on this machine."""
    from megatron_ext.eval.harness.tasks import load_tasks

    version = require_lm_eval()
    if settings.backend == "vllm":
        require_vllm()
    if version != LM_EVAL_VERSION:
        log.warning(f"megatron_ext: lm-eval {version} is installed; megatron-ext is tested with {LM_EVAL_VERSION}")
    load_tasks(settings.tasks, settings.metadata)


def evaluate_lm_eval(model, settings: LmEvalSettings) -> LmEvalResult:
    """The settings' lm-eval tasks on `model` (an EvalModel), through EvalModelLM, or with backend 'vllm' through
    VllmLM (the same requests and tokens, scored by a vLLM engine on the model's export)."""
    settings.validate()
    sizes = dict(max_length=settings.max_length, batch_size=settings.batch_size,
                 max_gen_tokens=settings.max_gen_tokens)
    if settings.backend == "vllm":
        from megatron_ext.eval.harness.vllm_lm import VllmLM

        lm = VllmLM(model, **sizes)
        try:
            harness = run_harness(lm, settings)
        finally:
            lm.close()
    else:
        from megatron_ext.eval.harness.lm import EvalModelLM

        lm = EvalModelLM(model, **sizes)
        harness = run_harness(lm, settings)
    return LmEvalResult(model=model.name, context_window=model.context_window, max_length=lm.max_length,
                        lm_eval_version=require_lm_eval(), rows=rows_of(harness), harness=harness)


def run_harness(lm, settings: LmEvalSettings) -> dict:
    """lm-eval's `evaluate` of an lm-eval LM (ours, or lm-eval's own `hf` in one process) on the settings' tasks,
    seeded and with the few-shot counts as `lm_eval.simple_evaluate` sets them; JSON-safe, on every rank."""
    import random

    import numpy as np
    import torch
    from lm_eval import evaluator
    from lm_eval.defaults import DEFAULT_OTHER_SEED, DEFAULT_RANDOM_SEED
    from lm_eval.utils import handle_non_serializable

    from megatron_ext.eval.harness.tasks import load_tasks

    loaded = load_tasks(settings.tasks, settings.metadata)
    random.seed(DEFAULT_RANDOM_SEED)
    np.random.seed(DEFAULT_OTHER_SEED)
    torch.manual_seed(DEFAULT_OTHER_SEED)
    for task in loaded["tasks"].values():
        if settings.num_fewshot is not None and task.get_config("num_fewshot") != 0:  # 0 in a task's YAML stays
            task.set_config(key="num_fewshot", value=settings.num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)
    results = evaluator.evaluate(lm=lm, task_dict=loaded, limit=settings.limit, log_samples=settings.log_samples)
    if lm.world_size > 1:  # lm-eval returns the results on its rank 0 only
        results = lm.from_first_replica(results)
    results["config"] = {"limit": settings.limit, "batch_size": settings.batch_size, "max_length": lm.max_length,
                         "random_seed": DEFAULT_RANDOM_SEED, "numpy_seed": DEFAULT_OTHER_SEED,
                         "torch_seed": DEFAULT_OTHER_SEED, "fewshot_seed": DEFAULT_OTHER_SEED}
    return json.loads(json.dumps(results, default=handle_non_serializable))


def rows_of(harness: dict) -> list[LmEvalRow]:
    """One row per task (or group) and metric, in lm-eval's order, as its own results table lists them."""
    rows = []
    for name, metrics in harness["results"].items():
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or metric.endswith("_stderr"):
                continue  # alias, sample counts; stderrs go with their metric
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            rows.append(LmEvalRow(task=metrics.get("alias", name).strip(), metric=metric, filter=filter_name,
                                  num_fewshot=harness.get("n-shot", {}).get(name),
                                  value=value if isinstance(value, (int, float)) else None,
                                  stderr=stderr if isinstance(stderr, (int, float)) else None))
    return rows


# --- the task's hooks for megatron_ext/eval/registry.py ----------------------------------------

evaluate = evaluate_lm_eval


def output_files(result: LmEvalResult, directory) -> list[Path]:
    """lm-eval's JSON (results, configs, versions, n-shot, ...) and, with log_samples, samples_<task>.jsonl."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    harness = {key: value for key, value in result.harness.items() if key != "samples"}
    written = [directory / RESULTS_FILE]
    written[0].write_text(json.dumps(harness, indent=2, ensure_ascii=False) + "\n")
    for task, samples in result.harness.get("samples", {}).items():
        path = directory / f"samples_{task}.jsonl"
        path.write_text("".join(json.dumps(sample, ensure_ascii=False) + "\n" for sample in samples))
        written.append(path)
    return written


def report_section(settings: LmEvalSettings, results: dict, files: dict, report_dir) -> list[str]:
    """Every metric, one column per model, and each later model's difference to the first (the base)."""
    names = list(results)
    keys = list(dict.fromkeys((r.task, r.metric, r.filter) for result in results.values() for r in result.rows))
    headers = ["task", "metric", *names, *[f"{name} − {names[0]}" for name in names[1:]]]
    rows = []
    for task, metric, filter_name in keys:
        values = [result.value(task, metric, filter_name) for result in results.values()]
        base = values[0]
        rows.append([task, metric if filter_name == "none" else f"{metric} ({filter_name})", *values,
                     *[None if v is None or base is None else v - base for v in values[1:]]])
    version = next(iter(results.values())).lm_eval_version
    longest = ", ".join(f"{name} {result.max_length}" for name, result in results.items())
    lines = ["## lm-evaluation-harness", "",
             f"EleutherAI lm-evaluation-harness {version}, tasks {', '.join(settings.tasks)}; "
             f"{'all examples' if settings.limit is None else f'the first {settings.limit} examples per task'}; "
             f"longest sequence in tokens: {longest} (the trained window unless set). On short-context tasks a "
             "drop after extension is a regression.", "",
             markdown_table(headers, rows), ""]
    links = [f"[{name}]({Path(path).relative_to(report_dir).as_posix()})" for name, paths in files.items()
             for path in paths[:1]]
    if links:
        lines += ["lm-eval's own JSON: " + ", ".join(links) + ".", ""]
    return lines
