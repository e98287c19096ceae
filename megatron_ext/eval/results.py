"""What every evaluation returns: a dataclass that prints as a table and saves as JSON; plus the progress bar.

Standard library, numpy and tqdm only.
"""

import dataclasses
import json
import math
from pathlib import Path


class EvalResult:
    """Mixin for the result dataclasses: `.table()` (Markdown), `.to_json()`, `.save_json(path)`."""

    task: str  # each result dataclass has it as its last field, so the JSON names its task

    def table(self) -> str:  # each task says which columns matter
        raise NotImplementedError

    def to_json(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def save_json(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        return path


def _plain(value):
    """JSON-safe copy: NaN/inf become null (JSON has neither), tuples become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A GitHub Markdown table; floats with 4 significant digits, None as '-'."""
    def cell(value):
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def per_length_table(results: dict, value) -> str:
    """One row per length, one column per model: `value(row)` of each result's row at that length."""
    lengths = sorted({row.length for result in results.values() for row in result.rows})
    rows = [[length, *[next((value(r) for r in result.rows if r.length == length), None)
                       for result in results.values()]]
            for length in lengths]
    return markdown_table(["length", *results], rows)


PROGRESS_BARS = {"enabled": True}  # a caller with its own progress lines (megatron-ext repro) turns the bars off


def progress(total: int, description: str, enabled: bool = True):
    """A tqdm bar on the reporting rank (rank 0); a silent stand-in elsewhere."""
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="prompt", dynamic_ncols=True, leave=False,
                disable=not (enabled and PROGRESS_BARS["enabled"] and is_reporting_rank()))


def is_reporting_rank() -> bool:
    """Rank 0 prints and writes files; every rank ends with the same numbers (data-parallel ranks gather the
    trials they split, megatron_ext/eval/distributed.py)."""
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0
