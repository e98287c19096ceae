"""Sliding-window perplexity against a hand computation on a tiny model, with and without overlapping windows."""

import copy
import json
import math
import random

import pytest
import torch

from megatron_ext.eval.perplexity import evaluate_perplexity, sliding_windows
from megatron_ext.eval.settings import PerplexitySettings
from test_eval_support import SP_VOCAB, network_logits

pytest_plugins = ["test_eval_support"]


def test_window_plan_scores_every_token_once():
    # 10 tokens, window 5 = BOS + 4 tokens
    assert sliding_windows(10, 5, 2, bos=True) == [(0, 4, 4), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    assert sliding_windows(10, 5, 4, bos=True) == [(0, 4, 4), (4, 8, 4), (8, 10, 2)]
    assert sliding_windows(10, 5, 9, bos=True) == sliding_windows(10, 5, 4, bos=True)  # stride capped at 4
    # without BOS the window holds 5 tokens and the first token is never predicted; a window scores at most 4,
    # so each later window reads the token before the first one it scores (stride 5 and 9 are capped at 4)
    assert sliding_windows(10, 5, 5, bos=False) == [(0, 5, 4), (4, 9, 4), (8, 10, 1)]
    assert sliding_windows(10, 5, 9, bos=False) == sliding_windows(10, 5, 4, bos=False)
    assert sliding_windows(10, 5, 2, bos=False) == [(0, 5, 4), (2, 7, 2), (4, 9, 2), (6, 10, 1)]


@pytest.mark.parametrize("bos", [True, False])
def test_every_window_predicts_its_scored_tokens_from_tokens_it_read(bos):
    """For any document, window and stride: each token (but the first without BOS) is scored exactly once, and
    the row predicting it is BOS or a token of the same window, never more than length - 1 tokens back."""
    for num_tokens in range(1, 24):
        for length in range(2, 9):
            for stride in range(1, 12):
                scored_tokens = []
                for begin, end, scored in sliding_windows(num_tokens, length, stride, bos):
                    assert end - begin + bos <= length  # the window fits, BOS included
                    assert 0 < scored <= end - begin - (0 if bos else 1)  # a row before every scored token
                    scored_tokens += range(end - scored, end)
                assert scored_tokens == list(range(0 if bos else 1, num_tokens)), (num_tokens, length, stride)


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
    from megatron_ext.data import load_tokenizer, preprocess

    rng = random.Random(0)
    words = "alpha beta gamma river stone green blue yellow magic number hidden text".split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) for _ in range(4)]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    preprocess([jsonl], tmp_path / "docs", load_tokenizer(tiny_megatron.tokenizer.path), workers=1, progress=False)

    settings = dict(lengths=[16, 64], stride=8, num_documents=3, min_document_tokens=30)
    from_jsonl = evaluate_perplexity(tiny_megatron, PerplexitySettings(data=[str(jsonl)], **settings))
    from_indexed = evaluate_perplexity(tiny_megatron, PerplexitySettings(data=[str(tmp_path / "docs")], **settings))
    assert from_jsonl.documents == from_indexed.documents == 3
    assert [r.perplexity for r in from_jsonl.rows] == pytest.approx([r.perplexity for r in from_indexed.rows],
                                                                    rel=1e-9)
    assert from_jsonl.rows[0].tokens == from_jsonl.rows[1].tokens  # every token scored at every length


def test_missing_data_names_the_setting(tiny_megatron, tmp_path):
    with pytest.raises(ValueError, match=r"perplexity.data \[.*nothing\*.jsonl'\]: no such file"):
        evaluate_perplexity(tiny_megatron, PerplexitySettings(data=[str(tmp_path / "nothing*.jsonl")], lengths=[8]))
    with pytest.raises(ValueError, match="perplexity.data is empty"):
        evaluate_perplexity(tiny_megatron, PerplexitySettings(lengths=[8]))


class WithoutBos:
    """A model's tokenizer as a tokenizer without BOS (Qwen2's kind) sees it: same ids, nothing prepended."""

    bos_id = None

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.eos_id, self.vocab_size = tokenizer.eos_id, tokenizer.vocab_size

    def encode(self, text):
        return self._tokenizer.encode(text)

    def decode(self, ids):
        return self._tokenizer.decode(ids)


