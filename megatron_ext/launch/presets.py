"""Model shapes, methods and GPU data the planner knows by name.

Model shapes are the Hugging Face `config.json` of each checkpoint, as our ModelConfig's fields.
GPU numbers are vendor data sheets; link bandwidths are what NCCL reaches, not the nominal rate.
Light on purpose (no torch, no megatron): the command line lists these names when it starts.
"""

from dataclasses import dataclass

from megatron_ext.launch.errors import LaunchError
from megatron_ext.sizes import PEAK_TFLOPS

# How RoPE is trained: harpe = full length, one base per KV group; pose = a short window whose position
# ids span the full length; rope = full length, one base (stock RoPE, PI, YaRN, ABF...).
METHODS = ("harpe", "pose", "rope")


def _llama(layers, hidden, heads, kv_heads, ffn, vocab) -> dict:
    return dict(num_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_query_groups=kv_heads,
                ffn_hidden_size=ffn, vocab_size=vocab)


# name -> ModelConfig fields (seq_length is set by the plan request)
MODELS = {
    "llama2-7b": _llama(32, 4096, 32, 32, 11008, 32000),     # meta-llama/Llama-2-7b-hf
    "llama2-13b": _llama(40, 5120, 40, 40, 13824, 32000),    # meta-llama/Llama-2-13b-hf
    "llama2-70b": _llama(80, 8192, 64, 8, 28672, 32000),     # meta-llama/Llama-2-70b-hf
    "llama3-8b": _llama(32, 4096, 32, 8, 14336, 128256),     # meta-llama/Meta-Llama-3-8B
    "llama3-70b": _llama(80, 8192, 64, 8, 28672, 128256),    # meta-llama/Meta-Llama-3-70B
    "mistral-7b": _llama(32, 4096, 32, 8, 14336, 32000),     # mistralai/Mistral-7B-v0.1
    "qwen2-7b": _llama(28, 3584, 28, 4, 18944, 152064),      # Qwen/Qwen2-7B (its q/k/v biases, 0.01%, left out)
}


def model_preset(name: str):
    """The ModelConfig of a preset."""
    from megatron_ext.config import ModelConfig

    if name not in MODELS:
        raise LaunchError(f"unknown model {name!r}: pick one of {', '.join(sorted(MODELS))}, or give --config")
    return ModelConfig(**MODELS[name])


@dataclass(frozen=True)
class GPU:
    """One accelerator and the links between accelerators.

    memory_gib:    what CUDA reports as total memory.
    nvlink_gbs:    bus bandwidth (GB/s) NCCL reaches inside a node, per GPU (nccl-tests' "busbw").
    network_gbs:   the same between nodes (one NIC per GPU).
    """

    name: str
    memory_gib: float
    peak_tflops: float  # dense bf16
    nvlink_gbs: float
    network_gbs: float
    gpus_per_node: int = 8


# FP8 GEMMs: H100/H200 run dense FP8 at twice their bf16 peak (1979 vs 989 TFLOP/s, NVIDIA's data sheet); what
# the transformer layers' GEMMs gain end to end (quantization, amax bookkeeping, GEMM shapes) is an assumption.
FP8_GEMM_SPEEDUP = 1.5

GPUS = {
    # H100 SXM5 80 GB: 989 TFLOP/s bf16 dense; NVLink 4 is 450 GB/s per direction (we assume 80%: 360);
    # one 400 Gb/s NDR NIC per GPU is 50 GB/s (80%: 40).
    "h100-80gb": GPU("h100-80gb", 79.6, PEAK_TFLOPS["H100"], 360.0, 40.0),
    # H200 SXM 141 GB: the H100's compute and links, more (and faster) memory.
    "h200-141gb": GPU("h200-141gb", 139.8, PEAK_TFLOPS["H200"], 360.0, 40.0),
    # A100 SXM4 80 GB: 312 TFLOP/s; NVLink 3 is 300 GB/s per direction (240); 200 Gb/s HDR per GPU (20).
    "a100-80gb": GPU("a100-80gb", 79.2, PEAK_TFLOPS["A100"], 240.0, 20.0),
}
