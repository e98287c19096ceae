"""The reproduction's report: the perplexity track's table (method x metric, mean over seeds with a 95% bootstrap
interval over seeds and documents/prompts), a PNG of perplexity against length per method, a passkey heatmap,
the retrieval track's section (retrieval_report.py), and the run's command, seeds, machine and phase times."""

import json
import os
import platform
import statistics
from pathlib import Path

from megatron_ext.eval.results import markdown_table


def machine() -> str:
    """CPU model, core count, memory, Python and torch versions, in one line."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        memory = f", {pages / 2**30:.0f} GiB RAM"
    except (ValueError, OSError, AttributeError):
        memory = ""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{cpu}, {cores} cores{memory}; {platform.system()}; Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def spread(values: list, digits: int | None = None) -> str:
    """'mean' for one value, 'mean ± sd' for several; '–' when there is none."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    digits = _digits(statistics.fmean(values)) if digits is None else digits
    text = f"{statistics.fmean(values):.{digits}f}"
    if len(values) > 1:
        text += f" ± {statistics.stdev(values):.{digits}f}"
    return text


def _digits(value: float) -> int:
    magnitude = abs(value)
    return 0 if magnitude >= 1000 else 1 if magnitude >= 100 else 2


def _by_method(results: dict) -> dict:
    """method -> [result per seed], methods in first-seen order; an untrained model (the same for every
    seed) once."""
    grouped = {}
    for (_, method), result in results.items():
        grouped.setdefault(method, []).append(result)
    return {method: runs if runs[0]["stages"] else runs[:1] for method, runs in grouped.items()}


def _metric(runs: list, key: str, length=None) -> list:
    """`key` of every run; per-length metrics (JSON objects keyed by the length as text) at `length`."""
    return [run[key] if length is None else run[key][str(length)] for run in runs]


def _eval_items(out: Path | None, run: dict, task: str, length: int):
    """The per-document (perplexity) or per-prompt (passkey) numbers a method's evaluation saved, or None."""
    if out is None:
        return None
    path = out / f"seed{run['seed']}" / run["method"] / "eval" / f"{task}.json"
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if task == "perplexity":
        row = next((r for r in saved["rows"] if r["length"] == length), None)
        return (row["document_nll"], row["document_tokens"]) if row and row.get("document_nll") else None
    trials = [float(t["correct"]) for t in saved["trials"] if t["length"] == length]
    return trials or None


def interval_cell(out, runs: list, key: str, length: int, resamples: int = 2000) -> str:
    """'mean [low, high]' from the saved per-item numbers of every run; 'mean ± sd' over runs without them."""
    from megatron_ext.repro.intervals import accuracy_interval, perplexity_interval

    task = "perplexity" if key == "perplexity" else "passkey"
    items = [_eval_items(out, run, task, length) for run in runs]
    if any(item is None for item in items):
        return spread(_metric(runs, key, length))
    if task == "perplexity":
        return perplexity_interval(items, resamples=resamples).text()
    return accuracy_interval(items, resamples=resamples).text()


def results_table(config, results: dict, out: Path | None = None) -> str:
    lengths = config.eval_lengths()
    headers = ["method", "extension s", "peak RSS MiB", "tokens"]
    headers += [f"PPL@{n}" for n in lengths] + [f"passkey@{n}" for n in lengths]
    headers += [f"entropy@{config.target_length}"]
    rows = []
    for method, runs in _by_method(results).items():
        trained = bool(runs[0]["stages"])
        row = [f"`{method}`", spread(_metric(runs, "seconds"), 0) if trained else "–",
               spread(_metric(runs, "peak_rss_mib"), 0) if trained else "–", f"{runs[0]['tokens']:,}"]
        row += [interval_cell(out, runs, "perplexity", n) for n in lengths]
        row += [interval_cell(out, runs, "passkey", n) for n in lengths]
        row += [spread(_metric(runs, "entropy"))]
        rows.append(row)
    return markdown_table(headers, rows)


def token_accuracy_table(config, results: dict) -> str:
    lengths = config.eval_lengths()
    rows = [[f"`{method}`", *[spread(_metric(runs, "passkey_token_accuracy", n)) for n in lengths]]
            for method, runs in _by_method(results).items()]
    return markdown_table(["method", *[f"key tokens right @{n}" for n in lengths]], rows)


def methods_table(results: dict) -> str:
    rows = []
    for method, runs in _by_method(results).items():
        run = runs[0]
        stages = "; ".join(f"{s['iterations']} it x {s['global_batch']} x {s['seq_length']}"
                           + (f" (PoSE ids < {s['pose']['target_length']})" if s["pose"] else "")
                           for s in run["stages"]) or "none"
        loss = spread([r["stages"][-1]["last_loss"] for r in runs]) if run["stages"] else "–"
        rows.append([f"`{method}`", run["description"], stages, loss])
    return markdown_table(["method", "what it does", "training (iterations x sequences x length)",
                           "last training loss"], rows)


