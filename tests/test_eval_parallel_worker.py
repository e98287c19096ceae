"""Gloo worker for test_eval_models.py: run with torchrun --nproc-per-node 2 CHECKPOINT OUT.

Loads a TP=1 checkpoint at TP=2, then at PP=2, and records the logits (all rows and chosen rows) and, at TP=2,
the captured attention, for the test to compare with TP=PP=1. No tests here.
"""

import sys

import torch


def run(checkpoint: str, out: str) -> None:
    from megatron.core import parallel_state as ps

    from megatron_ext.eval.models import MegatronExtModel

    torch.manual_seed(0)
    tokens = torch.randint(0, 600, (2, 48))
    rows = torch.tensor([3, 17, 40, 47])
    results = {}
    for tp, pp in [(2, 1), (1, 2)]:
        model = MegatronExtModel.from_checkpoint(checkpoint, tensor_parallel_size=tp, pipeline_parallel_size=pp)
        case = dict(logits=model.logits(tokens).float(), row_logits=model.logits(tokens, rows=rows).float())
        if pp == 1:
            case["attention"] = model.attention_probs(tokens, rows)
        results[f"tp{tp}_pp{pp}"] = case
        ps.destroy_model_parallel()
    if torch.distributed.get_rank() == 0:
        torch.save(dict(tokens=tokens, rows=rows, **results), out)


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2])
