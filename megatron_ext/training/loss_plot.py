"""The loss curves of a run as a PNG next to its metrics file: training loss per iteration and, where the run
validated (training.eval_interval), the validation loss. Reads only the metrics file (JSON lines); matplotlib
is optional (without it the plot is skipped with one log line). Imports no megatron.
"""

import json
import logging
from pathlib import Path

log = logging.getLogger("megatron_ext")


def loss_plot_path(metrics_file) -> Path:
    """runs/metrics.jsonl -> runs/metrics_loss.png"""
    path = Path(metrics_file)
    return path.with_name(f"{path.stem}_loss.png")


def read_losses(metrics_file) -> tuple[dict[int, float], dict[int, float]]:
    """(training loss, validation loss) by iteration; a resumed run's rows replace the earlier ones of the same
    iteration (the metrics file is appended on resume)."""
    train, valid = {}, {}
    for line in Path(metrics_file).read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if row.get("loss") is not None:
            train[row["iteration"]] = row["loss"]
        if row.get("valid_loss") is not None:
            valid[row["iteration"]] = row["valid_loss"]
    return train, valid


def plot_losses(metrics_file, path=None) -> Path | None:
    """Write the PNG (default: loss_plot_path); returns its path, or None when there is nothing to plot."""
    if not Path(metrics_file).is_file():
        return None
    train, valid = read_losses(metrics_file)
    if not train:
        return None
    try:
        import matplotlib
    except ImportError:
        log.info("megatron_ext: matplotlib is not installed; no loss plot written (pip install matplotlib)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path) if path is not None else loss_plot_path(metrics_file)
    figure, axis = plt.subplots(figsize=(8, 5))
    iterations = sorted(train)
    axis.plot(iterations, [train[i] for i in iterations], color="tab:blue", linewidth=1, label="training loss")
    if valid:
        points = sorted(valid)
        axis.plot(points, [valid[i] for i in points], "o-", color="tab:orange", label="validation loss")
    axis.set_xlabel("iteration")
    axis.set_ylabel("loss (nats per token)")
    axis.set_title(f"Loss curves of {Path(metrics_file).name}")
    axis.grid(True, alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    log.info(f"megatron_ext: loss curves written to {path}")
    return path
