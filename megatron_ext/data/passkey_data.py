"""Retrieval training data: passkey prompts of the evaluation's own template, one prompt per sample, with a
loss-mask sidecar that marks the answer tokens.

Every document holds one passkey prompt (`megatron_ext.data.prompts.passkey_prompt`: the PoSE template, its
repeated filler, the key at a random depth), then "." and EOD padding, `length` tokens in all, so a dataset
read with `data.add_extra_token: false` at `seq_length = length` gives one whole prompt per sample. Next to
`{prefix}.bin/.idx` goes the loss-mask sidecar (megatron_ext.data.retrieval): 1 where a token is a target the
loss counts (the key after the question, its end, its repetition in the needle); `data.answer_only_loss: true`
reads it.

Evaluation prompts are held out by key: the keys of every prompt the evaluation will draw are passed as
`held_out_keys` and never appear in training documents, so no (key, depth, filler) triple is shared.
"""

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from megatron_ext.data.retrieval import write_with_loss_mask

ANSWER_END = "."  # what follows the key in training prompts ("The pass key is 123.")


@dataclass(frozen=True)
class PasskeyDocument:
    tokens: list[int]
    targets: list[int]  # 1: the loss counts this token (an answer token), 0: it does not
    key: int
    depth: float
    filler_seed: int  # the filler's phase: prompts cycle the same filler text from this token of it
    prompt_length: int  # the passkey prompt's tokens, answer included; then the answer's end and padding


def passkey_documents(tokenizer, *, length: int, count: int, seed: int, key_max: int,
                      held_out_keys=frozenset(), filler_text: str | None = None,
                      needle_copy_loss: bool = True, shortest: int | None = None) -> list[PasskeyDocument]:
    """`count` documents of exactly `length` tokens, each a passkey prompt; keys uniform in 1..key_max minus
    `held_out_keys`, depths uniform in [0, 1], the filler phase uniform over the filler's tokens, the prompt's
    own length uniform in [shortest, length - len(end)] (default shortest: half of `length`); keyed by
    (seed, length).

    A document is the evaluation's prompt of that length, then `end` (the tokens of "." that end the answer:
    the evaluation counts a number as answered only when the next token does not extend it), then EOD tokens
    up to `length` (no loss, and invisible to the tokens before them). Prompts of many lengths keep the
    answer from sitting at one absolute position, which a model would otherwise learn instead of retrieval.
    Targets: the answer and its end; with `needle_copy_loss` also the key's repetition inside the needle
    ("... {key}. Remember it. {key} is ..."), a copy over a few tokens that teaches the copying the answer
    needs over many."""
    from megatron_ext.data.prompts import PASSKEY_FILLER, filler_tokens, passkey_prompt
    from megatron_ext.data.tokenizer_files import encode_continuation

    allowed = key_max - sum(1 for key in held_out_keys if 1 <= key <= key_max)
    if allowed < max(1, count // 100):
        raise ValueError(f"key_max ({key_max}) leaves {allowed} keys outside the held-out ones: raise key_max")
    filler = filler_tokens(tokenizer, filler_text or PASSKEY_FILLER)
    end = encode_continuation(tokenizer, ANSWER_END)
    pad = tokenizer.eos_id if tokenizer.eos_id is not None else filler[0]
    longest = length - len(end)
    shortest = min(longest, length // 2 if shortest is None else shortest)
    rng = random.Random(f"retrieval/{seed}/{length}")
    documents = []
    while len(documents) < count:
        key = rng.randint(1, key_max)
        if key in held_out_keys:
            continue
        depth, phase, size = rng.random(), rng.randrange(len(filler)), rng.randint(shortest, longest)
        try:
            prompt = passkey_prompt(tokenizer, size, key=key, depth=depth, filler=filler[phase:] + filler[:phase])
        except ValueError:  # too short for the template at this draw: the longest always fits or fails below
            if size == longest:
                raise
            continue
        tokens = prompt.tokens + end + [pad] * (length - size - len(end))
        targets = [0] * length
        for start, stop in prompt.answer_spans:
            targets[start:stop] = [1] * (stop - start)
        targets[size:size + len(end)] = [1] * len(end)
        if needle_copy_loss:
            for start, stop in _repeats(prompt.tokens, prompt.needle_spans[0],
                                        encode_continuation(tokenizer, f" {key}")):
                targets[start:stop] = [1] * (stop - start)
        documents.append(PasskeyDocument(tokens, targets, key, depth, phase, size))
    return documents


def _repeats(tokens: list[int], span: tuple[int, int], pattern: list[int]) -> list[int]:
    """[start, end) of every occurrence after the first, inside `span`, of the key's tokens after its leading
    separator token (sentencepiece writes " 123" as a word-start piece and the digits)."""
    digits = pattern[1:] if len(pattern) > 1 else pattern
    begin, end = span
    found = [i for i in range(begin, end - len(digits) + 1) if tokens[i:i + len(digits)] == digits]
    return [(i, i + len(digits)) for i in found[1:]]


def write_passkey_dataset(prefix, tokenizer, *, length: int, count: int, seed: int, key_max: int,
                          held_out_keys=frozenset(), needle_copy_loss: bool = True,
                          shortest: int | None = None) -> Path:
    """Write `{prefix}.bin/.idx`, its loss-mask sidecar and `{prefix}.keys.jsonl` (key, depth, filler phase
    per document); each file is written under a temporary name and renamed into place. Returns the prefix."""
    documents = passkey_documents(tokenizer, length=length, count=count, seed=seed, key_max=key_max,
                                  held_out_keys=held_out_keys, needle_copy_loss=needle_copy_loss,
                                  shortest=shortest)
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    write_with_loss_mask(prefix, [d.tokens for d in documents], [d.targets for d in documents], tokenizer.vocab_size,
                         tokenizer=tokenizer)
    staging = prefix.with_name(f".{prefix.name}.keys.jsonl.tmp")
    staging.write_text("".join(json.dumps(dict(key=d.key, depth=d.depth, filler_seed=d.filler_seed,
                                                          prompt_length=d.prompt_length)) + "\n"
                               for d in documents))
    os.replace(staging, f"{prefix}.keys.jsonl")
    return prefix


