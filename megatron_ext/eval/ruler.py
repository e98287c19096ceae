"""RULER-style synthetic tasks (Hsieh et al. 2024), generated here: multi-key NIAH, multi-value NIAH,
variable tracking. No downloads: keys, values and variable names are random strings and numbers.

Scores (RULER's string-match rules, read with one teacher-forced pass):
- mk_niah: the queried key's value is the greedy answer (1 or 0 per prompt).
- mv_niah, vt: the share of answer items (values; variable names) whose tokens are all the argmax given
  the true answer so far, items in the order they appear in the text.
"""

import random
import string
from collections.abc import Callable
from dataclasses import dataclass, field

from megatron_ext.eval.distributed import check_prompt_groups
from megatron_ext.data.prompts import Prompt, build_prompt, filler_tokens
from megatron_ext.eval.results import EvalResult, markdown_table, progress
from megatron_ext.eval.settings import RulerSettings

NIAH_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
              "I will quiz you about the numbers afterwards.")
NIAH_NEEDLE = "\nOne of the special magic numbers for {key} is: {value}."
VT_INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text."


def _word(rng: random.Random, letters: str, size: int) -> str:
    return "".join(rng.choice(letters) for _ in range(size))


def _distinct(rng: random.Random, count: int, draw: Callable[[], object]) -> list:
    items = []
    while len(items) < count:
        item = draw()
        if item not in items:
            items.append(item)
    return items


def _sorted_depths(rng: random.Random, count: int) -> list[float]:
    return sorted(rng.random() for _ in range(count))


def multikey_niah(tokenizer, length, rng, filler, settings: RulerSettings) -> Prompt:
    keys = _distinct(rng, settings.num_keys, lambda: _word(rng, string.ascii_lowercase, 6))
    values = [rng.randint(1_000_000, 9_999_999) for _ in keys]
    query = rng.randrange(len(keys))
    return build_prompt(
        tokenizer, length, intro=NIAH_INTRO, filler=filler, depths=_sorted_depths(rng, len(keys)),
        needles=[NIAH_NEEDLE.format(key=k, value=v) for k, v in zip(keys, values)],
        question=(f"\nWhat is the special magic number for {keys[query]} mentioned in the provided text? "
                  f"The special magic number for {keys[query]} mentioned in the provided text is"),
        answers=[f" {values[query]}"])


def multivalue_niah(tokenizer, length, rng, filler, settings: RulerSettings) -> Prompt:
    key = _word(rng, string.ascii_lowercase, 6)
    values = _distinct(rng, settings.num_values, lambda: rng.randint(1_000_000, 9_999_999))
    return build_prompt(
        tokenizer, length, intro=NIAH_INTRO, filler=filler, depths=_sorted_depths(rng, len(values)),
        needles=[NIAH_NEEDLE.format(key=key, value=v) for v in values],
        question=(f"\nWhat are all the special magic numbers for {key} mentioned in the provided text? "
                  f"The special magic numbers for {key} mentioned in the provided text are"),
        answers=[f" {values[0]}"] + [f", {v}" for v in values[1:]])


def variable_tracking(tokenizer, length, rng, filler, settings: RulerSettings) -> Prompt:
    names = _distinct(rng, settings.num_hops + 1, lambda: _word(rng, string.ascii_uppercase, 5))
    value = rng.randint(10_000, 99_999)
    chain = [f"\nVAR {names[0]} = {value}."] + [f"\nVAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    return build_prompt(
        tokenizer, length, intro=VT_INTRO, filler=filler, depths=_sorted_depths(rng, len(chain)), needles=chain,
        question=(f"\nQuestion: Find all variables that are assigned the value {value} in the text above. "
                  f"Answer: According to the chain(s) of variable assignment in the text above, {len(names)} "
                  f"variables are assigned the value {value}, they are:"),
        answers=[f" {name}" for name in names])


TASKS: dict[str, Callable] = {"mk_niah": multikey_niah, "mv_niah": multivalue_niah, "vt": variable_tracking}


@dataclass
class RulerRow:
    task: str
    length: int
    trials: int
    score: float


@dataclass
class RulerResult(EvalResult):
    model: str
    context_window: int | None
    rows: list[RulerRow] = field(default_factory=list)
    task: str = "ruler"

    def score(self, task: str, length: int) -> float:
        return next(r.score for r in self.rows if r.task == task and r.length == length)

    def table(self) -> str:
        tasks = list(dict.fromkeys(r.task for r in self.rows))
        lengths = list(dict.fromkeys(r.length for r in self.rows))
        rows = []
        for length in lengths:
            scores = [self.score(task, length) for task in tasks]
            rows.append([length, *scores, sum(scores) / len(scores)])
        return markdown_table(["length", *tasks, "mean"], rows)


def ruler_prompts(tokenizer, settings: RulerSettings) -> tuple[list, list[list]]:
    """The (task, length) groups and the prompts of each; a group's depend only on (task, seed, length)."""
    filler = filler_tokens(tokenizer, settings.filler)
    groups = [(task, length) for task in settings.tasks for length in settings.lengths]
    prompts = []
    for task, length in groups:
        rng = random.Random(f"ruler/{task}/{settings.seed}/{length}")
        prompts.append([TASKS[task](tokenizer, length, rng, filler, settings) for _ in range(settings.trials)])
    return groups, prompts


def evaluate_ruler(model, settings: RulerSettings) -> RulerResult:
    """Score per task and length; a group's prompts depend only on (task, seed, length), data-parallel ranks
    split them."""
    settings.validate()
    groups, prompts = ruler_prompts(model.tokenizer, settings)
    with progress(len(groups) * settings.trials, "ruler") as bar:
        checks = check_prompt_groups(model, prompts, batch_size=settings.batch_size, bar=bar)
    result = RulerResult(model=model.name, context_window=model.context_window)
    for (task, length), group_checks in zip(groups, checks):
        scores = [float(c.correct) if task == "mk_niah" else sum(c.items_correct) / len(c.items_correct)
                  for c in group_checks]
        result.rows.append(RulerRow(task=task, length=length, trials=len(scores), score=sum(scores) / len(scores)))
    return result


# --- the task's hooks for megatron_ext/eval/registry.py ----------------------------------------

evaluate = evaluate_ruler
prompts = ruler_prompts


def report_section(settings: RulerSettings, results: dict, files: dict, report_dir) -> list[str]:
    lines = ["## RULER-style tasks", "",
             f"Generated data, {settings.trials} prompts per task and length: mk_niah ({settings.num_keys} keys, "
             f"exact match), mv_niah ({settings.num_values} values, share recalled), vt ({settings.num_hops} hops, "
             "share of variables).", ""]
    for name, result in results.items():
        lines += [f"### {name}", "", result.table(), ""]
    return lines


def summary_columns(result: RulerResult) -> dict:
    """The mean score over the RULER tasks, per length."""
    lengths = {r.length for r in result.rows}
    return {"RULER": {length: _mean([r.score for r in result.rows if r.length == length]) for length in lengths}}


def _mean(values):
    return sum(values) / len(values)
