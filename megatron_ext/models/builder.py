"""Build a LongContextGPTModel from a TrainConfig, fresh (the training loop) or from a saved checkpoint
(evaluation, the tests of conversion), and the converters' weightless skeleton via `transformer_config`.

The one place that maps our config onto megatron's TransformerConfig.
"""

import torch
import torch.nn.functional as F

from megatron_ext.config import TrainConfig


def precision(config: TrainConfig, device) -> torch.dtype:
    choice = config.training.precision
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if choice == "bf16" else torch.float32


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
        use_cpu_initialization=device.type == "cpu", params_dtype=dtype, pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16, normalization=m.normalization, layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=m.swiglu, activation_func=F.silu if m.swiglu else F.gelu, add_bias_linear=False,
        add_qkv_bias=m.qkv_bias,
        init_method_std=m.init_method_std, hidden_dropout=m.hidden_dropout, attention_dropout=m.attention_dropout,
        bias_activation_fusion=fused, bias_dropout_fusion=fused, masked_softmax_fusion=False,
        gradient_accumulation_fusion=fused, apply_rope_fusion=False, persist_layer_norm=False,
        calculate_per_token_loss=True, rope=config.rope, **recompute[t.recompute],
    )


def build_gpt(config: TrainConfig, vocab_size: int, device, *, pre_process=None, post_process=None):
    """The bare LongContextGPTModel of this pipeline stage (no DDP, no Float16Module), on `device`."""
    from megatron.core import parallel_state as ps

    from megatron_ext.models import LongContextGPTModel, layer_spec

    tc = transformer_config(config, device)
    return LongContextGPTModel(
        tc, layer_spec(normalization=config.model.normalization), vocab_size, config.model.seq_length,
        pre_process=ps.is_pipeline_first_stage() if pre_process is None else pre_process,
        post_process=ps.is_pipeline_last_stage() if post_process is None else post_process,
        share_embeddings_and_output_weights=config.model.tie_embeddings,
    ).to(device)


def load_model(checkpoint, device, *, precision_override: str | None = None, setting: str = "--model"):
    """(model, TrainConfig, CheckpointState) from a checkpoint argument (run dir, root, iter_ dir), built for
    whatever TP/PP/CP megatron's parallel state has now (dist_checkpointing reshards). Weights only; eval mode."""
    from megatron.core import parallel_state as ps

    from megatron_ext.checkpoint.state import read_checkpoint
    from megatron_ext.checkpoint.store import load_checkpoint

    saved = read_checkpoint(checkpoint, setting=setting)
    config = saved.state.config
    if precision_override:
        config.training.precision = precision_override
    # build for the layout we run now (megatron derives layers per stage from these), not the saved one
    config.parallel.tensor_model_parallel_size = ps.get_tensor_model_parallel_world_size()
    config.parallel.pipeline_model_parallel_size = ps.get_pipeline_model_parallel_world_size()
    config.parallel.context_parallel_size = ps.get_context_parallel_world_size()
    config.parallel.sequence_parallel = False  # inference reads whole sequences; the weights do not depend on it
    model = build_gpt(config, saved.state.padded_vocab_size, device)  # the saved embedding's row count
    load_checkpoint(saved.path, model=[model], restore_rng=False, setting=setting)
    return model.eval(), config, saved.state
