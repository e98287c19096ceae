"""The FLOP formula behind tokens/s -> TFLOP/s -> MFU, against hand arithmetic."""

import pytest

from megatron_ext.sizes import flops_per_token, matmul_parameters, peak_tflops


def test_llama2_7b_matmul_parameters_by_hand():
    # per layer: q,k,v,o = 4 * 4096^2; SwiGLU = 3 * 4096 * 11008; 32 layers; output layer 32000 * 4096
    by_hand = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) + 32000 * 4096
    assert matmul_parameters(32, 4096, 11008, 32, 32, 32000) == by_hand == 6_607_077_376


def test_gqa_shrinks_only_the_key_value_projections():
    mha = matmul_parameters(1, 4096, 14336, 32, 32, 0)
    gqa = matmul_parameters(1, 4096, 14336, 32, 8, 0)
    assert mha - gqa == 2 * 4096 * (4096 - 8 * 128)


def test_flops_per_token_is_six_n_plus_the_attention_term():
    n = 6_607_077_376
    assert flops_per_token(n, 32, 4096, 131072) == 6 * n + 12 * 32 * 4096 * 131072
    # at 128k the attention term is ~5x the dense term for a 7B model
    assert (12 * 32 * 4096 * 131072) / (6 * n) == pytest.approx(5.20, abs=0.01)


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                        ("Some CPU", None), (None, None)])
def test_peak_lookup(name, peak):
    assert peak_tflops(name) == peak
