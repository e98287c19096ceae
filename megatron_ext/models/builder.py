"""Build a LongContextGPTModel from a TrainConfig, fresh (the training loop) or from a saved checkpoint
(evaluation, the tests of conversion), and the converters' weightless skeleton via `transformer_config`.

The one place that maps our config onto megatron's TransformerConfig, DistributedDataParallelConfig and
OptimizerConfig: the training loop and `plan --simulate` build from the same functions.
"""

import torch
import torch.nn.functional as F

from megatron_ext.config import TrainConfig


def precision(config: TrainConfig, device) -> torch.dtype:
    choice = config.training.precision
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if choice == "bf16" else torch.float32


# parallel.cp_comm_type -> TransformerConfig.cp_comm_type: megatron-LM's command line says "allgather",
# megatron-core and Transformer Engine say "all_gather".
CP_COMM_TYPES = {"p2p": "p2p", "a2a": "a2a", "allgather": "all_gather", "a2a+p2p": "a2a+p2p"}


def context_parallel_fields(config: TrainConfig, *, transformer_engine: bool) -> dict:
    """TransformerConfig's cp_comm_type (None at CP=1: there is nothing to exchange).

    megatron passes it to each layer's core attention: Transformer Engine's DotProductAttention runs the
    ring (p2p), Ulysses all-to-all (a2a), K/V all-gather or the hierarchical a2a+p2p, the last over megatron's
    hierarchical CP groups. All of them take the zig-zag (DualChunkSwap) token layout, so
    `batch_on_this_rank` slices tokens and position ids alike for every type. The SDPA attention of the
    local spec (CPU, GPU without TE) always all-gathers K/V, whatever the type."""
    from megatron.core import parallel_state as ps

    from megatron_ext.config import ConfigError

    p = config.parallel
    if p.context_parallel_size == 1:
        return dict(cp_comm_type=None)
    if (transformer_engine and p.cp_comm_type == "a2a+p2p"
            and ps.get_hierarchical_context_parallel_groups(check_initialized=False) is None):
        raise ConfigError("parallel.cp_comm_type=a2a+p2p: megatron's hierarchical context-parallel groups were not "
                          "created (initialize_model_parallel(hierarchical_context_parallel_sizes=...)): use p2p "
                          "or a2a until the process setup creates them")
    return dict(cp_comm_type=CP_COMM_TYPES[p.cp_comm_type])


def fp8_fields(config: TrainConfig, device) -> dict:
    """TransformerConfig's fp8 fields where FP8 runs; {} with training.fp8=off, and on a machine without
    Transformer Engine on CUDA, where training refuses FP8 first (check_fp8_machine) and evaluation and
    conversion run the bf16 weights."""
    t = config.training
    if t.fp8_format is None or not fp8_runs_here(device):
        return {}
    return dict(fp8=t.fp8_format, fp8_recipe=t.fp8_recipe, fp8_amax_history_len=t.fp8_amax_history_len,
                fp8_amax_compute_algo=t.fp8_amax_compute_algo, fp8_margin=t.fp8_margin)


def fp8_runs_here(device) -> bool:
    """FP8 GEMMs need Transformer Engine's modules on a CUDA device: megatron's fp8_autocast wraps TE modules."""
    from megatron_ext.models.specs import transformer_engine_available

    return device.type == "cuda" and transformer_engine_available()


def check_fp8_machine(config: TrainConfig, device) -> None:
    """Training's refusal of an FP8 setting this machine cannot run: no TE on CUDA, mxfp8 without a Blackwell
    GPU, tensorwise with TE < 2.2."""
    from megatron_ext.config import ConfigError

    t = config.training
    if t.fp8_format is None:
        return
    if not fp8_runs_here(device):
        where = "this machine has no CUDA device" if device.type != "cuda" else "Transformer Engine does not import"
        raise ConfigError(f"training.fp8={t.fp8} runs FP8 GEMMs in Transformer Engine, but {where}: "
                          "set training.fp8=off, or run on a GPU with transformer_engine installed")
    if t.fp8_recipe == "mxfp8" and torch.cuda.get_device_capability(device)[0] < 10:
        raise ConfigError(f"training.fp8_recipe=mxfp8 needs a Blackwell GPU (compute capability 10+), not "
                          f"{torch.cuda.get_device_name(device)}: use fp8_recipe=delayed or tensorwise")
    if t.fp8_recipe == "tensorwise":
        from megatron.core.utils import is_te_min_version

        if not is_te_min_version("2.2.0.dev0"):
            raise ConfigError("training.fp8_recipe=tensorwise (current scaling) needs Transformer Engine >= 2.2 "
                              "(megatron-core 0.16's own extra asks for >= 2.9): upgrade it, or use fp8_recipe=delayed")


