"""Attention diagnostics after Zhong et al. 2024 ("Understanding the RoPE Extensions of Long-Context LLMs:
An Attention Perspective"): per layer and head, on the answer tokens of passkey prompts,

- entropy of the attention distribution, H(p) = -sum_j p_j ln p_j (nats; ln(number of keys) is uniform);
- Jensen-Shannon divergence to a reference model (e.g. the model before extension) at the same
  positions, JS(p, q) = KL(p || m)/2 + KL(q || m)/2 with m = (p + q)/2 (nats, at most ln 2);
- the attention mass on the needle sentence (which heads retrieve).

"Answer tokens" are the query positions that predict the answer (answer_start - 1 .. end - 2).
Each value is the mean over those positions and over the prompts of one length.
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_ext.eval.distributed import split_over_data_parallel
from megatron_ext.eval.passkey import draw_keys_and_depths
from megatron_ext.data.prompts import PASSKEY_FILLER, filler_tokens, passkey_prompt
from megatron_ext.eval.results import EvalResult, markdown_table, progress
from megatron_ext.eval.settings import AttentionSettings, EvalSettingsError


def attention_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of distributions over the last dim; 0 ln 0 = 0."""
    return -torch.special.xlogy(probs, probs).sum(-1)


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (nats) between distributions over the last dim."""
    m = (p + q) / 2
    kl_pm = (torch.special.xlogy(p, p) - torch.special.xlogy(p, m)).sum(-1)
    kl_qm = (torch.special.xlogy(q, q) - torch.special.xlogy(q, m)).sum(-1)
    return (kl_pm + kl_qm) / 2


@dataclass
class LayerAttention:
    """One layer at one length; lists run over heads."""
    length: int
    layer: int
    entropy: list[float]
    needle_mass: list[float]
    reference_entropy: list[float] | None = None
    js_divergence: list[float] | None = None


@dataclass
class AttentionResult(EvalResult):
    model: str
    reference: str | None
    lengths: list[int]
    layers: list[LayerAttention] = field(default_factory=list)
    task: str = "attention"

    def table(self) -> str:
        headers = ["length", "layer", "entropy", "needle mass (max head)"]
        if self.reference:
            headers += ["reference entropy", "JS mean", "JS max (head)"]
        rows = []
        for s in self.layers:
            row = [s.length, s.layer, _mean(s.entropy), _max_head(s.needle_mass)]
            if self.reference:
                row += [_mean(s.reference_entropy), _mean(s.js_divergence), _max_head(s.js_divergence)]
            rows.append(row)
        return markdown_table(headers, rows)

    def write_plots(self, directory, prefix: str = "attention") -> list[Path]:
        """One PNG per layer: entropy, JS divergence (with a reference) and needle mass per head."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = []
        for layer in sorted({s.layer for s in self.layers}):
            stats = [s for s in self.layers if s.layer == layer]
            panels = 3 if self.reference else 2
            figure, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.2))
            for s in stats:
                heads = range(len(s.entropy))
                line = axes[0].plot(heads, s.entropy, marker="o", label=f"{s.length}")[0]
                if s.reference_entropy is not None:
                    axes[0].plot(heads, s.reference_entropy, marker="x", linestyle="--", color=line.get_color(),
                                 label=f"{s.length} reference")
                    axes[1].plot(heads, s.js_divergence, marker="o", label=f"{s.length}")
                axes[-1].plot(heads, s.needle_mass, marker="o", label=f"{s.length}")
            titles = ["entropy (nats)"] + (["JS divergence to reference (nats)"] if self.reference else []) + \
                ["attention mass on the needle"]
            for axis, title in zip(axes, titles):
                axis.set_title(title, fontsize=9)
                axis.set_xlabel("head")
                axis.xaxis.set_major_locator(MaxNLocator(integer=True))
                axis.legend(fontsize=7, title="length", title_fontsize=7)
            figure.suptitle(f"{self.model}, layer {layer}" + (f" vs {self.reference}" if self.reference else ""),
                            fontsize=9)
            figure.tight_layout()
            path = directory / f"{prefix}_layer{layer}.png"
            figure.savefig(path, dpi=110)
            plt.close(figure)
            paths.append(path)
        return paths


def _mean(values):
    return sum(values) / len(values)


def _max_head(values) -> str:
    head = max(range(len(values)), key=values.__getitem__)
    return f"{values[head]:.4g} ({head})"


