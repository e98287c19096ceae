"""Passkey retrieval (PoSE paper's template): a key in 1 .. 50000 at a random depth of garbage filler.

Exact match of greedy decoding, computed with one teacher-forced pass per prompt (see scoring.py).
"""

import random
from dataclasses import dataclass, field

from megatron_ext.eval.distributed import check_prompt_groups
from megatron_ext.data.prompts import filler_tokens, passkey_prompt
from megatron_ext.eval.results import EvalResult, markdown_table, per_length_table, progress
from megatron_ext.eval.settings import PasskeySettings


@dataclass
class PasskeyTrial:
    length: int
    depth: float
    key: int
    correct: bool
    token_accuracy: float
    prediction: str  # the argmax at each answer position given the true prefix, decoded


@dataclass
class PasskeyRow:
    length: int
    trials: int
    accuracy: float  # exact match of greedy decoding
    token_accuracy: float  # mean share of key tokens predicted right, given the true prefix


@dataclass
class PasskeyResult(EvalResult):
    model: str
    context_window: int | None
    rows: list[PasskeyRow] = field(default_factory=list)
    trials: list[PasskeyTrial] = field(default_factory=list)
    task: str = "passkey"

    def table(self) -> str:
        return markdown_table(["length", "trials", "accuracy", "token accuracy"],
                              [[r.length, r.trials, r.accuracy, r.token_accuracy] for r in self.rows])


def draw_keys_and_depths(seed: int, length: int, trials: int, key_max: int) -> list[tuple[int, float]]:
    """(key, depth) per trial: key uniform in 1 .. key_max, depth uniform in [0, 1]; keyed by (seed, length)."""
    rng = random.Random(f"passkey/{seed}/{length}")
    return [(rng.randint(1, key_max), rng.random()) for _ in range(trials)]


def passkey_prompts(tokenizer, settings: PasskeySettings) -> tuple[list, list[list]]:
    """(length, its (key, depth) draws) per length and the prompts of each; they depend only on (seed, length)."""
    filler = filler_tokens(tokenizer, settings.filler)
    draws = [(length, draw_keys_and_depths(settings.seed, length, settings.trials, settings.key_max))
             for length in settings.lengths]
    prompts = [[passkey_prompt(tokenizer, length, key=key, depth=depth, filler=filler) for key, depth in drawn]
               for length, drawn in draws]
    return draws, prompts


def evaluate_passkey(model, settings: PasskeySettings) -> PasskeyResult:
    """Accuracy per length; the prompts of a length depend only on (seed, length), data-parallel ranks split them."""
    settings.validate()
    draws, prompts = passkey_prompts(model.tokenizer, settings)
    with progress(len(settings.lengths) * settings.trials, "passkey") as bar:
        checks = check_prompt_groups(model, prompts, batch_size=settings.batch_size, number_answer=True, bar=bar)
    result = PasskeyResult(model=model.name, context_window=model.context_window)
    for (length, drawn), length_checks in zip(draws, checks):
        trials = [PasskeyTrial(length=length, depth=depth, key=key, correct=check.correct,
                               token_accuracy=check.token_accuracy,
                               prediction=model.tokenizer.decode(check.predicted[:-1]))
                  for (key, depth), check in zip(drawn, length_checks)]
        result.trials += trials
        result.rows.append(PasskeyRow(length=length, trials=len(trials),
                                      accuracy=sum(t.correct for t in trials) / len(trials),
                                      token_accuracy=sum(t.token_accuracy for t in trials) / len(trials)))
    return result


# --- the task's hooks for megatron_ext/eval/registry.py ----------------------------------------

evaluate = evaluate_passkey
prompts = passkey_prompts


def report_section(settings: PasskeySettings, results: dict, files: dict, report_dir) -> list[str]:
    return ["## Passkey retrieval", "",
            f"PoSE template, key uniform in 1..{settings.key_max}, random depth, {settings.trials} prompts per "
            "length; exact match of greedy decoding (one teacher-forced pass), and in brackets the share of key "
            "tokens predicted right given the true prefix.", "",
            per_length_table(results, lambda r: f"{r.accuracy:.2f} ({r.token_accuracy:.2f})")]


def summary_columns(result: PasskeyResult) -> dict:
    return {"passkey": {r.length: r.accuracy for r in result.rows}}
