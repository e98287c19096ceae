"""LongContextGPTModel on one rank: stock RoPE when bases are equal, per-head bases otherwise, and bad settings."""

import pytest
import torch
import torch.nn.functional as F

from megatron_ext.models import LongContextGPTModel, LongContextTransformerConfig, local_layer_spec
from megatron_ext.models.core_attention import SDPACoreAttention
from megatron_ext.rope import RopeConfig

VOCAB, SEQ = 96, 24
SHAPE = dict(num_layers=2, hidden_size=64, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=96)
FLAGS = dict(
    use_cpu_initialization=True, normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
    add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, bias_activation_fusion=False,
    bias_dropout_fusion=False, masked_softmax_fusion=False, gradient_accumulation_fusion=False,
    apply_rope_fusion=False, persist_layer_norm=False,
)


def long_context_model(rope, **overrides):
    torch.manual_seed(0)
    config = LongContextTransformerConfig(**{**SHAPE, **FLAGS, **overrides}, rope=rope)
    return LongContextGPTModel(config, local_layer_spec(), VOCAB, SEQ)


def stock_model(rotary_base, **gpt_kwargs):
    """megatron's own GPTModel with its RotaryEmbedding: the reference (runs on CPU only with the opt-in)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_ext.compat import enable_stock_rope_on_cpu

    enable_stock_rope_on_cpu()

    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    torch.manual_seed(0)
    return GPTModel(TransformerConfig(**SHAPE, **FLAGS), spec, VOCAB, SEQ,
                    position_embedding_type="rope", rotary_base=rotary_base, **gpt_kwargs)


def logits(model, position_ids):
    tokens = torch.arange(2 * SEQ).reshape(2, SEQ) % VOCAB
    return model(tokens, position_ids, None)


ARANGE = torch.arange(SEQ).expand(2, SEQ)


@pytest.mark.parametrize("rope", [
    RopeConfig(base=50000.0),
    RopeConfig(head_base_strategy="constant", head_base_params={"base": 50000.0}),
    RopeConfig(head_base_strategy="explicit", head_base_params={"bases": [50000.0] * 4}),
])
def test_equal_bases_match_stock_gpt_model(single_rank, rope):
    stock = stock_model(50000)
    ours = long_context_model(rope)
    ours.load_state_dict(stock.state_dict(), strict=False)
    assert (logits(ours, ARANGE) - logits(stock, ARANGE)).abs().max().item() <= 1e-5


def test_linear_scaling_matches_stock_seq_len_interpolation(single_rank):
    stock = stock_model(10000, seq_len_interpolation_factor=4.0)
    ours = long_context_model(RopeConfig(scaling="linear", scaling_params={"factor": 4.0}))
    ours.load_state_dict(stock.state_dict(), strict=False)
    assert (logits(ours, ARANGE) - logits(stock, ARANGE)).abs().max().item() <= 1e-5


def test_distinct_bases_change_the_output_and_each_layer_holds_them(single_rank):
    bases = [1e4, 1e5, 1e6, 5e6]
    harpe = long_context_model(RopeConfig(head_base_strategy="explicit", head_base_params={"bases": bases}))
    stock = long_context_model(RopeConfig(base=1e4))
    harpe.load_state_dict(stock.state_dict())
    for layer in harpe.decoder.layers:
        assert layer.self_attention.rotary.local_bases.tolist() == bases
    # small-init attention is nearly uniform, so the effect is small, but far above the <= 1e-5
    # agreement of equal bases with stock RoPE
    far = ARANGE + 20_000
    assert (logits(harpe, far) - logits(stock, far)).abs().max().item() > 1e-4


def test_positions_shared_by_the_batch_equal_per_sample_positions(single_rank):
    harpe = long_context_model(RopeConfig(head_base_strategy="uniform",
                                          head_base_params={"b_min": 1e4, "b_max": 1e6}))
    ids = torch.arange(100, 100 + SEQ)
    shared = logits(harpe, ids.expand(2, SEQ))
    per_sample = logits(harpe, torch.stack([ids, ids.clone()]))
    torch.testing.assert_close(shared, per_sample, rtol=0, atol=0)
    shifted = logits(harpe, torch.stack([ids, ids + 7]))  # second sample moved: its output changes
    assert torch.equal(shifted[0], shared[0]) and not torch.allclose(shifted[1], shared[1])


def test_missing_position_ids_is_a_clear_error(single_rank):
    model = long_context_model(RopeConfig())
    with pytest.raises(ValueError, match="position_ids on every pipeline stage"):
        model(torch.zeros(1, SEQ, dtype=torch.long), None, None)


@pytest.mark.parametrize("rope, overrides, message", [
    (RopeConfig(head_base_strategy="explicit", head_base_params={"bases": [1e4, 2e4, 3e4]}), {}, "length|4"),
    (RopeConfig(head_base_strategy="explicit", head_base_params={"bases": [1e4, -1.0, 3e4, 4e4]}), {}, "> 1"),
    (RopeConfig(head_base_strategy="zigzag"), {}, "zigzag"),
    (RopeConfig(scaling="superyarn"), {}, "superyarn"),
    (RopeConfig(scaling="linear"), {}, "factor"),
    (RopeConfig(), dict(num_attention_heads=6, num_query_groups=6, hidden_size=60, tensor_model_parallel_size=4),
     "tensor_model_parallel_size"),
    (RopeConfig(), dict(apply_rope_fusion=True), "apply_rope_fusion"),
])
def test_bad_settings_fail_at_construction_naming_the_setting(rope, overrides, message):
    with pytest.raises(ValueError, match=message):
        LongContextTransformerConfig(**{**SHAPE, **FLAGS, **overrides}, rope=rope)
