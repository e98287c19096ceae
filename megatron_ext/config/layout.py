"""The rules a parallel layout must meet to run at all, written once for the three places that check them:
`validate` (the config alone), the `train` command (with the ranks it is about to start) and the planner
(every layout it enumerates). Each problem is one sentence naming the setting, its value and what it meets.

Imports nothing: plain numbers in, sentences out.
"""
from __future__ import annotations


def layout_problems(*, heads: int, kv_groups: int, layers: int, seq_length: int, global_batch_size: int,
                    micro_batch_size: int, tp: int, pp: int, cp: int, dp: int = 1,
                    ranks: int | None = None) -> list[str]:
    """Why megatron-core (or our trainer) cannot run TP x PP x CP x DP on `ranks` processes; [] if it can.

    ranks=None checks the model split and the batch at DP=`dp` only (a config before its ranks are known)."""
    model_parallel = tp * pp * cp
    checks = [
        (heads % tp == 0,
         f"parallel.tensor_model_parallel_size ({tp}) must divide the {heads} attention heads "
         "(model.num_attention_heads)"),
        (kv_groups % tp == 0,
         f"parallel.tensor_model_parallel_size ({tp}) must divide the {kv_groups} KV groups (model.num_query_groups): "
         "every TP rank holds whole KV groups, each with its RoPE base"),
        (layers % pp == 0,
         f"parallel.pipeline_model_parallel_size ({pp}) must divide the {layers} layers (model.num_layers)"),
        (cp == 1 or seq_length % (2 * cp) == 0,
         f"model.seq_length ({seq_length}) must divide by 2 x CP = {2 * cp} (parallel.context_parallel_size "
         f"{cp}) for the zig-zag split"),
    ]
    if ranks is not None:
        checks += [
            (ranks % model_parallel == 0,
             f"TP x PP x CP = {tp} x {pp} x {cp} = {model_parallel} does not divide the {ranks} ranks: start a "
             f"multiple of {model_parallel} ranks, or change parallel.tensor_model_parallel_size / "
             "pipeline_model_parallel_size / context_parallel_size"),
            (ranks % model_parallel != 0 or model_parallel * dp == ranks,
             f"TP x PP x CP x DP = {model_parallel * dp}, not the {ranks} ranks"),
        ]
    checks.append(
        (global_batch_size % (micro_batch_size * dp) == 0,
         f"training.global_batch_size ({global_batch_size}) must be a multiple of micro-batch x DP = "
         f"{micro_batch_size * dp} (training.micro_batch_size {micro_batch_size} x {dp} data-parallel "
         f"replica{'s' if dp > 1 else ''})"))
    return [message for ok, message in checks if not ok]


def config_layout_problems(config, ranks: int | None = None) -> list[str]:
    """layout_problems of a TrainConfig; with `ranks`, DP = ranks / (TP x PP x CP) as the run will have it."""
    m, p, t = config.model, config.parallel, config.training
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    dp = max(1, ranks // (tp * pp * cp)) if ranks else 1
    return layout_problems(heads=m.num_attention_heads, kv_groups=m.num_query_groups or m.num_attention_heads,
                           layers=m.num_layers, seq_length=m.seq_length, global_batch_size=t.global_batch_size,
                           micro_batch_size=t.micro_batch_size, tp=tp, pp=pp, cp=cp, dp=dp, ranks=ranks)
