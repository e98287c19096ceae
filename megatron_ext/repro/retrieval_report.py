"""The retrieval track's part of the report: the passkey table with 95% bootstrap intervals (over pretraining
seeds and prompts), needle heatmaps (depth x length) per method, the 8L accuracy chart and the paired
comparisons behind the papers' claims."""

import statistics
from pathlib import Path

from megatron_ext.eval.results import markdown_table
from megatron_ext.repro.intervals import accuracy_interval, difference_interval

# (claim, first method, second method, budget suffix of the first run or None for the same budget)
CLAIMS = [
    ("a", "harpe_uniform", "abf_multi", "single-stage HARPE (uniform bases) vs multi-stage ABF"),
    ("a", "harpe_peak_valley", "abf_multi", "single-stage HARPE (peak-valley bases) vs multi-stage ABF"),
    ("b", "pose", "vanilla", "PoSE vs full-length fine-tuning, pretrained RoPE"),
    ("b", "pose_linear", "pi", "PoSE + PI vs full-length PI"),
    ("b", "pose_yarn", "yarn", "PoSE + YaRN vs full-length YaRN"),
    ("c", "harpe_pose", "pose_yarn", "HARPE + PoSE vs PoSE + YaRN"),
    ("c", "harpe_pose", "harpe_uniform", "HARPE + PoSE vs full-length HARPE"),
]


def _runs(retrieval: dict) -> dict:
    """(method, budget) -> results ordered by seed; rows in first-seen order."""
    grouped = {}
    for result in retrieval["results"]:
        grouped.setdefault((result["method"], result["budget"]), []).append(result)
    return {key: sorted(runs, key=lambda r: r["seed"]) for key, runs in grouped.items()}


def _outcomes(runs: list, length: int, key: str = "correct") -> list[list[float]]:
    return [[float(t[key]) for t in run["trials"][str(length)]] for run in runs]


def _budget_label(track, budget: str) -> str:
    if budget == "none":
        return "–"
    steps = track.extend.budgets.get(budget)
    if steps is not None:
        return f"{budget} ({steps} steps)"
    return budget.replace("_", " ")


def retrieval_table(track, retrieval: dict) -> str:
    lengths = track.eval_lengths()
    resamples = track.eval.bootstrap
    headers = ["method", "budget", "train s", "tokens"] + [f"passkey@{n}" for n in lengths]
    rows = []
    for (method, budget), runs in _runs(retrieval).items():
        row = [f"`{method}`", _budget_label(track, budget),
               f"{statistics.fmean(r['seconds'] for r in runs):.0f}" if budget != "none" else "–",
               f"{runs[0]['tokens']:,}"]
        row += [accuracy_interval(_outcomes(runs, n), resamples=resamples).text() for n in lengths]
        rows.append(row)
    return markdown_table(headers, rows)


def pretraining_table(track, retrieval: dict) -> str:
    rows = [[seed, s.get("iterations", track.pretrain.iters), f"{s['seconds']:.0f}",
             f"{s['first_loss']:.3f} -> {s['last_loss']:.3f}",
             " -> ".join(f"{c:.3f}" for c in s.get("checks", [s["check_accuracy"]])) + f" ({s['check_trials']} prompts)"]
            for seed, s in sorted(retrieval["pretrain"].items(), key=lambda item: int(item[0]))]
    rows += [[f"{seed} (left out: below {track.min_accuracy:g})", s.get("iterations", track.pretrain.iters),
              f"{s['seconds']:.0f}", f"{s['first_loss']:.3f} -> {s['last_loss']:.3f}",
              " -> ".join(f"{c:.3f}" for c in s.get("checks", [s["check_accuracy"]])) + f" ({s['check_trials']} prompts)"]
             for seed, s in sorted(retrieval.get("failed", {}).items(), key=lambda item: int(item[0]))]
    return markdown_table(["seed", "iterations", "pretraining s", "answer loss",
                           f"passkey exact match @{track.base_length} (each check)"], rows)


