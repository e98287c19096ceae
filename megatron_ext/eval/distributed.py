"""Evaluation spread over ranks as training is: data-parallel ranks split the trials, context-parallel ranks
split each prompt's tokens with training's zig-zag (megatron_ext/context_parallel.py), padded to fit it.

Imports torch; megatron only inside the functions that need it. Never the training loop.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from megatron_ext.eval.scoring import check_answers


@dataclass(frozen=True)
class DataParallel:
    """Where a rank stands among the model's data-parallel replicas: `rank` of `size`, collectives on `group`."""
    rank: int = 0
    size: int = 1
    group: object = None  # a torch.distributed process group; None with size 1


ALONE = DataParallel()


def data_parallel_of(model) -> DataParallel:
    """The model's replicas (`EvalModel.data_parallel`); a model without one computes every trial itself."""
    return getattr(model, "data_parallel", None) or ALONE


def split_over_data_parallel(model, items: Sequence, compute: Callable, *, bar=None,
                             size: Callable = lambda item: 1) -> list:
    """[compute(item) for item in items], item i computed by data-parallel rank i % DP, on every rank in item order.

    A result depends only on its item, never on which rank computed it, so the list equals DP=1's. `bar` ticks
    `size(item)` per item this rank computes and is full once the results are gathered.
    """
    dp = data_parallel_of(model)
    mine = {}
    for index in range(dp.rank, len(items), dp.size):
        mine[index] = compute(items[index])
        if bar is not None:
            bar.update(size(items[index]))
    if dp.size > 1:
        parts = [None] * dp.size
        torch.distributed.all_gather_object(parts, mine, group=dp.group)
        mine = {index: result for part in parts for index, result in part.items()}
    if bar is not None:
        bar.update(sum(map(size, items)) - bar.n)
    return [mine[index] for index in range(len(items))]


def check_prompt_groups(model, groups: Sequence[Sequence], *, batch_size: int, number_answer: bool = False,
                        bar=None) -> list[list]:
    """`scoring.check_answers` per group of prompts (one length each), `batch_size` prompts per forward pass;
    the batches of all groups are split over the data-parallel ranks. Returns the checks per group, in order.

    The batches are those of DP=1 (consecutive prompts of one group), so every logit is computed as there.
    """
    batches = [(group, prompts[start:start + batch_size]) for group, prompts in enumerate(groups)
               for start in range(0, len(prompts), batch_size)]
    checks = split_over_data_parallel(model, batches, lambda batch: check_answers(model, batch[1],
                                                                                  number_answer=number_answer),
                                      bar=bar, size=lambda batch: len(batch[1]))
    per_group = [[] for _ in groups]
    for (group, _), batch_checks in zip(batches, checks):
        per_group[group] += batch_checks
    return per_group


# --- context parallelism ------------------------------------------------------------------------


def tokens_on_this_cp_rank(tokens: torch.Tensor, position_ids: torch.Tensor, cp_group):
    """This context-parallel rank's zig-zag share of tokens and position ids [b, s], sliced as training slices
    a batch (`megatron_ext.context_parallel.slice_for_context_parallel`).

    A length that 2*cp does not divide is padded at the end first: attention is causal, so the padding changes
    no earlier position. The padding repeats the last token and its position id, so the largest id (what the
    'dynamic' RoPE scaling reads) stays that of the prompt. `context_parallel.gather_sequence` puts what the
    ranks computed back in token order.
    """
    from megatron.core.utils import get_pg_size

    from megatron_ext.context_parallel import sequence_multiple, slice_for_context_parallel

    pad = -tokens.size(1) % sequence_multiple(get_pg_size(cp_group))
    if pad:
        tokens = torch.cat([tokens, tokens[:, -1:].expand(-1, pad)], dim=1)
        position_ids = torch.cat([position_ids, position_ids[:, -1:].expand(-1, pad)], dim=1)
    local = slice_for_context_parallel(dict(tokens=tokens, position_ids=position_ids), cp_group=cp_group)
    return local["tokens"], local["position_ids"]
