"""Needle-in-a-haystack grid: the heatmap exists with the grid's shape and values, and the CSV holds the same cells."""

import csv

import numpy as np
import pytest

from megatron_ext.eval.needle import NeedleCell, NeedleResult, evaluate_needle
from megatron_ext.eval.settings import NeedleSettings

pytest_plugins = ["test_eval_support"]

LENGTHS, DEPTHS = [1024, 2048, 4096], [0.0, 0.25, 0.5, 1.0]


def known_result() -> NeedleResult:
    """Cell (length, depth) holds accuracy depth * length / 4096: every cell a different, known value."""
    cells = [NeedleCell(length=n, depth=d, accuracy=d * n / 4096, token_accuracy=1.0, trials=4)
             for n in LENGTHS for d in DEPTHS]
    return NeedleResult(model="known", context_window=2048, lengths=LENGTHS, depths=DEPTHS, cells=cells)


def test_heatmap_shows_the_grid_and_the_csv_holds_the_same_cells(tmp_path):
    import matplotlib.image
    import matplotlib.pyplot as plt

    result = known_result()
    expected = np.array([[d * n / 4096 for n in LENGTHS] for d in DEPTHS])  # rows: depths, columns: lengths
    figure = result.heatmap_figure()
    axes = figure.axes[0]
    np.testing.assert_array_equal(axes.images[0].get_array(), expected)
    assert [t.get_text() for t in axes.get_xticklabels()] == ["1024", "2048", "4096"]
    assert [t.get_text() for t in axes.get_yticklabels()] == ["0%", "25%", "50%", "100%"]
    plt.close(figure)

    png = result.write_heatmap(tmp_path / "heatmap.png")
    assert matplotlib.image.imread(png).ndim == 3  # a readable RGB(A) image
    with result.write_csv(tmp_path / "needle.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(LENGTHS) * len(DEPTHS)
    from_csv = {(int(r["length"]), float(r["depth"])): float(r["accuracy"]) for r in rows}
    np.testing.assert_array_equal([[from_csv[(n, d)] for n in LENGTHS] for d in DEPTHS], expected)
    assert "| 100% | 0.25 | 0.5 | 1 |" in result.table()


def test_the_grid_has_one_cell_per_length_and_depth(tiny_llama, tmp_path):
    settings = NeedleSettings(lengths=[200, 240], depths=[0.0, 0.5, 1.0], trials=2)
    result = evaluate_needle(tiny_llama, settings)
    assert result.grid().shape == (3, 2)
    assert [(c.length, c.depth, c.trials) for c in result.cells] == [
        (n, d, 2) for n in settings.lengths for d in settings.depths]
    assert all(0.0 <= c.accuracy <= c.token_accuracy <= 1.0 for c in result.cells)
    assert result.write_heatmap(tmp_path / "h.png").stat().st_size > 1000


def test_depths_outside_zero_to_one_are_refused():
    with pytest.raises(ValueError, match=r"needle.depths .* must lie in \[0, 1\]"):
        NeedleSettings(depths=[0.5, 50]).validate()
