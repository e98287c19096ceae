"""A toy evaluation task defined outside megatron_ext, as a plug-in would be: its settings, its implementation
(the hooks registry.py names) and its EvalTask. tests/test_eval_registry.py registers it. No model runs: the
score of a length is the share of it inside the model's trained window, plus a bonus."""

from dataclasses import dataclass, field
from pathlib import Path

from megatron_ext.eval.registry import EvalTask
from megatron_ext.eval.results import EvalResult, markdown_table
from megatron_ext.eval.settings import EvalSettingsError


@dataclass
class ToySettings:
    lengths: list[int] = field(default_factory=lambda: [64, 256], metadata=dict(help="lengths scored"))
    bonus: float = field(default=0.0, metadata=dict(help="added to every score"))

    def validate(self) -> None:
        if not self.lengths or min(self.lengths) < 1:
            raise EvalSettingsError(f"toy.lengths ({self.lengths}) must be non-empty lengths >= 1")


@dataclass
class ToyRow:
    length: int
    score: float


@dataclass
class ToyResult(EvalResult):
    model: str
    reference: str | None
    rows: list[ToyRow] = field(default_factory=list)
    task: str = "toy"

    def table(self) -> str:
        return markdown_table(["length", "score"], [[r.length, r.score] for r in self.rows])


def evaluate(model, settings: ToySettings, reference=None) -> ToyResult:
    settings.validate()
    rows = [ToyRow(length, min(1.0, model.context_window / length) + settings.bonus) for length in settings.lengths]
    return ToyResult(model=model.name, reference=reference.name if reference else None, rows=rows)


def output_files(result: ToyResult, directory) -> list[Path]:
    path = Path(directory) / "toy.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{result.model} vs {result.reference}\n")
    return [path]


def report_section(settings: ToySettings, results: dict, files: dict, report_dir: Path) -> list[str]:
    lines = ["## Toy task", "", f"Bonus {settings.bonus}.", ""]
    for name, result in results.items():
        lines += [f"### {name} vs {result.reference}", "", result.table(), "",
                  f"[notes]({files[name][0].relative_to(report_dir).as_posix()})", ""]
    return lines


def summary_columns(result: ToyResult) -> dict:
    return {"toy": {r.length: r.score for r in result.rows}}


TOY = EvalTask("toy", "a toy task: the share of each length inside the trained window", ToySettings, __name__,
               uses_reference=True)
