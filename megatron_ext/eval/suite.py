"""`megatron-ext eval suite`: run a chosen set of evaluations on one or more models and write one Markdown report
(summary table, per-task tables, needle heatmaps, attention plots) plus every result as JSON.

The YAML maps onto SuiteConfig (every default lives in the task settings dataclasses); see
examples/configs/eval_tiny_harpe.yaml.
"""

import dataclasses
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from megatron_ext.eval.attention import evaluate_attention
from megatron_ext.eval.needle import evaluate_needle
from megatron_ext.eval.passkey import evaluate_passkey
from megatron_ext.eval.perplexity import evaluate_perplexity
from megatron_ext.eval.results import is_reporting_rank, markdown_table
from megatron_ext.eval.ruler import evaluate_ruler
from megatron_ext.eval.settings import (
    AttentionSettings,
    NeedleSettings,
    PasskeySettings,
    PerplexitySettings,
    RulerSettings,
)

TASKS = ("perplexity", "passkey", "needle", "ruler", "attention")


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
    attention_reference: str | None = None  # name of the model the others' attention is compared with
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    title: str = "Long-context evaluation"
    output_dir: str = "runs/eval"
    report: str = "eval_report.md"  # inside output_dir; pictures and JSON go to output_dir/<report stem>/
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    precision: str | None = None  # bf16 | fp32 | null: bf16 on GPU, fp32 on CPU
    perplexity: PerplexitySettings = field(default_factory=PerplexitySettings)
    passkey: PasskeySettings = field(default_factory=PasskeySettings)
    needle: NeedleSettings = field(default_factory=NeedleSettings)
    ruler: RulerSettings = field(default_factory=RulerSettings)
    attention: AttentionSettings = field(default_factory=AttentionSettings)

    def model_entries(self) -> list[ModelEntry]:
        from megatron_ext.training.config import from_dict

        return [from_dict(ModelEntry, raw, prefix=f"models[{i}].") for i, raw in enumerate(self.models)]

    def validate(self) -> None:
        entries = self.model_entries()
        if not entries:
            raise ValueError("models is empty: list at least one {path: ..., name: ...}")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"tasks: unknown {unknown}; choose from {list(TASKS)}")
        names = [entry.label for entry in entries]
        if len(set(names)) != len(names):
            raise ValueError(f"model names {names} repeat: give each model a distinct name")
        if self.attention_reference is not None and self.attention_reference not in names:
            raise ValueError(f"attention_reference ({self.attention_reference!r}) is not one of the models {names}")
        if self.precision not in (None, "bf16", "fp32"):
            raise ValueError(f"precision ({self.precision!r}) must be bf16, fp32 or null")
        for task in self.tasks:
            getattr(self, task).validate()


def load_suite_config(path, overrides: list[str] = ()) -> SuiteConfig:
    """YAML + `key.sub=value` overrides -> a validated SuiteConfig (errors name the key)."""
    from megatron_ext.training.config import read_config

    config = read_config(path, SuiteConfig, overrides, example="examples/configs/eval_*.yaml",
                         missing=FileNotFoundError)
    config.validate()
    return config


def run_suite(config: SuiteConfig, command: str | None = None) -> Path:
    """Evaluate every model on every task, write JSON, pictures and the report; return the report's path."""
    from megatron_ext.eval.models import load_eval_model

    started = time.perf_counter()
    output_dir = Path(config.output_dir)
    assets = output_dir / Path(config.report).stem
    models = {}
    for entry in config.model_entries():
        model = load_eval_model(entry.path, name=entry.label, precision=config.precision,
                                tensor_parallel_size=config.tensor_parallel_size,
                                pipeline_parallel_size=config.pipeline_parallel_size,
                                tokenizer_model=entry.tokenizer_model)
        models[model.name] = model
    results = {task: {} for task in config.tasks}  # task -> model name -> result
    for name, model in models.items():
        for task in config.tasks:
            if task == "attention":
                if name == config.attention_reference:
                    continue
                reference = models.get(config.attention_reference)
                result = evaluate_attention(model, config.attention, reference=reference)
            else:
                result = EVALUATE[task](model, getattr(config, task))
            results[task][name] = result
            if is_reporting_rank():
                print(f"\n{task} — {name}\n{result.table()}", flush=True)
                result.save_json(assets / _slug(name) / f"{task}.json")
    report = output_dir / config.report
    if is_reporting_rank():
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(render_report(config, models, results, assets, report.parent, command,
                                        time.perf_counter() - started))
    return report


EVALUATE = {"perplexity": evaluate_perplexity, "passkey": evaluate_passkey, "needle": evaluate_needle,
            "ruler": evaluate_ruler}


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


# --- the report -----------------------------------------------------------------------------


