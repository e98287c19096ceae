"""Model-size arithmetic shared by the planner, the training logger and the model builder: the padded
vocabulary, the parameters that multiply activations, model FLOPs per token, device peak FLOP/s.

Standard library only.

FLOP formula (PaLM, Chowdhery et al. 2022, App. B), for one token of a training step
(forward + backward = 3 x forward):
    flops_per_token = 6 * N + 12 * L * h * s
N: parameters that multiply activations (all but the input embedding table; the output
layer counts), L: layers, h: hidden size, s: sequence length (the trained window). The
second term is attention's QK^T and AV, counted without the causal half, as PaLM and
Megatron do. MFU = achieved model FLOP/s / (peak FLOP/s of one device x devices).
"""


def padded_vocab_size(vocab_size: int, tp_size: int, multiple: int = 128) -> int:
    """Round the vocabulary up to a multiple of 128 x TP (as Megatron-LM does): even TP shards, fast GEMMs."""
    step = multiple * tp_size
    return -(-vocab_size // step) * step


# dense bf16 peak, TFLOP/s per device (vendor data sheets)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "B200": 2250.0}


def matmul_parameters(num_layers, hidden_size, ffn_hidden_size, num_attention_heads, num_query_groups,
                      vocab_size, swiglu=True) -> int:
    """Parameters in weight matrices that multiply activations (norms and the embedding lookup excluded)."""
    head_dim = hidden_size // num_attention_heads
    kv = num_query_groups * head_dim
    attention = hidden_size * (hidden_size + 2 * kv) + hidden_size * hidden_size
    mlp = hidden_size * ffn_hidden_size * (3 if swiglu else 2)
    return num_layers * (attention + mlp) + vocab_size * hidden_size


def flops_per_token(n_matmul_params, num_layers, hidden_size, seq_length) -> float:
    return 6.0 * n_matmul_params + 12.0 * num_layers * hidden_size * seq_length


def peak_tflops(device_name: str | None) -> float | None:
    if not device_name:
        return None
    for key, value in PEAK_TFLOPS.items():
        if key in device_name.upper():
            return value
    return None
