"""transformers' HARPE model (megatron_ext.hf) goes through transformers' attention interface: eager, sdpa and any
registered attention function (FlashAttention on GPU, vLLM's Transformers backend) see rotated queries and keys."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

BASES = [100.0, 50000.0]


@pytest.fixture(scope="module")
def harpe_export(tmp_path_factory):
    """A random GQA Llama saved by transformers, its RoPE set to HARPE bases as megatron_ext writes them."""
    from megatron_ext.rope.hf_forms import rope_to_hf, set_hf_rope
    from megatron_ext.rope import RopeConfig

    out = tmp_path_factory.mktemp("hf_harpe")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    hf = json.loads((out / "config.json").read_text())
    rope = RopeConfig(scaling="yarn", scaling_params={"factor": 4.0, "original_max_position_embeddings": 16},
                      head_base_strategy="explicit", head_base_params={"bases": BASES})
    set_hf_rope(hf, rope_to_hf(rope, num_query_groups=2, head_dim=16), "rope_parameters")
    (out / "config.json").write_text(json.dumps(hf))
    return out


def _logits(export, implementation, tokens):
    from megatron_ext.hf import load_harpe_model

    model = load_harpe_model(str(export), dtype=torch.float32, attn_implementation=implementation).eval()
    with torch.no_grad():
        return model(tokens).logits


def test_eager_sdpa_and_a_registered_attention_function_agree(harpe_export):
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    calls = []

    def counting_attention(module, query, key, value, attention_mask, **kwargs):
        calls.append((query.shape, key.shape))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("megatron_ext_counting", counting_attention)
    tokens = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    eager = _logits(harpe_export, "eager", tokens)
    sdpa = _logits(harpe_export, "sdpa", tokens)
    registered = _logits(harpe_export, "megatron_ext_counting", tokens)
    torch.testing.assert_close(sdpa, eager, rtol=0, atol=1e-5)
    torch.testing.assert_close(registered, eager, rtol=0, atol=1e-5)
    assert len(calls) == 2 and calls[0] == (torch.Size([2, 4, 40, 16]), torch.Size([2, 2, 40, 16]))


def test_the_attention_function_receives_keys_rotated_per_group(harpe_export):
    """The keys handed to the attention function are the projections rotated with each group's own base."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from megatron_ext.hf import load_harpe_model
    from megatron_ext.rope import apply_rotary, rope_inv_freq

    seen = {}

    def keeping_attention(module, query, key, value, attention_mask, **kwargs):
        seen.setdefault("key", key)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("megatron_ext_keeping", keeping_attention)
    model = load_harpe_model(str(harpe_export), dtype=torch.float32, attn_implementation="megatron_ext_keeping").eval()
    tokens = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(2))
    captured = {}
    layer = model.model.layers[0]
    layer.input_layernorm.register_forward_hook(lambda m, i, o: captured.setdefault("normed", o))
    with torch.no_grad():
        model(tokens)
        raw_key = layer.self_attn.k_proj.weight @ captured["normed"][0].T  # [2 * 16, 30], before any hook
    positions = torch.arange(30)[None]
    for group, base in enumerate(BASES):
        inv_freq, factor = rope_inv_freq("yarn", base=base, dim=16, factor=4.0, original_max_position_embeddings=16)
        head = raw_key[group * 16:(group + 1) * 16].T[:, None, None]  # [s, b=1, h=1, d]
        expected = apply_rotary(head, positions, inv_freq, mscale=factor)[:, 0, 0]
        torch.testing.assert_close(seen["key"][0, group], expected, rtol=0, atol=1e-5)