def planned_nll(eval_model, document: list[int], plan) -> tuple[float, int]:
    """Sum of -log p(token) over a hand-written plan [(window start, token indices)]: the network reads
    [BOS] + document[start:...] (no BOS when the tokenizer has none) and the row before a token predicts it."""
    bos = [] if eval_model.tokenizer.bos_id is None else [eval_model.tokenizer.bos_id]
    total, count = 0.0, 0
    for start, indices in plan:
        ids = torch.tensor([bos + document[start:max(indices) + 1]])
        log_probs = torch.log_softmax(network_logits(eval_model, ids).double(), dim=-1)
        for index in indices:
            row = index - start + len(bos) - 1
            assert row >= 0, "the plan scores a token with nothing before it"
            total -= log_probs[row, document[index]].item()
            count += 1
    return total, count


# window 8 over a 17-token document; with BOS a window reads BOS + 7 tokens, without it 8 tokens of which the
# first is context; strides of a whole window or more are capped at 7
BOS_PLANS = {3: [(0, range(0, 7)), (3, range(7, 10)), (6, range(10, 13)), (9, range(13, 16)), (12, range(16, 17))],
             7: [(0, range(0, 7)), (7, range(7, 14)), (14, range(14, 17))]}
NO_BOS_PLANS = {3: [(0, range(1, 8)), (3, range(8, 11)), (6, range(11, 14)), (9, range(14, 17))],
                7: [(0, range(1, 8)), (7, range(8, 15)), (14, range(15, 17))]}


@pytest.mark.parametrize("model_fixture", ["tiny_megatron", "tiny_llama"])
@pytest.mark.parametrize("bos", [True, False])
@pytest.mark.parametrize("stride", [3, 8, 20])  # below, equal to and beyond the window
def test_windows_with_and_without_bos_equal_a_hand_computation(request, tmp_path, model_fixture, bos, stride):
    """Without BOS and a stride of a window or more, every window after the first used to score its first token
    with the logits of its last row (Hugging Face) or fail with an IndexError (megatron)."""
    model = copy.copy(request.getfixturevalue(model_fixture))
    if not bos:
        model.tokenizer = WithoutBos(model.tokenizer)
    data = tmp_path / "docs.jsonl"
    text = "gamma river 1234 blue stone quiz memorize hidden yellow text 42 alpha beta delta magic number special"
    data.write_text(json.dumps({"text": text}) + "\n")
    settings = PerplexitySettings(data=[str(data)], lengths=[8], stride=stride, max_document_tokens=17)
    result = evaluate_perplexity(model, settings)

    document = model.tokenizer.encode(text)[:17]
    assert len(document) == 17
    plan = (BOS_PLANS if bos else NO_BOS_PLANS)[min(stride, 7)]
    nll, count = planned_nll(model, document, plan)
    row = result.rows[0]
    assert (row.tokens, row.windows, row.stride) == (count, len(plan), min(stride, 7))
    assert row.nll == pytest.approx(nll / count, rel=1e-5)


@pytest.mark.parametrize("model_fixture", ["tiny_megatron", "tiny_llama"])
@pytest.mark.parametrize("bos", [True, False])
def test_one_window_over_the_whole_document_is_its_full_sequence_nll(request, tmp_path, model_fixture, bos):
    """A window as long as the document: the perplexity of one forward pass over it, computed from all logits."""
    model = copy.copy(request.getfixturevalue(model_fixture))
    if not bos:
        model.tokenizer = WithoutBos(model.tokenizer)
    text = "alpha beta gamma river stone green blue yellow magic number hidden text quiz 7"
    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"text": text}) + "\n")
    document = model.tokenizer.encode(text)
    ids = torch.tensor([([model.tokenizer.bos_id] if bos else []) + document])
    log_probs = torch.log_softmax(network_logits(model, ids).double(), dim=-1)
    targets = ids[0, 1:]
    expected = -log_probs[:-1].gather(-1, targets[:, None]).sum().item() / len(targets)

    for stride in (1, 5, 1000):  # one window: the stride plays no part
        row = evaluate_perplexity(model, PerplexitySettings(data=[str(data)], lengths=[ids.size(1)],
                                                            stride=stride)).rows[0]
        assert (row.windows, row.tokens) == (1, len(targets))
        assert row.nll == pytest.approx(expected, rel=1e-6)


def test_a_window_cannot_score_a_token_it_has_no_row_for(tiny_megatron):
    from megatron_ext.eval.perplexity import window_nll

    model = copy.copy(tiny_megatron)
    model.tokenizer = WithoutBos(model.tokenizer)
    with pytest.raises(ValueError, match="cannot score 5 of 5 tokens read without BOS: at most 4"):
        window_nll(model, [11, 12, 13, 14, 15], 5)
    assert window_nll(model, [11, 12, 13, 14, 15], 4) > 0
