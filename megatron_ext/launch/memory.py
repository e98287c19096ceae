"""Per-GPU memory of a layout, term by term: weights, gradients, optimizer states, activations.

Pure arithmetic (imports no megatron); every formula and its source is in docs/launch.md.
Bytes throughout. Notation: s tokens per CP rank, b micro-batch, h hidden, a heads, g KV groups,
d head dim, f FFN size, v padded vocabulary, t TP size (activations outside the TP region are split
by t only under sequence parallelism, which the planner turns on whenever t > 1).
"""

from dataclasses import dataclass

from megatron_ext.launch.workload import RECOMPUTE, Layout, Workload
from megatron_ext.rope.apply import CHUNK_ELEMENTS
from megatron_ext.sizes import matmul_parameters, padded_vocab_size

FP8, BF16, FP32 = 1, 2, 4
GIB = 1024 ** 3

# Mixed-precision Adam with megatron's fp32 main grads (our trainer sets grad_reduce_in_fp32):
# bf16 weight 2 + fp32 grad 4 + fp32 master weight 4 + Adam m 4 + Adam v 4 = 18 bytes per parameter.
WEIGHT_BYTES, GRAD_BYTES, OPTIMIZER_BYTES = BF16, FP32, 3 * FP32

# Terms that selective recompute (megatron's recompute_modules=["core_attn"]) drops: the core attention.
CORE_ATTENTION = ("attention scores (softmax output)", "attention dropout mask", "attention dropout output",
                  "flash-attention softmax statistics (fp32)")


def layer_activation_terms(work: Workload, tokens: int, micro_batch: int, tp: int, *,
                           flash_attention: bool = True, fp8: bool = False) -> dict[str, float]:
    """Activations one transformer layer keeps for its backward, one micro-batch, no recompute.

    Korthikanti et al. 2022, Sec. 4.1, one tensor per line, for a Llama-style layer (RMSNorm, GQA,
    SwiGLU or GELU MLP, optional dropout). For GPT (f = 4h, g = a, dropout on, no flash attention)
    the lines add up to the paper's s*b*h*(34 + 5*a*s/h). With FP8, Transformer Engine keeps the inputs
    of its four GEMMs (QKV, projection, FC1, FC2) quantized for the weight gradient: 1 byte each.
    """
    m = work.model
    h, a, f, d, g = m.hidden_size, m.num_attention_heads, m.ffn_size, work.head_dim, work.kv_groups
    sb = tokens * micro_batch
    inside = 1.0 / tp  # split over TP ranks
    outside = 1.0 / tp if tp > 1 else 1.0  # split over TP ranks by sequence parallelism
    attention_dropout, hidden_dropout = m.attention_dropout > 0, m.hidden_dropout > 0
    gemm_input = FP8 if fp8 else BF16
    terms = {
        "attention norm input": BF16 * sb * h * outside,
        "QKV projection input": gemm_input * sb * h * outside,
        "queries": BF16 * sb * a * d * inside,
        "keys and values": 2 * BF16 * sb * g * d * inside,
        "attention output (projection input)": gemm_input * sb * a * d * inside,
        "attention residual dropout mask": sb * h * outside * hidden_dropout,
        "MLP norm input": BF16 * sb * h * outside,
        "FC1 input": gemm_input * sb * h * outside,
        "activation input": BF16 * sb * f * (2 if m.swiglu else 1) * inside,
        "FC2 input": gemm_input * sb * f * inside,
        "MLP residual dropout mask": sb * h * outside * hidden_dropout,
    }
    if flash_attention:  # Dao et al. 2022: O(s) memory, only the log-sum-exp per query row and head
        terms["flash-attention softmax statistics (fp32)"] = FP32 * sb * a * inside
    else:  # the score matrix of this rank's queries against all keys: [b, a, s, seq_length]
        scores = sb * a * work.seq_length * inside
        terms["attention scores (softmax output)"] = BF16 * scores
        terms["attention dropout mask"] = scores * attention_dropout
        terms["attention dropout output"] = BF16 * scores * attention_dropout
    return terms


def layer_activations(work: Workload, tokens: int, micro_batch: int, tp: int, recompute: str, *,
                      flash_attention: bool = True, fp8: bool = False) -> float:
    """Bytes one layer keeps between its forward and its backward, for one micro-batch.

    none: every tensor above; selective: all but the core attention (Korthikanti Sec. 5);
    full: only the layer's input, 2*s*b*h (split by t under sequence parallelism).
    """
    if recompute == "full":
        h = work.model.hidden_size
        return BF16 * tokens * micro_batch * h / tp
    terms = layer_activation_terms(work, tokens, micro_batch, tp, flash_attention=flash_attention, fp8=fp8)
    if recompute == "selective":
        return sum(v for k, v in terms.items() if k not in CORE_ATTENTION)
    return sum(terms.values())