def evaluate_attention(model, settings: AttentionSettings, reference=None) -> AttentionResult:
    """Entropy and needle mass per layer and head on passkey answer tokens; JS divergence to `reference`.
    Data-parallel ranks split the prompts; the means add them in prompt order, as one rank does."""
    settings.validate()
    if reference is not None:
        _check_same_tokenizer(model, reference)
    filler = filler_tokens(model.tokenizer, settings.filler)
    trials = attention_trials(settings)

    def statistics(trial):
        return _prompt_statistics(_trial_prompt(model.tokenizer, filler, trial), model, reference)

    with progress(len(trials), "attention") as bar:
        per_prompt = split_over_data_parallel(model, trials, statistics, bar=bar)
    result = AttentionResult(model=model.name, reference=reference.name if reference else None,
                             lengths=list(settings.lengths))
    for index, length in enumerate(settings.lengths):  # the prompts of a length are consecutive
        of_length = per_prompt[index * settings.trials:(index + 1) * settings.trials]
        for layer, mean in _mean_per_layer(of_length).items():
            result.layers.append(LayerAttention(length=length, layer=layer, **mean))
    return result


def attention_trials(settings: AttentionSettings) -> list[tuple[int, int, float]]:
    """(length, key, depth) of each prompt, the prompts of a length consecutive."""
    return [(length, key, depth) for length in settings.lengths
            for key, depth in draw_keys_and_depths(settings.seed, length, settings.trials, settings.key_max)]


def _trial_prompt(tokenizer, filler: list[int], trial):
    length, key, depth = trial
    return passkey_prompt(tokenizer, length, key=key, depth=depth, filler=filler)


def attention_prompts(tokenizer, settings: AttentionSettings) -> list:
    """Every prompt of the task (evaluate builds each when its rank computes it)."""
    filler = filler_tokens(tokenizer, settings.filler)
    return [_trial_prompt(tokenizer, filler, trial) for trial in attention_trials(settings)]


def _mean_per_layer(per_prompt: list[dict]) -> dict:
    """{layer: {statistic: [heads]}} averaged over the prompts, added in prompt order."""
    sums = {}
    for layers in per_prompt:
        for layer, stats in layers.items():
            total = sums.setdefault(layer, {})
            for name, value in stats.items():
                total[name] = total.get(name, 0) + value
    return {layer: {name: (value / len(per_prompt)).tolist() for name, value in stats.items()}
            for layer, stats in sums.items()}


def _prompt_statistics(prompt, model, reference) -> dict:
    """{layer: {statistic: [heads]}} of one prompt, each the mean over its answer positions (float64)."""
    tokens = torch.tensor([prompt.tokens], dtype=torch.long)
    rows = torch.arange(prompt.answer_start - 1, len(prompt.tokens) - 1)
    needle_start, needle_end = prompt.needle_spans[0]
    probs = model.attention_probs(tokens, rows)  # per layer [1, h, r, s]
    reference_probs = reference.attention_probs(tokens, rows) if reference is not None else [None] * len(probs)
    if len(reference_probs) != len(probs):
        raise EvalSettingsError(f"the reference model has {len(reference_probs)} layers, the model {len(probs)}: "
                                "compare models of one architecture")
    layers = {}
    for layer, (p, q) in enumerate(zip(probs, reference_probs)):
        stats = dict(entropy=attention_entropy(p), needle_mass=p[..., needle_start:needle_end].sum(-1))
        if q is not None:
            stats |= dict(reference_entropy=attention_entropy(q), js_divergence=js_divergence(p, q))
        layers[layer] = {name: value.mean(dim=(0, 2)).double() for name, value in stats.items()}  # [1, h, r] -> [h]
    return layers


def _check_same_tokenizer(model, reference) -> None:
    probe = PASSKEY_FILLER + " The pass key is 12345. 0123456789"
    if model.tokenizer.encode(probe) != reference.tokenizer.encode(probe):
        raise EvalSettingsError(f"reference model {reference.name} tokenizes text differently from {model.name}: "
                                "attention can only be compared position by position with the same tokenizer")


# --- the task's hooks for megatron_ext/eval/registry.py ----------------------------------------

evaluate = evaluate_attention
prompts = attention_prompts


def output_files(result: AttentionResult, directory) -> list[Path]:
    return result.write_plots(directory)


def report_section(settings: AttentionSettings, results: dict, files: dict, report_dir: Path) -> list[str]:
    lines = ["## Attention entropy and JS divergence", "",
             f"On the answer tokens of {settings.trials} passkey prompts per length; means over heads, the head "
             "with the largest value in brackets. Plots: one per layer, per head.", ""]
    for name, result in results.items():
        lines += [f"### {name}" + (f" vs {result.reference}" if result.reference else ""), "", result.table(), ""]
        lines += [f"![{png.stem}]({png.relative_to(report_dir).as_posix()})" for png in files[name]]
        lines += [""]
    return lines
