"""Prompt builders: exact length, needles at the requested depth (within one token), answers that match the text."""

import random
import re

import pytest

from megatron_ext.data.prompts import (
    PASSKEY_FILLER,
    PASSKEY_INTRO,
    PASSKEY_NEEDLE,
    PASSKEY_QUESTION,
    build_prompt,
    filler_tokens,
    passkey_prompt,
)
from megatron_ext.eval.ruler import multikey_niah, multivalue_niah, variable_tracking
from megatron_ext.eval.settings import RULER_TASKS, RulerSettings
from megatron_ext.eval.tokenizers import HFEvalTokenizer, encode_continuation

pytest_plugins = ["test_eval_support"]


@pytest.fixture(scope="module", params=["sentencepiece", "byte-level BPE"])
def tokenizer(request):
    if request.param == "sentencepiece":
        return request.getfixturevalue("sp_tokenizer")
    return HFEvalTokenizer(request.getfixturevalue("llama_dir"))


def find(tokens: list[int], part: list[int]) -> int:
    starts = [i for i in range(len(tokens) - len(part) + 1) if tokens[i:i + len(part)] == part]
    assert len(starts) == 1, f"expected the piece once, found it at {starts}"
    return starts[0]


@pytest.mark.parametrize("length", [300, 417])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.77, 1.0])
def test_passkey_needle_sits_at_the_requested_depth_in_a_prompt_of_the_requested_length(tokenizer, length, depth):
    key = 31337
    prompt = passkey_prompt(tokenizer, length, key=key, depth=depth,
                            filler=filler_tokens(tokenizer, PASSKEY_FILLER))
    assert len(prompt.tokens) == length
    needle = encode_continuation(tokenizer, PASSKEY_NEEDLE.format(key=key))
    head = 1 + len(tokenizer.encode(PASSKEY_INTRO))  # BOS + intro
    tail = len(encode_continuation(tokenizer, PASSKEY_QUESTION)) + len(encode_continuation(tokenizer, f" {key}"))
    filler_count = length - head - len(needle) - tail
    assert abs(find(prompt.tokens, needle) - (head + depth * filler_count)) <= 1
    assert prompt.tokens[0] == tokenizer.bos_id
    text = tokenizer.decode(prompt.tokens[1:])
    assert text.startswith(PASSKEY_INTRO) and text.endswith("What is the pass key? The pass key is 31337")
    assert tokenizer.decode(prompt.tokens[prompt.answer_start:]).strip() == "31337"


def test_several_needles_keep_their_depth_order_and_positions(sp_tokenizer):
    filler = filler_tokens(sp_tokenizer, PASSKEY_FILLER)
    needles = [f"\nNeedle number {i} is here." for i in range(3)]
    depths = [0.8, 0.2, 0.5]
    prompt = build_prompt(sp_tokenizer, 400, intro="Intro.", needles=needles, depths=depths,
                          question="\nQuestion?", answers=[" 1", ", 2"], filler=filler)
    ids = [encode_continuation(sp_tokenizer, n) for n in needles]
    head = 1 + len(sp_tokenizer.encode("Intro."))
    filler_count = 400 - head - sum(map(len, ids)) - len(encode_continuation(sp_tokenizer, "\nQuestion?")) \
        - len(encode_continuation(sp_tokenizer, " 1")) - len(encode_continuation(sp_tokenizer, ", 2"))
    before = 0  # needle tokens placed ahead of this one
    for i in sorted(range(3), key=depths.__getitem__):
        assert abs(find(prompt.tokens, ids[i]) - (head + before + depths[i] * filler_count)) <= 1
        before += len(ids[i])
    assert len(prompt.tokens) == 400
    assert [sp_tokenizer.decode(prompt.tokens[a:b]).strip(" ,") for a, b in prompt.answer_spans] == ["1", "2"]


def test_a_length_shorter_than_the_fixed_text_names_the_minimum_and_the_flag(sp_tokenizer):
    """A user's mistake (a UserError: one line from `megatron-ext eval`, no traceback), naming --lengths."""
    from megatron_ext.errors import UserError

    with pytest.raises(UserError, match=r"too short.*evaluate lengths >= \d+ \(--lengths\)"):
        passkey_prompt(sp_tokenizer, 20, key=1, depth=0.5, filler=filler_tokens(sp_tokenizer, PASSKEY_FILLER))


def test_ruler_answers_follow_from_the_text(tokenizer):
    """Read each generated prompt back as text and solve it with a regex: the answer items must match."""
    settings = RulerSettings(num_keys=3, num_values=3, num_hops=3)
    filler = filler_tokens(tokenizer, PASSKEY_FILLER)
    rng = random.Random(0)
    for _ in range(3):
        prompt = multikey_niah(tokenizer, 500, rng, filler, settings)
        text = tokenizer.decode(prompt.tokens)
        numbers = dict(re.findall(r"special magic numbers for (\w+) is: (\d+)\.", text))
        query = re.search(r"What is the special magic number for (\w+)", text).group(1)
        assert len(prompt.tokens) == 500 and len(numbers) == 3
        assert tokenizer.decode(prompt.tokens[prompt.answer_start:]).strip() == numbers[query]

        prompt = multivalue_niah(tokenizer, 500, rng, filler, settings)
        text = tokenizer.decode(prompt.tokens[:prompt.answer_start])
        values = re.findall(r"special magic numbers for \w+ is: (\d+)\.", text)
        items = [tokenizer.decode(prompt.tokens[a:b]).strip(" ,") for a, b in prompt.answer_spans]
        assert len(prompt.tokens) == 500 and items == values and len(values) == 3

        prompt = variable_tracking(tokenizer, 500, rng, filler, settings)
        text = tokenizer.decode(prompt.tokens[:prompt.answer_start])
        value = re.search(r"assigned the value (\d+)", text).group(1)
        assignments = dict((b, a) for b, a in re.findall(r"VAR (\w+) = (?:VAR )?(\w+)\.", text))
        chain = [name for name in assignments if assignments[name] == value]
        while len(chain) < len(assignments):
            chain.append(next(b for b, a in assignments.items() if a == chain[-1]))
        items = [tokenizer.decode(prompt.tokens[a:b]).strip() for a, b in prompt.answer_spans]
        assert len(prompt.tokens) == 500 and items == chain and len(chain) == 4


def test_every_ruler_task_name_has_a_generator():
    from megatron_ext.eval.ruler import TASKS

    assert tuple(TASKS) == RULER_TASKS
