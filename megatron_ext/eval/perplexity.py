"""Sliding-window perplexity per evaluated length, as in the PoSE paper's evaluation (after Press et al.).

For a window of W tokens the model reads [BOS] + W-1 document tokens, or W document tokens when the
tokenizer has no BOS (Qwen2); the window moves by `stride` document tokens, and each window scores only the
tokens no earlier window scored, so every document token is predicted exactly once, with up to W-1 tokens of
context. A window scores at most W-1 tokens (stride capped at W-1): the row that predicts its first scored
token is BOS or a document token inside the window, never one the model did not read. Without BOS the
document's first token has no row at all and is never scored. Perplexity = exp(total NLL / scored tokens)
over all documents (token-weighted, as PoSE's compute_perplexity).
"""

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_ext.eval.distributed import split_over_data_parallel
from megatron_ext.eval.results import EvalResult, markdown_table, per_length_table, progress
from megatron_ext.eval.settings import EvalSettingsError, PerplexitySettings, perplexity_source_paths


@dataclass
class PerplexityRow:
    length: int
    stride: int  # the stride used (capped at the window's document span)
    perplexity: float
    nll: float  # mean negative log-likelihood per token, nats
    tokens: int  # scored tokens
    windows: int
    # per document, in document order: summed NLL (nats) and scored tokens (for intervals over documents)
    document_nll: list[float] = field(default_factory=list)
    document_tokens: list[int] = field(default_factory=list)


@dataclass
class PerplexityResult(EvalResult):
    model: str
    context_window: int | None
    documents: int
    rows: list[PerplexityRow] = field(default_factory=list)
    task: str = "perplexity"

    def table(self) -> str:
        return markdown_table(["length", "stride", "perplexity", "nll/token", "tokens", "windows"],
                              [[r.length, r.stride, r.perplexity, r.nll, r.tokens, r.windows] for r in self.rows])


def evaluate_perplexity(model, settings: PerplexitySettings) -> PerplexityResult:
    """Sliding-window perplexity of `model` at each of `settings.lengths` on the same documents."""
    settings.validate()
    documents = load_documents(settings.data, model.tokenizer, count=settings.num_documents,
                               min_tokens=settings.min_document_tokens, max_tokens=settings.max_document_tokens,
                               json_key=settings.json_key)
    if not documents:
        raise EvalSettingsError(f"perplexity.data {settings.data}: no document has >= "
                                f"{settings.min_document_tokens} tokens; lower min_document_tokens or add data")
    result = PerplexityResult(model=model.name, context_window=model.context_window, documents=len(documents))
    bos = model.tokenizer.bos_id is not None
    for length in settings.lengths:
        span = length - 1 if bos else length  # document tokens per window
        docs = [d[:span] for d in documents] if settings.truncate else documents
        windows = [(document, begin, end, scored, index) for index, document in enumerate(docs)
                   for begin, end, scored in sliding_windows(len(document), length, settings.stride, bos)]
        with progress(len(windows), f"perplexity {length}") as bar:  # data-parallel ranks split the windows
            nlls = split_over_data_parallel(
                model, windows, lambda window: window_nll(model, window[0][window[1]:window[2]], window[3]), bar=bar)
        nll, tokens = sum(nlls), sum(window[3] for window in windows)  # summed in window order, as at DP=1
        document_nll, document_tokens = [0.0] * len(docs), [0] * len(docs)
        for window, window_nll_sum in zip(windows, nlls):
            document_nll[window[4]] += window_nll_sum
            document_tokens[window[4]] += window[3]
        result.rows.append(PerplexityRow(length=length, stride=window_stride(length, settings.stride), nll=nll / tokens,
                                         perplexity=math.exp(nll / tokens), tokens=tokens, windows=len(windows),
                                         document_nll=document_nll, document_tokens=document_tokens))
    return result


def window_stride(length: int, stride: int) -> int:
    """The stride used for windows of `length` tokens: at most length - 1, the tokens one window can score (with
    BOS, the document tokens after it; without, all but the first, which is the context of the next one)."""
    return min(stride, length - 1)


