"""Sliding-window perplexity against a hand computation on a tiny model, with and without overlapping windows."""

import json
import math
import random

import pytest
import torch

from megatron_ext.eval.perplexity import evaluate_perplexity, sliding_windows
from megatron_ext.eval.settings import PerplexitySettings
from test_eval_support import SP_VOCAB

pytest_plugins = ["test_eval_support"]


def test_window_plan_scores_every_token_once():
    # 10 tokens, window 5 = BOS + 4 tokens
    assert sliding_windows(10, 5, 2, bos=True) == [(0, 4, 4), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    assert sliding_windows(10, 5, 4, bos=True) == [(0, 4, 4), (4, 8, 4), (8, 10, 2)]
    assert sliding_windows(10, 5, 9, bos=True) == sliding_windows(10, 5, 4, bos=True)  # stride capped at 4
    # without BOS the window holds 5 tokens and the first token is never predicted
    assert sliding_windows(10, 5, 5, bos=False) == [(0, 5, 4), (5, 10, 5)]


def hand_nll(raw_model, bos: int, document: list[int], window_tokens: list[tuple[int, int]]) -> tuple[float, int]:
    """Sum of -log p(token) over hand-listed (window start, token index) pairs: the model reads
    [BOS] + document[start:...] and token i sits at position i - start + 1. Probabilities are over the tokenizer's
    SP_VOCAB ids: the model's padding rows (up to its 640) are no tokens."""
    total, ends = 0.0, {}
    for start, index in window_tokens:
        ends[start] = max(ends.get(start, 0), index + 1)
    for start, end in ends.items():
        ids = torch.tensor([[bos] + document[start:end]])
        with torch.no_grad():
            logits = raw_model(ids, torch.arange(ids.size(1))[None], None)
        log_probs = torch.log_softmax(logits[0, :, :SP_VOCAB].double(), dim=-1)
        for s, index in window_tokens:
            if s == start:
                position = index - start + 1
                total -= log_probs[position - 1, document[index]].item()
    return total, len(window_tokens)


@pytest.mark.parametrize("stride, truncate, plan", [
    # window 8 = BOS + 7 tokens over a 17-token document
    (7, False, [(0, range(0, 7)), (7, range(7, 14)), (14, range(14, 17))]),  # no overlap
    (3, False, [(0, range(0, 7)), (3, range(7, 10)), (6, range(10, 13)), (9, range(13, 16)), (12, range(16, 17))]),
    (3, True, [(0, range(0, 7))]),  # PoSE's --truncate: the document's first window only
])
def test_perplexity_equals_a_hand_computation(tiny_megatron, tmp_path, stride, truncate, plan):
    tokenizer = tiny_megatron.tokenizer
    document = tokenizer.encode("gamma river 1234 blue stone quiz memorize hidden yellow text 42 alpha")[:17]
    assert len(document) == 17
    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"text": tokenizer.decode(document)}) + "\n")
    assert tokenizer.encode(tokenizer.decode(document)) == document

    settings = PerplexitySettings(data=[str(data)], lengths=[8], stride=stride, truncate=truncate)
    result = evaluate_perplexity(tiny_megatron, settings)
    nll, count = hand_nll(tiny_megatron.model, tokenizer.bos_id, document,
                          [(start, i) for start, indices in plan for i in indices])
    row = result.rows[0]
    assert (row.tokens, row.windows, row.stride) == (count, len(plan), stride)
    assert row.nll == pytest.approx(nll / count, rel=1e-5)
    assert row.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_jsonl_and_indexed_dataset_give_the_same_perplexity(tiny_megatron, tmp_path):
    """The indexed dataset's EOD (and no BOS) are dropped: the same documents, the same number."""
    from megatron_ext.data import preprocess

    rng = random.Random(0)
    words = "alpha beta gamma river stone green blue yellow magic number hidden text".split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) for _ in range(4)]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    preprocess([jsonl], tmp_path / "docs", tiny_megatron.tokenizer._tokenizer, workers=1, progress=False)

    settings = dict(lengths=[16, 64], stride=8, num_documents=3, min_document_tokens=30)
    from_jsonl = evaluate_perplexity(tiny_megatron, PerplexitySettings(data=[str(jsonl)], **settings))
    from_indexed = evaluate_perplexity(tiny_megatron, PerplexitySettings(data=[str(tmp_path / "docs")], **settings))
    assert from_jsonl.documents == from_indexed.documents == 3
    assert [r.perplexity for r in from_jsonl.rows] == pytest.approx([r.perplexity for r in from_indexed.rows],
                                                                    rel=1e-9)
    assert from_jsonl.rows[0].tokens == from_jsonl.rows[1].tokens  # every token scored at every length


def test_missing_data_names_the_setting(tiny_megatron, tmp_path):
    with pytest.raises(FileNotFoundError, match="perplexity data"):
        evaluate_perplexity(tiny_megatron, PerplexitySettings(data=[str(tmp_path / "nothing*.jsonl")], lengths=[8]))
    with pytest.raises(ValueError, match="perplexity.data is empty"):
        evaluate_perplexity(tiny_megatron, PerplexitySettings(lengths=[8]))