def claims_table(track, retrieval: dict) -> tuple[str, list[dict]]:
    """Paired differences at the target length per claim and budget; the rows and the raw findings."""
    grouped, longest = _runs(retrieval), track.target_length
    findings, rows = [], []
    budgets = list(track.extend.budgets)
    for claim, first, second, text in CLAIMS:
        for budget in budgets:
            for first_budget in (budget, f"{budget}_equal_tokens"):
                # equal tokens against equal tokens where the second method has such a run too
                second_budget = first_budget if (second, first_budget) in grouped else budget
                a, b = grouped.get((first, first_budget)), grouped.get((second, second_budget))
                if not a or not b or [r["seed"] for r in a] != [r["seed"] for r in b]:
                    continue
                difference = difference_interval(_outcomes(a, longest), _outcomes(b, longest),
                                                 resamples=track.eval.bootstrap)
                verdict = ("first better" if difference.low > 0 else "second better" if difference.high < 0
                           else "not resolved")
                label = _budget_label(track, first_budget)
                findings.append(dict(claim=claim, first=first, second=second, budget=first_budget,
                                     second_budget=second_budget, text=text,
                                     difference=difference, verdict=verdict))
                rows.append([f"({claim}) {text}", label if first_budget == second_budget else
                             f"{label} vs {_budget_label(track, second_budget)}",
                             f"`{first}` {accuracy_interval(_outcomes(a, longest)).mean:.2f}",
                             f"`{second}` {accuracy_interval(_outcomes(b, longest)).mean:.2f}",
                             difference.text(), verdict])
    headers = ["claim", "budget", "first", "second", f"difference @{longest} [95% CI]", "reading"]
    return markdown_table(headers, rows), findings


def depth_grid(track, runs: list, length: int) -> list[float]:
    """Exact match per depth bin at `length`, pooled over seeds."""
    bins = track.eval.depth_bins
    hits, counts = [0] * bins, [0] * bins
    for run in runs:
        for trial in run["trials"][str(length)]:
            index = min(int(trial["depth"] * bins), bins - 1)
            hits[index] += trial["correct"]
            counts[index] += 1
    return [h / c if c else float("nan") for h, c in zip(hits, counts)]


