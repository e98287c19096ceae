"""`megatron-ext eval compare`: two models read the same token ids and are compared position by position, the check
to run after `megatron-ext convert` (a checkpoint and its Hugging Face export, either direction).

Each of the first `num_documents` documents is read once, up to `max_tokens` tokens (BOS included, the model's
tokenizer), by both models. Reported: the largest and the mean absolute logit difference over every position and
vocabulary entry, the largest log-probability difference, how often the top-1 tokens agree, the perplexity of
each model on those tokens (every token after the first of a window, from one forward pass), and whether the two
tokenizers turn the text into the same ids (both models are fed the model's ids either way, so the numbers
compare weights, and a tokenizer difference is reported on its own line).
"""

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_ext.eval.perplexity import load_documents
from megatron_ext.eval.results import EvalResult, markdown_table, progress
from megatron_ext.eval.settings import CompareSettings, EvalSettingsError

ROWS_AT_ONCE = 256  # positions whose fp32 log-softmax is held at a time (a 150k vocabulary: ~150 MB per model)


@dataclass
class CompareResult(EvalResult):
    model: str
    reference: str
    documents: int
    positions: int  # logit rows compared
    max_abs_logit_diff: float
    mean_abs_logit_diff: float  # over positions x vocabulary
    max_abs_logprob_diff: float  # after log-softmax, per row: blind to a constant shift of a row's logits
    top1_agreement: float  # share of positions whose most likely next token is the same
    scored_tokens: int
    model_perplexity: float
    reference_perplexity: float
    tokenizers_agree: bool
    tokenizer_difference: str | None = None  # where the reference's tokenizer first differs
    task: str = "compare"

    def table(self) -> str:
        agree = "yes" if self.tokenizers_agree else f"no: {self.tokenizer_difference}"
        return markdown_table(["quantity", "value"], [
            ["max abs logit difference", self.max_abs_logit_diff],
            ["mean abs logit difference", self.mean_abs_logit_diff],
            ["max abs log-probability difference", self.max_abs_logprob_diff],
            ["top-1 agreement", self.top1_agreement],
            [f"perplexity of {self.model}", self.model_perplexity],
            [f"perplexity of {self.reference}", self.reference_perplexity],
            ["positions compared (documents)", f"{self.positions} ({self.documents})"],
            ["tokenizers give the same ids", agree],
        ])


@dataclass
class _Differences:
    """Running sums over the compared rows."""
    positions: int = 0
    entries: int = 0
    abs_sum: float = 0.0
    max_abs: float = 0.0
    max_logprob: float = 0.0
    top1_same: int = 0
    scored: int = 0
    model_nll: float = 0.0
    reference_nll: float = 0.0

    def add(self, logits: torch.Tensor, reference_logits: torch.Tensor, ids: torch.Tensor) -> None:
        """logits, reference_logits [s, V] of the token ids [s]; row i predicts ids[i + 1]."""
        targets = torch.cat([ids[1:], ids.new_full((1,), -1)]).cpu()  # the last row predicts nothing here
        for start in range(0, logits.size(0), ROWS_AT_ONCE):
            rows = slice(start, start + ROWS_AT_ONCE)
            own, other = logits[rows].float().cpu(), reference_logits[rows].float().cpu()
            difference = (own - other).abs()
            self.max_abs = max(self.max_abs, difference.max().item())
            self.abs_sum += difference.double().sum().item()
            self.entries += difference.numel()
            own_logp, other_logp = own.log_softmax(-1), other.log_softmax(-1)
            self.max_logprob = max(self.max_logprob, (own_logp - other_logp).abs().max().item())
            self.top1_same += (own.argmax(-1) == other.argmax(-1)).sum().item()
            self.positions += own.size(0)
            chunk_targets = targets[rows]
            scored = chunk_targets >= 0
            picked = chunk_targets[scored, None]
            self.model_nll -= own_logp[scored].gather(-1, picked).double().sum().item()
            self.reference_nll -= other_logp[scored].gather(-1, picked).double().sum().item()
            self.scored += int(scored.sum())