def render_report(config: SuiteConfig, models: dict, results: dict, assets: Path, report_dir: Path,
                  command: str | None, seconds: float) -> str:
    """The Markdown report; writes the needle heatmaps/CSVs and attention plots under `assets`."""
    lines = [f"# {config.title}", ""]
    if command:
        lines += ["Made with:", "", "```bash", command, "```", ""]
    lines += [f"Wall time {seconds / 60:.1f} min. Lengths are in tokens (prompts: answer included); the dashed "
              "line in the heatmaps, and `*` in the summary when all models share one, mark the trained window.", "",
              markdown_table(["model", "loaded from", "trained window"],
                             [[name, f"`{model.source}`", model.context_window] for name, model in models.items()]),
              ""]
    lines += ["## Summary", "", summary_table(results, models), ""]
    sections = dict(perplexity=_perplexity_section, passkey=_passkey_section, needle=_needle_section,
                    ruler=_ruler_section, attention=_attention_section)
    for task in config.tasks:
        lines += sections[task](config, results[task], models, assets, report_dir) + [""]
    settings = yaml.safe_dump(dataclasses.asdict(config), sort_keys=False, width=110, default_flow_style=None)
    lines += ["## Settings", "", "```yaml", settings.rstrip(), "```", ""]
    return "\n".join(lines)


def summary_table(results: dict, models: dict) -> str:
    """Per length: perplexity, passkey accuracy, needle accuracy (mean over depths), RULER mean, per model."""
    columns = []  # (header, {length: value})
    for name in models:
        if name in results.get("perplexity", {}):
            columns.append((f"{name} PPL", {r.length: r.perplexity for r in results["perplexity"][name].rows}))
        if name in results.get("passkey", {}):
            columns.append((f"{name} passkey", {r.length: r.accuracy for r in results["passkey"][name].rows}))
        if name in results.get("needle", {}):
            needle = results["needle"][name]
            columns.append((f"{name} needle", dict(zip(needle.lengths, needle.grid().mean(0).tolist()))))
        if name in results.get("ruler", {}):
            ruler = results["ruler"][name]
            columns.append((f"{name} RULER", {length: _mean([r.score for r in ruler.rows if r.length == length])
                                              for length in {r.length for r in ruler.rows}}))
    lengths = sorted({length for _, values in columns for length in values})
    windows = {m.context_window for m in models.values()}
    window = windows.pop() if len(windows) == 1 else None  # a star only when every model has the same window
    rows = [[f"{n}*" if window and n > window else str(n), *[values.get(n) for _, values in columns]]
            for n in lengths]
    return markdown_table(["length", *[header for header, _ in columns]], rows)


def _mean(values):
    return sum(values) / len(values)


def _per_length_table(results: dict, models: dict, value) -> str:
    lengths = sorted({row.length for result in results.values() for row in result.rows})
    rows = []
    for length in lengths:
        rows.append([length, *[next((value(r) for r in results[name].rows if r.length == length), None)
                               for name in results]])
    return markdown_table(["length", *results], rows)


def _perplexity_section(config, results, models, assets, report_dir) -> list[str]:
    s = config.perplexity
    first = next(iter(results.values()))
    return ["## Sliding-window perplexity", "",
            f"Data: {', '.join(f'`{d}`' for d in s.data)}; {first.documents} documents"
            f"{' (truncated to one window)' if s.truncate else ''}, stride {s.stride} (capped at the window), "
            f"BOS prepended. Tokens scored per length: {', '.join(str(r.tokens) for r in first.rows)}.", "",
            _per_length_table(results, models, lambda r: r.perplexity)]


def _passkey_section(config, results, models, assets, report_dir) -> list[str]:
    s = config.passkey
    return ["## Passkey retrieval", "",
            f"PoSE template, key uniform in 1..{s.key_max}, random depth, {s.trials} prompts per length; "
            "exact match of greedy decoding (one teacher-forced pass), and in brackets the share of key tokens "
            "predicted right given the true prefix.", "",
            _per_length_table(results, models, lambda r: f"{r.accuracy:.2f} ({r.token_accuracy:.2f})")]


def _needle_section(config, results, models, assets, report_dir) -> list[str]:
    s = config.needle
    lines = ["## Needle in a haystack", "",
             f"Passkey needle, {s.trials} prompts per cell; colour = exact-match accuracy.", ""]
    for name, result in results.items():
        png = result.write_heatmap(assets / _slug(name) / "needle_heatmap.png")
        csv = result.write_csv(assets / _slug(name) / "needle.csv")
        lines += [f"### {name}", "", f"![needle heatmap {name}]({png.relative_to(report_dir).as_posix()})", "",
                  f"Mean accuracy over the grid {result.average():.3f}; cells in "
                  f"[{csv.name}]({csv.relative_to(report_dir).as_posix()}).", ""]
    return lines


def _ruler_section(config, results, models, assets, report_dir) -> list[str]:
    s = config.ruler
    lines = ["## RULER-style tasks", "",
             f"Generated data, {s.trials} prompts per task and length: mk_niah ({s.num_keys} keys, exact match), "
             f"mv_niah ({s.num_values} values, share recalled), vt ({s.num_hops} hops, share of variables).", ""]
    for name, result in results.items():
        lines += [f"### {name}", "", result.table(), ""]
    return lines


def _attention_section(config, results, models, assets, report_dir) -> list[str]:
    s = config.attention
    lines = ["## Attention entropy and JS divergence", "",
             f"On the answer tokens of {s.trials} passkey prompts per length; means over heads, the head with "
             "the largest value in brackets. Plots: one per layer, per head.", ""]
    for name, result in results.items():
        lines += [f"### {name}" + (f" vs {result.reference}" if result.reference else ""), "", result.table(), ""]
        for png in result.write_plots(assets / _slug(name)):
            lines += [f"![{png.stem}]({png.relative_to(report_dir).as_posix()})"]
        lines += [""]
    return lines