def plot_needles(track, retrieval: dict, budget: str, path: Path) -> Path:
    """One depth x length heatmap per method at `budget` (the pretrained model included), in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    lengths, bins = track.eval_lengths(), track.eval.depth_bins
    panels = [(key, runs) for key, runs in _runs(retrieval).items() if key[1] in (budget, "none")]
    columns = 4
    rows = (len(panels) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(3.1 * columns, 2.5 * rows + 0.6), squeeze=False)
    for axis in axes.flat[len(panels):]:
        axis.axis("off")
    image = None
    for axis, ((method, _), runs) in zip(axes.flat, panels):
        grid = np.array([depth_grid(track, runs, n) for n in lengths]).T  # [depth bins, lengths]
        image = axis.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        axis.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        axis.set_yticks(range(bins), [f"{(i + 0.5) / bins:.0%}" for i in range(bins)], fontsize=7)
        for (i, j), value in np.ndenumerate(grid):
            axis.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6)
        axis.axvline(0.5, color="black", linestyle="--", linewidth=0.8)  # right of it: beyond the pretrained L
        axis.set_title(method, fontsize=9)
    figure.suptitle(f"Needle (passkey) exact match by depth (rows) and length (columns), budget "
                    f"{_budget_label(track, budget)}; {len(track.seeds)} seeds pooled", fontsize=10)
    if image is not None:
        figure.colorbar(image, ax=axes, fraction=0.02)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def plot_longest(track, retrieval: dict, path: Path) -> Path:
    """Exact match at the target length per method and budget, with the 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped, longest = _runs(retrieval), track.target_length
    methods = list(dict.fromkeys(method for method, _ in grouped))
    budgets = list(dict.fromkeys(budget for _, budget in grouped if budget != "none"))
    figure, axis = plt.subplots(figsize=(max(8.0, 0.8 * len(methods) + 2), 4.5))
    width = 0.8 / max(1, len(budgets))
    for index, budget in enumerate(budgets):
        xs, means, errors = [], [], [[], []]
        for position, method in enumerate(methods):
            runs = grouped.get((method, budget)) or grouped.get((method, "none") if index == 0 else (None, None))
            if not runs:
                continue
            interval = accuracy_interval(_outcomes(runs, longest), resamples=track.eval.bootstrap)
            xs.append(position + (index - (len(budgets) - 1) / 2) * width)
            means.append(interval.mean)
            errors[0].append(interval.mean - interval.low)
            errors[1].append(interval.high - interval.mean)
        axis.bar(xs, means, width, yerr=errors, capsize=2, label=_budget_label(track, budget))
    axis.set_xticks(range(len(methods)), methods, rotation=35, ha="right", fontsize=8)
    axis.set_ylim(0, 1.05)
    axis.set_ylabel(f"passkey exact match @{longest}")
    axis.set_title(f"Retrieval at {track.scale}L = {longest} after extension (mean over seeds, 95% bootstrap CI)")
    axis.legend(fontsize=8)
    axis.grid(True, axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def retrieval_section(track, retrieval: dict, out: Path, report_dir: Path) -> list[str]:
    budgets = list(track.extend.budgets)
    pictures = [plot_needles(track, retrieval, budget, out / f"retrieval_needle_{budget}.png") for budget in budgets]
    longest_png = plot_longest(track, retrieval, out / "retrieval_longest.png")
    claims, _ = claims_table(track, retrieval)
    e = track.extend
    lines = [
        "## Retrieval track",
        "",
        f"Pretraining at L = {track.base_length} on passkey prompts of the evaluation's template (one prompt per "
        f"sample, loss on the answer only), {track.pretrain.iters} iterations x {track.pretrain.global_batch_size} "
        f"prompts, seeds {', '.join(map(str, track.seeds))} (at most {track.max_failed_seeds} may be left out); "
        f"every pretrained model must reach exact match >= "
        f"{track.min_accuracy:g} at L on {track.check_trials} held-out prompts before any extension (a seed below it "
        f"continues for {track.pretrain.extra_iters} iterations at lr {track.pretrain.min_lr:g}, at most "
        f"{track.pretrain.max_extra_rounds} times):",
        "",
        pretraining_table(track, retrieval),
        "",
        f"Extension to {track.scale}L = {track.target_length} from each pretrained model, every method at "
        + ", ".join(f"{name} = {steps} optimizer steps" for name, steps in e.budgets.items())
        + f" of {e.sequences_per_iter} prompts (at the stage's length; PoSE at L with position ids up to "
        f"{track.target_length}), lr {e.lr:g}; PoSE-family methods also at the largest budget's tokens "
        f"({track.scale}x its steps). Evaluation: passkey exact match, {track.eval.trials} held-out prompts per "
        f"length ({track.eval.longest_trials} at {track.target_length}), keys 1..{track.eval.key_max} never seen "
        "in training. Cells: mean over seeds [95% bootstrap interval over seeds and prompts].",
        "",
        retrieval_table(track, retrieval),
        "",
        f"![passkey at the target length]({longest_png.relative_to(report_dir).as_posix()})",
        "",
    ]
    for budget, png in zip(budgets, pictures):
        lines += [f"![needle heatmaps, {budget} budget]({png.relative_to(report_dir).as_posix()})", ""]
    lines += [
        "### The papers' claims at this scale",
        "",
        f"Paired differences of exact match at {track.target_length} (same seeds, same prompts); 'not resolved' "
        "when the 95% interval contains 0.",
        "",
        claims,
        "",
    ]
    return lines