def plot_perplexity(config, results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = config.eval_lengths()
    figure, axis = plt.subplots(figsize=(8, 5.5))
    markers = "osD^v<>pXh*P8"
    for index, (method, runs) in enumerate(_by_method(results).items()):
        means = [statistics.fmean(_metric(runs, "perplexity", n)) for n in lengths]
        axis.plot(lengths, means, "-" if index % 2 == 0 else "--", marker=markers[index % len(markers)],
                  color=plt.cm.tab20(index % 20), label=method)
    axis.axvline(config.base_length, color="grey", linestyle=":", linewidth=1)
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xticks(lengths, [str(n) for n in lengths])
    axis.set_xlabel("evaluation length (tokens); dotted: pretraining length")
    axis.set_ylabel("perplexity (log scale)")
    axis.set_title(f"Perplexity vs length after extending {config.base_length} -> {config.target_length}")
    axis.legend(fontsize=8, ncol=2)
    axis.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_passkey(config, results: dict, path: Path) -> Path:
    """Two heatmaps, method x length: exact-match accuracy and the share of key tokens predicted right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    lengths = config.eval_lengths()
    grouped = _by_method(results)
    figure, axes = plt.subplots(1, 2, figsize=(2.4 * len(lengths) + 3, 0.4 * len(grouped) + 1.8), sharey=True)
    panels = (("passkey", "exact match"), ("passkey_token_accuracy", "key tokens right (teacher-forced)"))
    for axis, (key, title) in zip(axes, panels):
        grid = np.array([[statistics.fmean(_metric(runs, key, n)) for n in lengths] for runs in grouped.values()])
        image = axis.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        axis.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        axis.set_yticks(range(len(grouped)), list(grouped))
        for (row, column), value in np.ndenumerate(grid):
            axis.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=8,
                      color="white" if value < 0.6 else "black")
        axis.set_xlabel("prompt length (tokens)")
        axis.set_title(title)
    figure.suptitle(f"Passkey retrieval, {config.eval.passkey_trials} prompts per cell")
    figure.colorbar(image, ax=axes, fraction=0.03)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path


def write_report(config, pretrain: dict | None, results: dict, retrieval: dict | None, out: Path, *, command: str,
                 seconds: float) -> Path:
    lines = [
        f"# Context extension: every method from one pretrained model ({', '.join(config.tracks)})",
        "",
        "Made with:", "", "```bash", command, "```", "",
        f"Machine: {machine()}. Wall time of this invocation: {seconds / 60:.1f} min (a rerun reuses finished "
        "phases; each phase's own time is in its table).",
        "",
    ]
    if pretrain is not None:
        lines += perplexity_section(config, pretrain, results, out)
    if retrieval is not None:
        from megatron_ext.repro.retrieval_report import retrieval_section

        lines += retrieval_section(config.retrieval, retrieval, out, out)
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def perplexity_section(config, pretrain: dict, results: dict, out: Path) -> list[str]:
    ppl_png = plot_perplexity(config, results, out / "ppl_vs_length.png")
    passkey_png = plot_passkey(config, results, out / "passkey_heatmap.png")
    seeds = ", ".join(str(s) for s in config.seeds)
    extension_seconds = sum(r["seconds"] for r in results.values())
    return [
        f"## Perplexity track: {config.base_length} -> {config.target_length}",
        "",
        f"Pretraining: {config.pretrain.iters} iterations x {config.pretrain.global_batch_size} sequences of "
        f"{config.base_length} tokens (seed {config.pretrain.seed}), loss {pretrain['first_loss']:.3f} -> "
        f"{pretrain['last_loss']:.3f}, {pretrain['seconds']:.0f} s. Extension seeds: {seeds} (data order and PoSE "
        f"draws; every seed starts from the same pretrained model). Every method gets {config.extend.iters} "
        f"optimizer steps of {config.extend.tokens_per_iter:,} tokens; the extensions took {extension_seconds:.0f} s "
        "of training in all.",
        "",
        f"Perplexity on {config.eval.perplexity_documents} standard-library test modules (not in the training data), "
        f"each cut to {max(config.eval_lengths())} tokens, sliding window with stride {config.base_length}; passkey: "
        f"exact-match accuracy of greedy decoding over {config.eval.passkey_trials} prompts per length (PoSE's "
        f"template, key in 1..50000, random depth); entropy: mean attention entropy (nats) of the answer tokens over "
        f"layers and heads at {config.target_length} tokens ({config.eval.attention_trials} prompts). "
        "Cells: mean over seeds [95% bootstrap interval over seeds and documents or prompts].",
        "",
        results_table(config, results, out),
        "",
        f"![perplexity vs length]({ppl_png.name})",
        "",
        f"![passkey heatmap]({passkey_png.name})",
        "",
        "Share of key tokens predicted right (teacher-forced), a softer view of the same passkey prompts:",
        "",
        token_accuracy_table(config, results),
        "",
        "### Methods",
        "",
        methods_table(results),
        "",
    ]
