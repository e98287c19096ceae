"""Gloo worker for test_convert.py's multi-rank cases: run with torchrun --nproc-per-node 2.

argv: a JSON file listing cases {"name", "checkpoint", "tokens", "tp", "pp"} and the output
directory. Each case loads a converted checkpoint with megatron_ext's load_model at that TP/PP,
runs one forward pass with megatron-core's pipeline schedule, gathers the full-vocabulary logits
and rank 0 saves them as <out>/<name>.pt for the test to compare with transformers' logits.
"""

import json
import os
import sys
from functools import partial
from pathlib import Path

import torch

from megatron_ext.compat import prepare_megatron


def init_layout(tp: int, pp: int) -> None:
    from megatron.core import parallel_state as ps
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)


def forward_step(batch, data_iterator, model):
    output = model(batch["tokens"], batch["position_ids"], None)  # logits [b, s, v / tp] on the last stage
    return output, partial(keep_logits, output)


def keep_logits(logits, output_tensor):
    return output_tensor.sum() * 0, torch.tensor(1), {"logits": logits.detach()}


def full_logits(model, tokens: torch.Tensor) -> torch.Tensor | None:
    """The logits of every stage-and-TP-rank, assembled; rank 0 returns them, the others None."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batch = {"tokens": tokens, "position_ids": torch.arange(tokens.shape[1]).expand_as(tokens)}
    results = get_forward_backward_func()(
        forward_step_func=partial(forward_step, batch), data_iterator=iter([batch]), model=[model],
        num_microbatches=1, seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0], forward_only=True)
    local = results[0]["logits"] if ps.is_pipeline_last_stage() else None
    if local is not None:  # join the vocabulary shards of the TP ranks
        pieces = [torch.empty_like(local) for _ in range(ps.get_tensor_model_parallel_world_size())]
        torch.distributed.all_gather(pieces, local.contiguous(), group=ps.get_tensor_model_parallel_group())
        local = torch.cat(pieces, dim=-1)
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, local)
    return next(g for g in gathered if g is not None) if torch.distributed.get_rank() == 0 else None


def run_case(case: dict, out_dir: str) -> None:
    from megatron_ext.models.builder import load_model

    init_layout(case["tp"], case["pp"])
    model, _, _ = load_model(case["checkpoint"], torch.device("cpu"))
    with torch.no_grad():
        logits = full_logits(model, torch.load(case["tokens"]))
    if logits is not None:
        torch.save(logits, os.path.join(out_dir, f"{case['name']}.pt"))


def main(cases_file: str, out_dir: str) -> None:
    prepare_megatron()
    torch.distributed.init_process_group("gloo")
    torch.set_num_threads(1)
    for case in json.loads(Path(cases_file).read_text()):
        run_case(case, out_dir)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1], sys.argv[2])