def layer_parameters(work: Workload) -> tuple[int, int]:
    """(parameters split over TP, replicated parameters) of one transformer layer."""
    m = work.model
    split = matmul_parameters(1, m.hidden_size, m.ffn_size, m.num_attention_heads, work.kv_groups, 0, m.swiglu)
    return split, 2 * m.hidden_size  # the two norms' weights are replicated


def stage_parameters(work: Workload, layout: Layout, stage: int) -> int:
    """Parameters held by one GPU of pipeline stage `stage`."""
    m = work.model
    split, replicated = layer_parameters(work)
    layers = m.num_layers // layout.pp
    params = layers * (split // layout.tp + replicated)
    vocab = padded_vocab_size(m.vocab_size, layout.tp) * m.hidden_size // layout.tp
    if stage == 0:
        params += vocab  # input embedding (vocabulary-parallel)
    if stage == layout.pp - 1:
        params += m.hidden_size  # final norm
        if not m.tie_embeddings or layout.pp > 1:
            params += vocab  # output layer (tied + PP > 1: the last stage keeps its own copy)
    return params


def rope_bytes(work: Workload, tokens: int, micro_batch: int, tp: int) -> float:
    """What the rotation of megatron_ext.rope.apply adds: the int64 position ids [b', s] it saves for
    the backward, and the cos/sin of one chunk of c tokens (c * b * heads * r/2 <= CHUNK_ELEMENTS) in
    its torch path: angles and cos in fp32 and both cast to bf16, [c, b', g', r/2] each (b' = b under
    PoSE, else 1; g' = local KV groups under HARPE, else 1). No [s, b, h, d] table is ever built; the
    Triton kernel (GPU) computes cos/sin in registers, so on GPU this is an upper bound."""
    heads = work.model.num_attention_heads // tp
    half = (work.rotary_dim or work.head_dim) // 2
    chunk = min(tokens, max(1, CHUNK_ELEMENTS // (micro_batch * heads * half)))
    batch = micro_batch if work.per_sample_positions else 1
    groups = work.kv_groups // tp if work.per_head_bases else 1
    return chunk * batch * groups * half * (2 * FP32 + 2 * BF16) + 8 * batch * tokens


def output_activations(work: Workload, tokens: int, micro_batch: int, tp: int) -> float:
    """Last stage: final norm input and output-layer input (split by SP), the fp32 logits kept by the
    vocabulary-parallel cross entropy (its softmax; Korthikanti Sec. 4.3), and the bf16 logits the output layer
    returned, alive next to them: GPTModel.forward holds them until the loss returns, while the cross entropy
    makes its fp32 copy; in the backward the bf16 gradient of the logits meets the fp32 one the same way. So
    6 bytes per logit at the stage's peak, not 4 (measured by `plan --simulate`:
    docs/results/memory_simulation.md)."""
    m = work.model
    sb = tokens * micro_batch
    return (2 * BF16 * sb * m.hidden_size + (FP32 + BF16) * sb * padded_vocab_size(m.vocab_size, tp)) / tp


def cp_exchange_tensors(work: Workload, tokens: int, micro_batch: int, tp: int) -> tuple[float, float]:
    """(kv, qkvo): bf16 bytes of this rank's K and V, and of its q, k, v and attention output, [s, b, heads/t, d]."""
    sb, d = tokens * micro_batch, work.head_dim
    heads, groups = work.model.num_attention_heads // tp, work.kv_groups // tp
    return 2 * BF16 * sb * groups * d, BF16 * sb * (2 * heads + 2 * groups) * d


def cp_exchange_buffers(work: Workload, tokens: int, micro_batch: int, tp: int, layout: Layout) -> float:
    """What context parallelism's exchange holds besides the activations, by parallel.cp_comm_type
    (Transformer Engine's implementations, transformer_engine/pytorch/attention/dot_product_attention/
    context_parallel.py):
    p2p (ring): K and V of one chunk, double-buffered, and in the backward their gradients: 4 x kv.
    allgather: the backward gathers the whole sequence's K and V again and holds their full gradients
        before the reduce-scatter (the forward keeps only the local K/V): 2 x CP x kv.
    a2a (Ulysses): q, k, v and the output re-laid from [s, all local heads] to [CP x s, heads / CP]:
        one more copy of them, qkvo (the backward re-lays the gradients after these are freed).
    a2a+p2p: the a2a copy, then a ring over chunks of a2a_size x s tokens and heads / a2a_size: 4 x kv + qkvo.
    """
    if layout.cp == 1:
        return 0.0
    kv, qkvo = cp_exchange_tensors(work, tokens, micro_batch, tp)
    return {"p2p": 4.0 * kv, "allgather": 2.0 * layout.cp * kv, "a2a": qkvo,
            "a2a+p2p": 4.0 * kv + qkvo}[layout.cp_comm_type]


def fp8_weight_bytes(work: Workload, layout: Layout) -> float:
    """Transformer Engine's FP8 copies of the transformer layers' GEMM weights, cached across micro-batches:
    the weight and its transpose (for the input gradient), 1 byte each; megatron keeps its bf16 weights."""
    split, _ = layer_parameters(work)
    return 2 * FP8 * (work.model.num_layers // layout.pp) * split / layout.tp


# What lives only while one layer runs (its forward or its backward), and the term that says the last stage's
# output layer and loss never live at the same time as it: the loss runs after the last layer's forward and its
# tensors are freed before the last layer's backward starts. So the stage peaks at all activations plus the larger
# of the two, which the negative NOT_TOGETHER term makes the sum of the terms (measured by `plan --simulate`).
LAYER_TRANSIENTS = ("recomputed layer (backward)", "RoPE tables (transient)", "context-parallel K/V buffers")
NOT_TOGETHER = "layer transients and the loss never together"


@dataclass
class StageMemory:
    """Memory of one GPU of one pipeline stage, by term (bytes)."""

    stage: int
    parameters: int
    terms: dict[str, float]
    optimizer_without_distributed: float  # what the optimizer term would be without sharding
    per_layer: dict[str, float]  # one layer, one micro-batch: none / selective / full

    @property
    def total(self) -> float:
        return sum(self.terms.values())


def stage_memory(work: Workload, layout: Layout, stage: int, *, distributed_optimizer: bool = True,
                 flash_attention: bool = True, fp8: str = "off") -> StageMemory:
    """Per-GPU memory of pipeline stage `stage` under 1F1B (stage i holds min(pp - i, m) micro-batches)."""
    tokens = work.seq_length // layout.cp
    b, tp = layout.micro_batch_size, layout.tp
    params = stage_parameters(work, layout, stage)
    shards = layout.dp * layout.cp  # megatron shards the optimizer over the DP x CP group
    optimizer = OPTIMIZER_BYTES * params
    per_layer = {r: layer_activations(work, tokens, b, tp, r, flash_attention=flash_attention, fp8=fp8 != "off")
                 for r in RECOMPUTE}
    layers = work.model.num_layers // layout.pp
    in_flight = min(layout.pp - stage, layout.micro_batches(work.global_batch_size))
    chunks = work.virtual_pipeline_stages or 1
    if chunks > 1 and layout.pp > 1:  # interleaved: megatron's warm-up runs (pp - i - 1) x 2 + (v - 1) x pp chunk
        # forwards before the first backward, each of layers / v layers (so stage 0 holds about 1 + 1/v x 1F1B's)
        passes = min((layout.pp - stage - 1) * 2 + (chunks - 1) * layout.pp + 1,
                     chunks * layout.micro_batches(work.global_batch_size))
        in_flight = passes / chunks
    # The layer being recomputed in the backward holds what recompute dropped, once.
    recomputed = {"none": 0.0, "selective": per_layer["none"] - per_layer["selective"],
                  "full": per_layer["none"]}[layout.recompute]
    terms = {
        "weights (bf16)": WEIGHT_BYTES * params,
        "gradients (fp32 main grads)": GRAD_BYTES * params,
        "optimizer (fp32 master, Adam m and v)": optimizer / shards if distributed_optimizer else optimizer,
        "activations": layers * in_flight * per_layer[layout.recompute],
        "recomputed layer (backward)": recomputed,
        "output layer and loss": output_activations(work, tokens, b, tp) if stage == layout.pp - 1 else 0.0,
        "RoPE tables (transient)": rope_bytes(work, tokens, b, tp),
        "context-parallel K/V buffers": cp_exchange_buffers(work, tokens, b, tp, layout),
    }
    if fp8 != "off":
        terms["FP8 weight copies (Transformer Engine)"] = fp8_weight_bytes(work, layout)
    apart = min(terms["output layer and loss"], sum(terms[name] for name in LAYER_TRANSIENTS))
    if apart:
        terms[NOT_TOGETHER] = -apart
    return StageMemory(stage, params, terms, optimizer, per_layer)


def peak_memory(work: Workload, layout: Layout, **options) -> StageMemory:
    """The pipeline stage that needs the most memory: the first (it holds the most micro-batches and
    the embedding) or the last (the output layer and the logits); a middle stage holds less than the first."""
    stages = (stage_memory(work, layout, i, **options) for i in sorted({0, layout.pp - 1}))
    return max(stages, key=lambda s: s.total)
