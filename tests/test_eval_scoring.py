"""One teacher-forced pass gives the result of real step-by-step greedy generation (Hugging Face `generate`;
our own full-recompute loop on the megatron model), on right and wrong answers alike."""

import re

import pytest
import torch

from megatron_ext.data.prompts import PASSKEY_FILLER, Prompt, filler_tokens, passkey_prompt
from megatron_ext.eval.scoring import check_answers, continues_number, greedy_generate

pytest_plugins = ["test_eval_support"]

CASES = [(7, 0.0, 220), (31337, 0.4, 220), (50000, 1.0, 220), (123, 0.6, 301), (4096, 0.25, 301)]


def hf_generate(model, prompt_ids, count):
    output = model.model.generate(torch.tensor([prompt_ids]), max_new_tokens=count, do_sample=False,
                                  pad_token_id=model.tokenizer.eos_id)
    return output[0, len(prompt_ids):].tolist()


def generate(model, prompt_ids, count):
    if hasattr(model.model, "generate"):
        return hf_generate(model, prompt_ids, count)  # Hugging Face's own decoding loop, with KV cache
    return greedy_generate(model, prompt_ids, count)


@pytest.fixture(params=["tiny_llama", "tiny_megatron"])
def model(request):
    return request.getfixturevalue(request.param)


def with_answer(prompt_ids, answer_ids) -> Prompt:
    tokens = list(prompt_ids) + list(answer_ids)
    return Prompt(tokens=tokens, answer_spans=[(len(prompt_ids), len(tokens))], needle_spans=[])


def test_passkey_teacher_forced_result_equals_greedy_generation(model):
    filler = filler_tokens(model.tokenizer, PASSKEY_FILLER)
    for key, depth, length in CASES:
        prompt = passkey_prompt(model.tokenizer, length, key=key, depth=depth, filler=filler)
        answer = prompt.tokens[prompt.answer_start:]
        generated = generate(model, prompt.tokens[:prompt.answer_start], len(answer) + 1)
        number = re.match(r"\s*(\d+)", model.tokenizer.decode(generated))  # PoSE reads the generated number
        greedy_says = number is not None and number.group(1) == str(key)
        check = check_answers(model, [prompt], number_answer=True)[0]
        assert check.correct == greedy_says
        # up to and including the first wrong step, both see the same prefix and pick the same token
        first_miss = next((i for i, (g, a) in enumerate(zip(generated, answer)) if g != a), len(answer))
        assert check.predicted[:first_miss + 1] == generated[:first_miss + 1]


def test_the_models_own_greedy_continuation_scores_correct_and_a_changed_token_does_not(model):
    filler = filler_tokens(model.tokenizer, PASSKEY_FILLER)
    prompts = []
    for depth in [0.0, 0.5, 1.0]:
        prompt = passkey_prompt(model.tokenizer, 200, key=31337, depth=depth, filler=filler)
        prefix = prompt.tokens[:prompt.answer_start]
        continuation = generate(model, prefix, 4)
        changed = continuation[:3] + [(continuation[3] + 1) % model.tokenizer.vocab_size]
        prompts += [with_answer(prefix, continuation), with_answer(prefix, changed)]
    checks = check_answers(model, prompts)  # one batch of 6 prompts of 204 tokens
    assert [c.correct for c in checks] == [True, False] * 3
    assert [c.token_accuracy for c in checks[1::2]] == [0.75] * 3  # only the changed last token is not the argmax


def test_a_digit_after_the_key_counts_as_a_different_number(sp_tokenizer):
    key = sp_tokenizer.encode("The pass key is 123")[-3:]
    assert sp_tokenizer.decode(key).endswith("123")
    assert continues_number(sp_tokenizer, key, sp_tokenizer.encode("4")[-1])
    assert not continues_number(sp_tokenizer, key, sp_tokenizer.encode(".")[-1])