def evaluate_compare(model, settings: CompareSettings, reference=None) -> CompareResult:
    """`model` and `reference` on the same ids from `settings.data`."""
    settings.validate()
    if reference is None:
        raise EvalSettingsError("compare needs a second model: --reference DIR (e.g. the Hugging Face export of "
                                "--model, or the checkpoint it was converted from)")
    if model.vocab_size != reference.vocab_size:
        raise EvalSettingsError(f"compare: {model.name} has a vocabulary of {model.vocab_size} and {reference.name} "
                                f"of {reference.vocab_size}: compare a model with its own conversion")
    bos = [] if model.tokenizer.bos_id is None else [model.tokenizer.bos_id]
    span = settings.max_tokens - len(bos)
    read = dict(count=settings.num_documents, min_tokens=2 - len(bos), max_tokens=span, json_key=settings.json_key)
    documents = load_documents(settings.data, model.tokenizer, **read)
    if not documents:
        raise EvalSettingsError(f"compare.data {settings.data}: no document with text in it")
    difference = tokenizer_difference(model.tokenizer, reference.tokenizer, documents,
                                      load_documents(settings.data, reference.tokenizer, **read))
    sums = _Differences()
    with progress(len(documents), "compare") as bar:
        for document in documents:
            ids = torch.tensor([bos + document])
            sums.add(model.logits(ids)[0], reference.logits(ids)[0], ids[0])
            bar.update(1)
    return CompareResult(
        model=model.name, reference=reference.name, documents=len(documents), positions=sums.positions,
        max_abs_logit_diff=sums.max_abs, mean_abs_logit_diff=sums.abs_sum / sums.entries,
        max_abs_logprob_diff=sums.max_logprob, top1_agreement=sums.top1_same / sums.positions,
        scored_tokens=sums.scored, model_perplexity=math.exp(sums.model_nll / sums.scored),
        reference_perplexity=math.exp(sums.reference_nll / sums.scored),
        tokenizers_agree=difference is None, tokenizer_difference=difference)


def tokenizer_difference(tokenizer, reference_tokenizer, documents, reference_documents) -> str | None:
    """Where the reference's tokenizer first gives other ids for the same text (BOS included), or None."""
    if tokenizer.bos_id != reference_tokenizer.bos_id:
        return f"BOS {tokenizer.bos_id} vs {reference_tokenizer.bos_id}"
    for index, (ids, reference_ids) in enumerate(zip(documents, reference_documents)):
        if ids != reference_ids:
            at = next((i for i, (a, b) in enumerate(zip(ids, reference_ids)) if a != b), min(len(ids),
                                                                                          len(reference_ids)))
            left = ids[at] if at < len(ids) else "end"
            right = reference_ids[at] if at < len(reference_ids) else "end"
            return f"document {index}, token {at}: {left} vs {right}"
    if len(documents) != len(reference_documents):
        return f"{len(documents)} vs {len(reference_documents)} documents"
    return None


# --- the task's hooks for megatron_ext/eval/registry.py ----------------------------------------

evaluate = evaluate_compare


def report_section(settings: CompareSettings, results: dict, files: dict, report_dir: Path) -> list[str]:
    first = next(iter(results.values()))
    rows = [[name, r.reference, r.max_abs_logit_diff, r.max_abs_logprob_diff, r.top1_agreement, r.model_perplexity,
             r.reference_perplexity, "yes" if r.tokenizers_agree else f"no ({r.tokenizer_difference})"]
            for name, r in results.items()]
    return ["## Comparison with the reference", "",
            f"Data: {', '.join(f'`{d}`' for d in settings.data)}; {first.documents} documents, up to "
            f"{settings.max_tokens} tokens each, read by both models with the model's token ids.", "",
            markdown_table(["model", "reference", "max abs logit diff", "max abs log-prob diff", "top-1 agreement",
                            "PPL model", "PPL reference", "same ids"], rows)]
