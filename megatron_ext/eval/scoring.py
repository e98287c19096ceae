"""Greedy answers by one teacher-forced pass, and real step-by-step greedy generation to check it against.

Greedy decoding emits the answer exactly when, with the true answer fed in, the argmax at every answer
position is the true next token (by induction over the answer: each step sees the same prefix in both).
So one forward pass over prompt + answer scores a greedy generation of any length.
"""

from dataclasses import dataclass

import torch

from megatron_ext.data.prompts import Prompt


@dataclass
class AnswerCheck:
    correct: bool  # greedy generation returns the whole answer (and, for numbers, stops there)
    items_correct: list[bool]  # per answer item: all its tokens are the argmax given the true prefix
    token_accuracy: float  # share of answer tokens that are the argmax given the true prefix
    predicted: list[int]  # argmax at each answer position, then the token after the answer


def check_answers(model, prompts: list[Prompt], *, number_answer: bool = False) -> list[AnswerCheck]:
    """Score prompts of one length in a single forward pass (they form the batch).

    number_answer: the answer is a number and a digit right after it is a miss (as reading the
    first integer of the generated text, PoSE's rule, would count " 123" + "4" as 1234).
    """
    length = len(prompts[0].tokens)
    if any(len(p.tokens) != length for p in prompts):
        raise ValueError("check_answers batches prompts of one length; got several lengths")
    first = min(p.answer_start for p in prompts) - 1
    rows = torch.arange(first, length)  # the positions predicting answer tokens, and the one after the last
    tokens = torch.tensor([p.tokens for p in prompts], dtype=torch.long)
    argmax = model.logits(tokens, rows=rows).argmax(-1).cpu()  # [b, r]
    return [_check(model.tokenizer, prompt, argmax[i, prompt.answer_start - 1 - first:].tolist(), number_answer)
            for i, prompt in enumerate(prompts)]


def _check(tokenizer, prompt: Prompt, predicted: list[int], number_answer: bool) -> AnswerCheck:
    start = prompt.answer_start
    truth = prompt.tokens[start:]
    hits = [p == t for p, t in zip(predicted, truth)]
    items = [all(hits[a - start:b - start]) for a, b in prompt.answer_spans]
    correct = all(hits)
    if correct and number_answer:
        correct = not continues_number(tokenizer, truth, predicted[len(truth)])
    return AnswerCheck(correct=correct, items_correct=items, token_accuracy=sum(hits) / len(hits),
                       predicted=predicted)


def continues_number(tokenizer, number_ids: list[int], next_id: int) -> bool:
    """Whether `next_id`, after the ids of a number, adds digits to it."""
    before = tokenizer.decode(number_ids)
    after = tokenizer.decode(number_ids + [next_id])
    return after.startswith(before) and after[len(before):][:1].isdigit()


@torch.no_grad()
def greedy_generate(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Real greedy decoding, one full forward per new token (no KV cache): slow, for checks and small runs."""
    tokens = list(prompt_ids)
    for _ in range(max_new_tokens):
        last = torch.tensor([len(tokens) - 1])
        logits = model.logits(torch.tensor([tokens], dtype=torch.long), rows=last)
        tokens.append(int(logits[0, -1].argmax()))
    return tokens[len(prompt_ids):]
