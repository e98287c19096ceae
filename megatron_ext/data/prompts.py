"""Retrieval prompts built in token space: exact total length, needles at exact depths, answer spans known.

Layout of every prompt (each piece encoded on its own, `encode_continuation` for all but the first):

    [BOS] intro | filler ... needle_1 ... needle_k ... filler | question | answer_1 answer_2 ...

The filler is a token stream cycled to exactly the length that is left. A needle at depth d in
[0, 1] starts after round(d * F) filler tokens, F the prompt's filler token count, so depth 0 is
right after the intro and depth 1 right before the question. The whole sequence, answer
included, is `length` tokens: that is what the model sees in one teacher-forced pass.
No torch, no megatron. Evaluation (eval/passkey, needle, ruler, attention) asks with these prompts and the
retrieval training data (data/passkey_data.py) trains on them: one template, on the floor below both.
"""

from dataclasses import dataclass

from megatron_ext.data.tokenizer_files import TokenizerFiles, encode_continuation
from megatron_ext.errors import InputError

# The passkey template of the PoSE paper (its src/eval_passkey.py, after Mohtashami & Jaggi 2023).
PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                 "I will quiz you about the important information there.")
PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"
PASSKEY_ANSWER = " {key}"


@dataclass
class Prompt:
    tokens: list[int]  # the whole sequence, answer included
    answer_spans: list[tuple[int, int]]  # [start, end) token indices of each answer item, in order
    needle_spans: list[tuple[int, int]]  # [start, end) token indices of each needle, in prompt order

    @property
    def answer_start(self) -> int:
        return self.answer_spans[0][0]


def build_prompt(tokenizer: TokenizerFiles, length: int, *, intro: str, needles: list[str], depths: list[float],
                 question: str, answers: list[str], filler: list[int]) -> Prompt:
    """A prompt of exactly `length` tokens; `needles[i]` at `depths[i]`, `answers` the scored items.

    Needles, question and answers begin with their separator (" ", "\\n"); `filler` is the token
    stream to cycle (see `filler_tokens`).
    """
    if len(needles) != len(depths):
        raise ValueError(f"{len(needles)} needles but {len(depths)} depths: give one depth per needle")
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths {depths} must lie in [0, 1] (0 = right after the intro, 1 = before the question)")
    if not filler:
        raise InputError("the filler encodes to no tokens: give a non-empty filler text (--filler)")
    head = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(intro)
    needle_ids = [encode_continuation(tokenizer, text) for text in needles]
    question_ids = encode_continuation(tokenizer, question)
    answer_ids = [encode_continuation(tokenizer, text) for text in answers]
    fixed = len(head) + sum(map(len, needle_ids)) + len(question_ids) + sum(map(len, answer_ids))
    filler_count = length - fixed
    if filler_count < 0:
        raise InputError(f"length {length} is too short for this prompt: its intro, needles, question and answer "
                         f"alone take {fixed} tokens with this tokenizer; evaluate lengths >= {fixed} (--lengths)")
    stream = (filler * (filler_count // len(filler) + 1))[:filler_count]

    order = sorted(range(len(needles)), key=lambda i: depths[i])  # stable: equal depths keep their order
    tokens, needle_spans, taken = list(head), [], 0
    for i in order:
        offset = round(depths[i] * filler_count)
        tokens += stream[taken:offset]
        taken = offset
        needle_spans.append((len(tokens), len(tokens) + len(needle_ids[i])))
        tokens += needle_ids[i]
    tokens += stream[taken:] + question_ids
    spans = []
    for ids in answer_ids:
        spans.append((len(tokens), len(tokens) + len(ids)))
        tokens += ids
    return Prompt(tokens=tokens, answer_spans=spans, needle_spans=needle_spans)


def filler_tokens(tokenizer: TokenizerFiles, text: str) -> list[int]:
    """The token stream a filler text cycles as: `text` as it reads inside running text."""
    return encode_continuation(tokenizer, text if text[:1].isspace() else " " + text)


def passkey_prompt(tokenizer: TokenizerFiles, length: int, *, key: int, depth: float, filler: list[int],
                   intro: str = PASSKEY_INTRO) -> Prompt:
    """The PoSE passkey prompt with `key` at `depth`, `length` tokens in all; the answer is " {key}"."""
    return build_prompt(tokenizer, length, intro=intro, needles=[PASSKEY_NEEDLE.format(key=key)], depths=[depth],
                        question=PASSKEY_QUESTION, answers=[PASSKEY_ANSWER.format(key=key)], filler=filler)
