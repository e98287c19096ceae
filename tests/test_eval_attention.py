"""Attention diagnostics: entropy and JS divergence against numpy formulas, and the captured attention against
what the models really compute (Hugging Face's eager attention weights; megatron's attention output)."""

import numpy as np
import pytest
import torch

from megatron_ext.eval.attention import attention_entropy, evaluate_attention, js_divergence
from megatron_ext.data.prompts import PASSKEY_FILLER, filler_tokens, passkey_prompt
from megatron_ext.eval.settings import AttentionSettings

pytest_plugins = ["test_eval_support"]

DISTRIBUTIONS = np.array([
    [0.5, 0.5, 0.0, 0.0],
    [1.0, 0.0, 0.0, 0.0],
    [0.25, 0.25, 0.25, 0.25],
    [0.1, 0.2, 0.3, 0.4],
    [0.0, 0.0, 0.0, 1.0],
])


def numpy_entropy(p):
    nonzero = p[p > 0]
    return float(-(nonzero * np.log(nonzero)).sum())


def numpy_kl(p, q):
    support = p > 0
    return float((p[support] * np.log(p[support] / q[support])).sum())


def test_entropy_matches_the_numpy_formula_and_known_values():
    got = attention_entropy(torch.tensor(DISTRIBUTIONS, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(got, [numpy_entropy(p) for p in DISTRIBUTIONS], rtol=1e-12)
    np.testing.assert_allclose(got[:3], [np.log(2), 0.0, np.log(4)], rtol=1e-12)


def test_js_divergence_matches_the_numpy_formula_and_known_values():
    p = torch.tensor(DISTRIBUTIONS, dtype=torch.float64)
    q = p.roll(1, dims=0)
    got = js_divergence(p, q).numpy()
    expected = []
    for a, b in zip(DISTRIBUTIONS, q.numpy()):
        m = (a + b) / 2
        expected.append(numpy_kl(a, m) / 2 + numpy_kl(b, m) / 2)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    # identical: 0; disjoint supports: ln 2; symmetric
    assert js_divergence(p, p).abs().max().item() == 0.0
    assert js_divergence(p[1], p[4]).item() == pytest.approx(np.log(2), rel=1e-12)
    torch.testing.assert_close(js_divergence(q, p), js_divergence(p, q), rtol=0, atol=0)


def passkey_tokens(tokenizer, length=240):
    prompt = passkey_prompt(tokenizer, length, key=4711, depth=0.3, filler=filler_tokens(tokenizer, PASSKEY_FILLER))
    return torch.tensor([prompt.tokens]), torch.arange(prompt.answer_start - 1, length - 1)


def test_hf_captured_attention_equals_eager_attention_weights(tiny_llama, llama_dir):
    from transformers import AutoModelForCausalLM

    tokens, rows = passkey_tokens(tiny_llama.tokenizer)
    captured = tiny_llama.attention_probs(tokens, rows)
    eager = AutoModelForCausalLM.from_pretrained(llama_dir, local_files_only=True, attn_implementation="eager")
    with torch.no_grad():
        weights = eager(tokens, output_attentions=True).attentions
    assert len(captured) == len(weights) == 2
    for mine, theirs in zip(captured, weights):
        torch.testing.assert_close(mine, theirs[:, :, rows], rtol=1e-5, atol=1e-6)


def test_megatron_captured_attention_reproduces_the_attention_output(tiny_megatron):
    """probs @ V at the captured rows must equal the core attention's own output there (GQA: 4 heads, 2 groups)."""
    tokens, rows = passkey_tokens(tiny_megatron.tokenizer)
    seen = {}

    def keep(layer, module, args, output):
        seen[layer] = (args[2], output)  # value [s, b, g, d], context [s, b, h*d]

    layers = tiny_megatron.model.decoder.layers
    handles = [layer.self_attention.core_attention.register_forward_hook(
        lambda m, a, o, i=i: keep(i, m, a, o)) for i, layer in enumerate(layers)]
    try:
        captured = tiny_megatron.attention_probs(tokens, rows)
    finally:
        for handle in handles:
            handle.remove()
    for layer, probs in enumerate(captured):
        value, context = seen[layer]
        heads, groups = probs.size(1), value.size(2)
        value = value.permute(1, 2, 0, 3).repeat_interleave(heads // groups, dim=1)  # [b, h, s, d]
        expected = context[rows].reshape(len(rows), 1, heads, -1).permute(1, 2, 0, 3)  # [b, h, r, d]
        torch.testing.assert_close(probs @ value, expected, rtol=1e-4, atol=1e-5)
        assert probs[..., rows.max() + 1:].abs().max() == 0  # causal: no weight on later keys


def test_attention_against_itself_has_zero_divergence_and_one_plot_per_layer(tiny_llama, tmp_path):
    settings = AttentionSettings(lengths=[200, 260], trials=2)
    result = evaluate_attention(tiny_llama, settings, reference=tiny_llama)
    assert [(s.length, s.layer) for s in result.layers] == [(200, 0), (200, 1), (260, 0), (260, 1)]
    for stats in result.layers:
        assert max(stats.js_divergence) < 1e-9
        np.testing.assert_allclose(stats.entropy, stats.reference_entropy, rtol=1e-9)
        assert all(0 < h < np.log(260) for h in stats.entropy) and all(0 <= m <= 1 for m in stats.needle_mass)
    paths = result.write_plots(tmp_path)
    assert [p.name for p in paths] == ["attention_layer0.png", "attention_layer1.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
    assert "JS max (head)" in result.table()
