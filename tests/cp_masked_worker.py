"""Gloo worker for test_simulate.py (torchrun --nproc-per-node 2): context parallelism with a CP rank whose
tokens are all masked.

At CP=2 the zig-zag layout gives rank 1 chunks 1 and 2 of 4, the middle half of each sequence. Every
micro-batch here masks exactly that half (an answer-only loss, a masked EOD run, a document whose tokens
carry no loss), so rank 1 holds no token with a loss in the whole step. The loss (per-token sum over the
step / global token count, the training loop's loss_func and megatron's per-token normalization) and the
gradients must be finite and equal those of CP=1 on the same batches, with and without document masking
(Megatron-LM #1764: a per-rank mean makes this 0/0 = NaN).
"""

import json
import math
import sys

import torch

from megatron_ext.compat import prepare_megatron
from parallel_checks import HARPE, MICRO_BATCH, SEQ, VOCAB, compare


def masked_batches(documents: bool) -> list[dict]:
    g = torch.Generator().manual_seed(11)
    batches = []
    for _ in range(2):
        tokens = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ + 1), generator=g)
        loss_mask = torch.ones(MICRO_BATCH, SEQ)
        loss_mask[:, SEQ // 4: 3 * SEQ // 4] = 0  # CP rank 1's chunks
        positions = torch.arange(SEQ).expand(MICRO_BATCH, SEQ)
        batch = dict(tokens=tokens[:, :-1].contiguous(), labels=tokens[:, 1:].contiguous(), loss_mask=loss_mask)
        if documents:  # three documents per row, positions restarting at each; the middle one all masked
            document_ids = (torch.arange(SEQ) * 3 // SEQ).expand(MICRO_BATCH, SEQ).contiguous()
            positions = torch.arange(SEQ) - (torch.arange(SEQ) * 3 // SEQ) * (SEQ // 3)
            batch["document_ids"] = document_ids
            positions = positions.expand(MICRO_BATCH, SEQ)
        batch["position_ids"] = positions.contiguous()
        batches.append(batch)
    return batches


def rank_tokens(batches) -> float:
    """Tokens with a loss that this CP rank holds (megatron's zig-zag slice of the loss masks)."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    return sum(float(get_batch_on_this_cp_rank(dict(loss_mask=b["loss_mask"].clone()))["loss_mask"].sum())
               for b in batches)


def main(out_path: str) -> None:
    from megatron.core import parallel_state as ps

    prepare_megatron()
    torch.distributed.init_process_group("gloo")
    results = []
    for documents in (False, True):
        batches = masked_batches(documents)
        result = compare(f"cp2_rank_all_masked{'_documents' if documents else ''}", HARPE, batches, cp=2)
        tokens = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(tokens, rank_tokens(batches))
        result.update(cp_rank_tokens=tokens, finite=math.isfinite(result["loss"]),
                      cp=ps.get_context_parallel_world_size())
        results.append(result)
    if torch.distributed.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    ps.destroy_model_parallel()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
