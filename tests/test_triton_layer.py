"""The GPU layer path: the Triton rotary inside a megatron transformer layer, and SDPA's grouped-query call.

On CPU the kernel runs in Triton's interpreter; tests marked gpu check the compiled path and that the
local (no Transformer Engine) layer runs torch's flash attention in bf16.
"""

import pytest
import torch
import torch.nn.functional as F

from megatron_ext.models import core_attention
from megatron_ext.models import provider as provider_module
from megatron_ext.rope.apply import apply_rotary_qk


def build_layer(*, heads=4, groups=2, hidden=32, use_te=False, dtype=torch.float32, device="cpu"):
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.spec_utils import build_module

    from megatron_ext.models import LongContextTransformerConfig, layer_spec
    from megatron_ext.rope import RopeConfig

    config = LongContextTransformerConfig(
        num_layers=1, hidden_size=hidden, num_attention_heads=heads, num_query_groups=groups,
        ffn_hidden_size=2 * hidden, use_cpu_initialization=device == "cpu", params_dtype=dtype,
        pipeline_dtype=dtype, bf16=dtype == torch.bfloat16, normalization="RMSNorm", gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, apply_rope_fusion=False, persist_layer_norm=False,
        rope=RopeConfig(head_base_strategy="uniform", head_base_params={"b_min": 1e4, "b_max": 5e6}),
    )
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    return build_module(layer_spec(use_transformer_engine=use_te), config=config, layer_number=1).to(device, dtype)


def forward_backward(layer, hidden, position_ids):
    hidden = hidden.detach().requires_grad_()
    out, _ = layer(hidden, attention_mask=None, rotary_pos_emb=position_ids)
    out.backward(torch.ones_like(out))
    grads = [hidden.grad] + [p.grad for p in layer.parameters()]
    layer.zero_grad(set_to_none=True)
    return out.detach(), grads


def test_layer_with_the_kernel_equals_the_layer_with_the_torch_rotation(single_rank, monkeypatch):
    pytest.importorskip("triton", reason="triton is not installed: pip install triton (CI installs it)")
    layer = build_layer()
    torch.manual_seed(1)
    hidden = torch.randn(12, 2, 32)
    position_ids = torch.randint(0, 40_000, (2, 12))  # PoSE-like ids, one row per sample
    reference = forward_backward(layer, hidden, position_ids)
    calls = []

    def through_the_kernel(*args, **kwargs):
        calls.append(kwargs)
        return apply_rotary_qk(*args, **kwargs, backend="triton")

    monkeypatch.setattr(provider_module, "apply_rotary_qk", through_the_kernel)
    kernel = forward_backward(layer, hidden, position_ids)
    assert len(calls) == 1
    torch.testing.assert_close(kernel[0], reference[0], rtol=1e-5, atol=1e-5)
    for got, want in zip(kernel[1], reference[1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_grouped_query_sdpa_without_enable_gqa_repeats_key_and_value(monkeypatch):
    """torch 2.4 has no enable_gqa: the fallback must compute the same attention."""
    torch.manual_seed(2)
    q, k, v = torch.randn(2, 6, 9, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1),
                                              is_causal=True)
    for has_gqa in (True, False):
        monkeypatch.setattr(core_attention, "SDPA_HAS_GQA", has_gqa)
        torch.testing.assert_close(core_attention.grouped_sdpa(q, k, v, is_causal=True), expected)


@pytest.mark.gpu
def test_local_layer_runs_flash_attention_in_bf16_with_the_kernel(single_rank):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from megatron_ext.rope.apply import rotary_backend

    layer = build_layer(heads=32, groups=8, hidden=4096, dtype=torch.bfloat16, device="cuda")
    hidden = torch.randn(8192, 1, 4096, device="cuda", dtype=torch.bfloat16)
    position_ids = torch.arange(8192, device="cuda").unsqueeze(0)
    assert rotary_backend(hidden) == "triton"
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if flash cannot take our q, k, v
        out, grads = forward_backward(layer, hidden, position_ids)
    assert torch.isfinite(out.float()).all() and all(torch.isfinite(g.float()).all() for g in grads)
