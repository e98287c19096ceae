"""Gloo worker for test_eval_models.py: run with torchrun --nproc-per-node 2 CHECKPOINT OUT.

Loads a TP=1 checkpoint at TP=2, then at PP=2, and records the logits (all rows and chosen rows) and, at TP=2,
the captured attention, for the test to compare with TP=PP=1.

For test_eval_distributed.py: torchrun --nproc-per-node 2 spread CHECKPOINT SUITE_YAML OUT runs the suite with
two data-parallel ranks (the report's JSON files are the result), then loads the checkpoint at CP=2 and records
logits and attention for the test to compare with CP=1, and the error of a CP size that does not divide the
world. No tests here.
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


CP_LENGTH, ODD_LENGTH = 48, 45  # ODD_LENGTH: not a multiple of 2 x CP = 4, so the prompt is padded


def context_parallel_inputs() -> dict:
    """name -> (tokens, position_ids or None, rows or None): plain and PoSE ids, all rows and chosen rows."""
    from megatron_ext.rope import pose_position_ids

    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 600, (2, CP_LENGTH), generator=generator)
    pose_ids = torch.stack([pose_position_ids(CP_LENGTH, 16 * CP_LENGTH, seed=7, sample_index=i) for i in range(2)])
    rows = torch.tensor([0, 5, 11, 12, 23, 24, 35, 47])  # in each of the four zig-zag chunks
    odd_rows = torch.tensor([3, 30, 44])
    return dict(full=(tokens, None, None), rows=(tokens, None, rows), pose=(tokens, pose_ids, None),
                pose_rows=(tokens, pose_ids, rows), odd=(tokens[:, :ODD_LENGTH], None, None),
                odd_pose_rows=(tokens[:, :ODD_LENGTH], pose_ids[:, :ODD_LENGTH], odd_rows))


def counting(method):
    """(counter, a wrapper of `method` that adds one to counter["calls"] per call)."""
    counter = {"calls": 0}

    def counted(*args, **kwargs):
        counter["calls"] += 1
        return method(*args, **kwargs)

    return counter, counted


def run_spread(checkpoint: str, suite_yaml: str, out: str) -> None:
    from megatron.core import parallel_state as ps

    from megatron_ext.distributed import LayoutError
    from megatron_ext.eval.models import MegatronExtModel
    from megatron_ext.eval.suite import load_suite_config, run_suite

    forward_passes, MegatronExtModel.logits = counting(MegatronExtModel.logits)
    run_suite(load_suite_config(suite_yaml))  # two ranks at TP = PP = CP = 1: DP = 2
    data_parallel_size = ps.get_data_parallel_world_size()
    passes_per_rank = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(passes_per_rank, forward_passes["calls"])
    ps.destroy_model_parallel()

    model = MegatronExtModel.from_checkpoint(checkpoint, context_parallel_size=2)
    inputs = context_parallel_inputs()
    logits = {name: model.logits(tokens, position_ids, rows) for name, (tokens, position_ids, rows) in inputs.items()}
    tokens, _, rows = inputs["odd_pose_rows"]
    attention = model.attention_probs(tokens, rows)
    context_parallel_size = ps.get_context_parallel_world_size()
    ps.destroy_model_parallel()

    try:
        MegatronExtModel.from_checkpoint(checkpoint, context_parallel_size=3)
        layout_error = None
    except LayoutError as error:
        layout_error = str(error)
    if torch.distributed.get_rank() == 0:
        torch.save(dict(data_parallel_size=data_parallel_size, passes_per_rank=passes_per_rank,
                        context_parallel_size=context_parallel_size,
                        inputs=inputs, logits=logits, attention=attention, layout_error=layout_error), out)


COMBINED_LAYOUTS = [(2, 1, 2), (1, 2, 2), (1, 1, 2)]  # (TP, PP, CP) on four ranks; the last leaves DP = 2


def combined_settings():
    """The passkey and needle runs of the DP = 2 x CP = 2 layout (uneven: 3 prompts, batches of 2)."""
    from megatron_ext.eval.settings import NeedleSettings, PasskeySettings

    return dict(passkey=PasskeySettings(lengths=[96, 130], trials=3),
                needle=NeedleSettings(lengths=[96], depths=[0.0, 1.0], trials=3, batch_size=2))


def run_combined(checkpoint: str, out: str) -> None:
    """Four ranks: CP=2 with TP=2, with PP=2, and with DP=2 (the last also runs passkey and needle)."""
    from megatron.core import parallel_state as ps

    from megatron_ext.eval.models import MegatronExtModel
    from megatron_ext.eval.registry import TASKS

    inputs, results = context_parallel_inputs(), {}
    for tp, pp, cp in COMBINED_LAYOUTS:
        model = MegatronExtModel.from_checkpoint(checkpoint, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                                                 context_parallel_size=cp)
        case = dict(data_parallel_size=model.data_parallel.size,
                    logits={name: model.logits(*inputs[name]) for name in ("pose_rows", "odd")})
        if (tp, pp) == (1, 1):
            case |= {task: TASKS[task].evaluate(model, settings).to_json()
                     for task, settings in combined_settings().items()}
        results[(tp, pp, cp)] = case
        ps.destroy_model_parallel()
    if torch.distributed.get_rank() == 0:
        torch.save(dict(inputs=inputs, results=results), out)


if __name__ == "__main__":
    if sys.argv[1] == "spread":
        run_spread(*sys.argv[2:5])
    elif sys.argv[1] == "combined":
        run_combined(*sys.argv[2:4])
    else:
        run(sys.argv[1], sys.argv[2])