def transformer_config(config: TrainConfig, device):
    """TrainConfig -> megatron's TransformerConfig (+ our rope section)."""
    from megatron_ext.models import LongContextTransformerConfig
    from megatron_ext.models.specs import transformer_engine_available

    m, p, t = config.model, config.parallel, config.training
    dtype = precision(config, device)
    fused = device.type == "cuda" and transformer_engine_available()
    recompute = dict(none={}, selective=dict(recompute_granularity="selective"),
                     full=dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1))
    return LongContextTransformerConfig(
        num_layers=m.num_layers, hidden_size=m.hidden_size, num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups, ffn_hidden_size=m.ffn_size,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        context_parallel_size=p.context_parallel_size, sequence_parallel=p.sequence_parallel,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        # with PP=2 a rank's previous and next stage are one rank: batched p2p ops (one tag) then pair an
        # activation with a gradient on gloo (measured: losses differ from micro-batch 3 on); megatron-LM also
        # sends them one by one with virtual stages
        batch_p2p_comm=p.virtual_pipeline_model_parallel_size is None,
        use_cpu_initialization=device.type == "cpu", params_dtype=dtype, pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16, normalization=m.normalization, layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=m.swiglu, activation_func=F.silu if m.swiglu else F.gelu, add_bias_linear=False,
        add_qkv_bias=m.qkv_bias,
        init_method_std=m.init_method_std, hidden_dropout=m.hidden_dropout, attention_dropout=m.attention_dropout,
        bias_activation_fusion=fused, bias_dropout_fusion=fused, masked_softmax_fusion=False,
        gradient_accumulation_fusion=fused, apply_rope_fusion=False, persist_layer_norm=False,
        calculate_per_token_loss=True, rope=config.rope, **recompute[t.recompute],
        **context_parallel_fields(config, transformer_engine=fused), **fp8_fields(config, device),
    )


def build_gpt(config: TrainConfig, vocab_size: int, device, *, pre_process=None, post_process=None,
              vp_stage: int | None = None):
    """The bare LongContextGPTModel of this pipeline stage (no DDP, no Float16Module), on `device`; with
    parallel.virtual_pipeline_model_parallel_size, its model chunk `vp_stage`."""
    from megatron.core import parallel_state as ps

    from megatron_ext.models import LongContextGPTModel, layer_spec

    tc = transformer_config(config, device)
    return LongContextGPTModel(
        tc, layer_spec(normalization=config.model.normalization), vocab_size, config.model.seq_length,
        pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage) if pre_process is None
        else pre_process,
        post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage) if post_process is None
        else post_process,
        share_embeddings_and_output_weights=config.model.tie_embeddings, vp_stage=vp_stage,
    ).to(device)


def load_model(checkpoint, device, *, precision_override: str | None = None, setting: str = "--model"):
    """(model, TrainConfig, CheckpointState) from a checkpoint argument (run dir, root, iter_ dir, or the
    SavedCheckpoint one resolved to, which is not resolved again), built for whatever TP/PP/CP megatron's parallel
    state has now (dist_checkpointing reshards). Weights only; eval mode."""
    from megatron.core import parallel_state as ps

    from megatron_ext.checkpoint.state import SavedCheckpoint, read_checkpoint
    from megatron_ext.checkpoint.store import load_checkpoint

    saved = checkpoint if isinstance(checkpoint, SavedCheckpoint) else read_checkpoint(checkpoint, setting=setting)
    config = saved.state.config
    if precision_override:
        config.training.precision = precision_override
    config.training.fp8 = "off"  # evaluation runs the bf16 weights; FP8 is a training-time GEMM format
    # build for the layout we run now (megatron derives layers per stage from these), not the saved one
    config.parallel.tensor_model_parallel_size = ps.get_tensor_model_parallel_world_size()
    config.parallel.pipeline_model_parallel_size = ps.get_pipeline_model_parallel_world_size()
    config.parallel.context_parallel_size = ps.get_context_parallel_world_size()
    config.parallel.virtual_pipeline_model_parallel_size = None  # one model chunk per stage
    config.parallel.sequence_parallel = False  # inference reads whole sequences; the weights do not depend on it
    # the training run's CP exchange (its a2a groups) need not fit this layout: the ring fits any
    config.parallel.cp_comm_type, config.parallel.hierarchical_context_parallel_sizes = "p2p", None
    model = build_gpt(config, saved.state.padded_vocab_size, device)  # the saved embedding's row count
    load_checkpoint(saved.path, model=[model], restore_rng=False, setting=setting)
    return model.eval(), config, saved.state


def ddp_config(config: TrainConfig):
    """megatron's DistributedDataParallelConfig: fp32 gradient reduction, and the overlap settings.

    overlap_grad_reduce: each bucket of gradients is reduced (all-reduce, or reduce-scatter for the distributed
    optimizer) asynchronously as soon as the backward has produced it; finalize_model_grads waits for them.
    overlap_param_gather: the distributed optimizer's step leaves the weight all-gather to forward pre-hooks,
    which gather bucket by bucket during the next forward."""
    from megatron.core.distributed import DistributedDataParallelConfig

    p = config.parallel
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=p.use_distributed_optimizer,
        overlap_grad_reduce=p.overlap_grad_reduce, overlap_param_gather=p.overlap_param_gather,
        align_param_gather=False, bucket_size=p.ddp_bucket_size,
    )


def optimizer_config(config: TrainConfig, tc):
    """megatron's OptimizerConfig (Adam) for a model whose TransformerConfig is `tc`."""
    from megatron.core.optimizer import OptimizerConfig

    o, p = config.optimizer, config.parallel
    return OptimizerConfig(optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
                           adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
                           clip_grad=o.clip_grad, bf16=tc.bf16, params_dtype=tc.params_dtype,
                           use_distributed_optimizer=p.use_distributed_optimizer,
                           overlap_param_gather=p.overlap_param_gather)
