"""Needle in a haystack: exact-match retrieval on a grid of context length x needle depth; heatmap PNG and CSV.

The needle is the passkey sentence (a number: exact match is unambiguous, no judge model needed);
the haystack the passkey filler, or any text. Each cell averages `trials` prompts with fresh keys.
"""

import csv
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megatron_ext.eval.distributed import check_prompt_groups
from megatron_ext.data.prompts import filler_tokens, passkey_prompt
from megatron_ext.eval.results import EvalResult, markdown_table, progress
from megatron_ext.eval.settings import NeedleSettings

CSV_COLUMNS = ["length", "depth", "accuracy", "token_accuracy", "trials"]


@dataclass
class NeedleCell:
    length: int
    depth: float
    accuracy: float
    token_accuracy: float
    trials: int


@dataclass
class NeedleResult(EvalResult):
    model: str
    context_window: int | None
    lengths: list[int]
    depths: list[float]
    cells: list[NeedleCell] = field(default_factory=list)
    task: str = "needle"

    def grid(self, metric: str = "accuracy") -> np.ndarray:
        """[depths, lengths] array of a cell metric."""
        values = {(c.length, c.depth): getattr(c, metric) for c in self.cells}
        return np.array([[values[(length, depth)] for length in self.lengths] for depth in self.depths])

    def average(self) -> float:
        return float(self.grid().mean())

    def table(self) -> str:
        grid = self.grid()
        rows = [[f"{depth:.0%}", *grid[i].tolist()] for i, depth in enumerate(self.depths)]
        rows.append(["mean", *grid.mean(0).tolist()])
        return markdown_table(["depth \\ length", *map(str, self.lengths)], rows) + \
            f"\n\nmean accuracy over the grid: {self.average():.3f}"

    def write_csv(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(CSV_COLUMNS)
            for c in self.cells:
                writer.writerow([c.length, c.depth, c.accuracy, c.token_accuracy, c.trials])
        return path

    def heatmap_figure(self):
        """matplotlib Figure: depth (rows, top = 0 %) x length (columns), colour = exact-match accuracy."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        grid = self.grid()
        figure, axes = plt.subplots(figsize=(1.0 + 0.9 * len(self.lengths), 1.2 + 0.4 * len(self.depths)))
        image = axes.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
        axes.set_xticks(range(len(self.lengths)), [str(n) for n in self.lengths])
        axes.set_yticks(range(len(self.depths)), [f"{d:.0%}" for d in self.depths])
        axes.set_xlabel("context length (tokens)")
        axes.set_ylabel("needle depth")
        for (i, j), value in np.ndenumerate(grid):
            axes.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7)
        if self.context_window:  # the trained window, between the columns that straddle it
            inside = sum(n <= self.context_window for n in self.lengths)
            if 0 < inside < len(self.lengths):
                axes.axvline(inside - 0.5, color="black", linestyle="--", linewidth=1)
        figure.colorbar(image, ax=axes, label="accuracy")
        axes.set_title(f"needle in a haystack: {self.model}", fontsize=9)
        figure.tight_layout()
        return figure

    def write_heatmap(self, path) -> Path:
        import matplotlib.pyplot as plt

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure = self.heatmap_figure()
        figure.savefig(path, dpi=120)
        plt.close(figure)
        return path


def evaluate_needle(model, settings: NeedleSettings) -> NeedleResult:
    """The grid's cells; a cell's prompts depend only on (seed, length, depth), data-parallel ranks split them."""
    settings.validate()
    cells, prompts = needle_prompts(model.tokenizer, settings)
    with progress(len(cells) * settings.trials, "needle") as bar:
        checks = check_prompt_groups(model, prompts, batch_size=settings.batch_size, number_answer=True, bar=bar)
    result = NeedleResult(model=model.name, context_window=model.context_window, lengths=list(settings.lengths),
                          depths=list(settings.depths))
    for (length, depth), cell_checks in zip(cells, checks):
        result.cells.append(NeedleCell(
            length=length, depth=depth, trials=len(cell_checks),
            accuracy=sum(c.correct for c in cell_checks) / len(cell_checks),
            token_accuracy=sum(c.token_accuracy for c in cell_checks) / len(cell_checks)))
    return result


def needle_prompts(tokenizer, settings: NeedleSettings) -> tuple[list, list[list]]:
    """The grid's (length, depth) cells and the prompts of each."""
    filler = filler_tokens(tokenizer, settings.filler)
    cells = [(length, depth) for length in settings.lengths for depth in settings.depths]
    prompts = [[passkey_prompt(tokenizer, length, key=key, depth=depth, filler=filler)
                for key in needle_keys(settings, length, depth)] for length, depth in cells]
    return cells, prompts


def needle_keys(settings: NeedleSettings, length: int, depth: float) -> list[int]:
    """The keys of one cell's prompts, keyed by (seed, length, depth)."""
    rng = random.Random(f"needle/{settings.seed}/{length}/{depth}")
    return [rng.randint(1, settings.key_max) for _ in range(settings.trials)]


# --- the task's hooks for megatron_ext/eval/registry.py ----------------------------------------

evaluate = evaluate_needle
prompts = needle_prompts


def output_files(result: NeedleResult, directory) -> list[Path]:
    directory = Path(directory)
    return [result.write_heatmap(directory / "needle_heatmap.png"), result.write_csv(directory / "needle.csv")]


def report_section(settings: NeedleSettings, results: dict, files: dict, report_dir: Path) -> list[str]:
    lines = ["## Needle in a haystack", "",
             f"Passkey needle, {settings.trials} prompts per cell; colour = exact-match accuracy.", ""]
    for name, result in results.items():
        png, csv_file = files[name]
        lines += [f"### {name}", "", f"![needle heatmap {name}]({png.relative_to(report_dir).as_posix()})", "",
                  f"Mean accuracy over the grid {result.average():.3f}; cells in "
                  f"[{csv_file.name}]({csv_file.relative_to(report_dir).as_posix()}).", ""]
    return lines


def summary_columns(result: NeedleResult) -> dict:
    """Accuracy per length, the mean over depths."""
    return {"needle": dict(zip(result.lengths, result.grid().mean(0).tolist()))}