def sliding_windows(num_tokens: int, length: int, stride: int, bos: bool) -> list[tuple[int, int, int]]:
    """(begin, end, scored) per window over a document: tokens [begin, end) are read, the last `scored` scored.

    Without BOS the first token has nothing to be predicted from and is never scored, and every later window
    starts one token before the first token it scores (a stride of a whole window would leave that token
    without a row predicting it).
    """
    span = length - 1 if bos else length
    stride = window_stride(length, stride)
    windows, scored_until = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + span, num_tokens)
        scored = end - max(scored_until, 0 if bos else 1)
        if scored > 0:
            windows.append((begin, end, scored))
        scored_until = end
        if end == num_tokens:
            break
    return windows


@torch.no_grad()
def window_nll(model, window: list[int], scored: int) -> float:
    """Summed NLL (nats) of the last `scored` tokens of `window`, read after BOS when the tokenizer has one."""
    bos = [model.tokenizer.bos_id] if model.tokenizer.bos_id is not None else []
    tokens = torch.tensor([bos + list(window)], dtype=torch.long)
    if not 0 < scored < tokens.size(1):  # the first token read has no row predicting it
        raise ValueError(f"window_nll: cannot score {scored} of {len(window)} tokens read"
                         f"{' after BOS' if bos else ' without BOS'}: at most {tokens.size(1) - 1}")
    targets = tokens[0, -scored:]
    rows = torch.arange(tokens.size(1) - scored - 1, tokens.size(1) - 1)  # row i predicts token i + 1
    logits = model.logits(tokens, rows=rows)[0]  # [scored, V]
    nll = 0.0
    for chunk in range(0, scored, 4096):  # fp32 log-softmax a few thousand rows at a time
        part = logits[chunk:chunk + 4096].float().log_softmax(-1)
        nll -= part.gather(-1, targets[chunk:chunk + 4096, None].to(part.device)).sum().item()
    return nll


# --- documents --------------------------------------------------------------------------------


def load_documents(sources: list[str], tokenizer, *, count: int, min_tokens: int = 0, max_tokens: int | None = None,
                   json_key: str = "text") -> list[list[int]]:
    """The first `count` documents with >= min_tokens tokens (cut to max_tokens), in source order."""
    documents = []
    for tokens in _token_documents(sources, tokenizer, json_key):
        if len(tokens) >= min_tokens:
            documents.append(tokens[:max_tokens] if max_tokens else tokens)
            if len(documents) == count:
                break
    return documents


def _token_documents(sources, tokenizer, json_key):
    """Token ids of every document the sources name (each resolved as PerplexitySettings.validate checked it)."""
    from megatron_ext.data.documents import read_documents

    for source in sources:
        paths = perplexity_source_paths(source)
        if paths and Path(paths[0] + ".idx").is_file() and Path(paths[0] + ".bin").is_file():
            yield from _indexed_documents(paths[0], tokenizer)
            continue
        for path in paths:
            for document in read_documents(path, json_key=json_key):
                yield tokenizer.encode(document.text)


def _indexed_documents(prefix, tokenizer):
    """Documents of a megatron indexed dataset, without the BOS/EOD that preprocessing may have added; data made
    with another tokenizer than the model's is refused (megatron_ext.data.tokenizer_record)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_ext.data.tokenizer_record import check_data_tokenizer

    check_data_tokenizer(prefix, tokenizer, setting="perplexity.data (--data)")
    dataset = IndexedDataset(prefix)
    starts = dataset.document_indices
    for first, last in zip(starts[:-1], starts[1:]):
        tokens = [int(t) for i in range(first, last) for t in dataset[i]]
        if tokens and tokens[0] == tokenizer.bos_id:
            tokens = tokens[1:]
        if tokens and tokens[-1] == tokenizer.eos_id:
            tokens = tokens[:-1]
        yield tokens


# --- the task's hooks for megatron_ext/eval/registry.py ----------------------------------------

evaluate = evaluate_perplexity


def report_section(settings: PerplexitySettings, results: dict, files: dict, report_dir: Path) -> list[str]:
    first = next(iter(results.values()))
    return ["## Sliding-window perplexity", "",
            f"Data: {', '.join(f'`{d}`' for d in settings.data)}; {first.documents} documents"
            f"{' (truncated to one window)' if settings.truncate else ''}, stride {settings.stride} (capped at the "
            "window's length - 1: every scored token is predicted by a row the window read), BOS prepended when the "
            f"tokenizer has one. Tokens scored per length: {', '.join(str(r.tokens) for r in first.rows)}.", "",
            per_length_table(results, lambda r: r.perplexity)]


def summary_columns(result: PerplexityResult) -> dict:
    return {"PPL": {r.length: r.perplexity for r in result.rows}}
