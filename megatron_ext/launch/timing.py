"""Step time of a layout: FLOPs at an assumed utilization, the pipeline bubble, and the communication
that is not hidden behind compute. Pure arithmetic (imports no megatron); sources in docs/launch.md.

FLOPs per token are the trainer's own formula (megatron_ext.sizes, PaLM App. B):
6N + 12*L*h*s, so the MFU printed here is the one the training log reports.
"""

from dataclasses import dataclass

from megatron_ext.launch.memory import BF16, FP32, cp_exchange_tensors
from megatron_ext.launch.presets import FP8_GEMM_SPEEDUP, GPU
from megatron_ext.launch.workload import Layout, Workload
from megatron_ext.sizes import flops_per_token, matmul_parameters, padded_vocab_size

# Sequence-parallel collectives per layer and micro-batch, each over one [s, b, h] bf16 tensor:
# forward: all-gather before QKV and FC1, reduce-scatter after the projection and FC2 (4);
# backward: the same two all-gathers again (megatron keeps only the scattered input for the weight
# gradient), reduce-scatter of the column-parallel input gradients, all-gather of the row-parallel
# output gradients (6). Full recompute runs the forward's 4 once more.
TP_COLLECTIVES = {"none": 10, "selective": 10, "full": 14}

# Bytes per parameter moved by the gradient reduction (ring algorithms, times (n-1)/n):
# distributed optimizer = reduce-scatter of fp32 grads + all-gather of bf16 weights;
# otherwise an all-reduce of fp32 grads (= reduce-scatter + all-gather of fp32).
GRAD_REDUCE_BYTES = {True: FP32 + BF16, False: 2 * FP32}

# megatron's default gradient bucket with overlap_grad_reduce: max(40M, 1M x DP) parameters
# (distributed/distributed_data_parallel.py); the last bucket of the backward has nothing left to hide behind.
BUCKET_PARAMETERS, BUCKET_PARAMETERS_PER_RANK = 40_000_000, 1_000_000


@dataclass
class StepTime:
    """Seconds of one optimizer step, by cause, and the model FLOPs it does."""

    compute: float
    pipeline_bubble: float
    tensor_parallel: float  # exposed: megatron runs these collectives between its GEMMs
    context_parallel: float  # exposed: the ring's (p2p) part that attention does not hide, all of a2a/all-gather
    data_parallel: float  # exposed: all of it, or with overlap what the last micro-batch's compute does not hide
    pipeline_parallel: float
    model_flops: float  # per step, all GPUs
    data_parallel_hidden: float = 0.0  # the DP communication that overlap hides (not in total)

    @property
    def total(self) -> float:
        return (self.compute + self.pipeline_bubble + self.tensor_parallel + self.context_parallel
                + self.data_parallel + self.pipeline_parallel)

    def mfu(self, gpus: int, peak_tflops: float) -> float:
        return self.model_flops / (self.total * gpus * peak_tflops * 1e12)


def model_flops_per_token(work: Workload, tp: int = 1) -> float:
    m = work.model
    n = matmul_parameters(m.num_layers, m.hidden_size, m.ffn_size, m.num_attention_heads, work.kv_groups,
                          padded_vocab_size(m.vocab_size, tp), m.swiglu)
    return flops_per_token(n, m.num_layers, m.hidden_size, work.seq_length)


def recompute_flops_per_token(work: Workload, recompute: str) -> float:
    """FLOPs recompute adds: full reruns each layer's forward (a third of 6N + 12Lhs, the output layer
    excluded); selective reruns the core attention's forward (QK^T and AV: 4*L*h*s)."""
    m = work.model
    attention_forward = 4.0 * m.num_layers * m.hidden_size * work.seq_length
    if recompute == "full":
        layers = matmul_parameters(m.num_layers, m.hidden_size, m.ffn_size, m.num_attention_heads,
                                   work.kv_groups, 0, m.swiglu)
        return 2.0 * layers + attention_forward
    return attention_forward if recompute == "selective" else 0.0


def fp8_flops_per_token(work: Workload, recompute: str) -> float:
    """FLOPs per token that run as FP8 GEMMs: the transformer layers' linear layers, forward and backward
    (6 per weight), and their forward again under full recompute (2 per weight). Attention (QK^T, AV) and
    the output layer stay bf16 (megatron keeps fp8_dot_product_attention off and the output layer outside
    its fp8_autocast)."""
    m = work.model
    layers = matmul_parameters(m.num_layers, m.hidden_size, m.ffn_size, m.num_attention_heads, work.kv_groups, 0,
                               m.swiglu)
    return (6.0 + (2.0 if recompute == "full" else 0.0)) * layers


def step_time(work: Workload, layout: Layout, gpu: GPU, *, mfu: float, params_per_gpu: int,
              distributed_optimizer: bool = True, fp8: str = "off",
              fp8_gemm_speedup: float = FP8_GEMM_SPEEDUP) -> StepTime:
    m = work.model
    gpus = layout.gpus
    rate = gpu.peak_tflops * 1e12 * mfu  # FLOP/s one GPU sustains
    model = work.tokens_per_step * model_flops_per_token(work, layout.tp)
    extra = work.tokens_per_step * recompute_flops_per_token(work, layout.recompute)
    fp8_saved = 0.0
    if fp8 != "off":  # the FP8 GEMMs take 1/speedup of their bf16 time
        fp8_saved = work.tokens_per_step * fp8_flops_per_token(work, layout.recompute) * (1 - 1 / fp8_gemm_speedup)
    compute = (model + extra - fp8_saved) / (gpus * rate)
    micro_batches = layout.micro_batches(work.global_batch_size)
    # 1F1B (Narayanan et al. 2021, Sec. 2.2); interleaved over v chunks per rank, (p - 1) / (v m) (Sec. 2.2.2)
    chunks = (work.virtual_pipeline_stages or 1) if layout.pp > 1 else 1
    bubble = compute * (layout.pp - 1) / (chunks * micro_batches)

    def bandwidth(span: int) -> float:
        """Bytes/s of a group whose members lie within `span` consecutive ranks (megatron orders
        ranks TP, CP, DP, PP from fastest to slowest, so a group of span <= GPUs per node is local)."""
        return (gpu.nvlink_gbs if span <= gpu.gpus_per_node else gpu.network_gbs) * 1e9

    tokens = work.seq_length // layout.cp  # per CP rank
    layers = m.num_layers // layout.pp
    steps = layers * micro_batches  # layer passes per GPU per optimizer step
    activation = BF16 * tokens * layout.micro_batch_size * m.hidden_size  # one [s, b, h] bf16 tensor

    tp_bytes = steps * TP_COLLECTIVES[layout.recompute] * activation * (layout.tp - 1) / layout.tp
    tensor_parallel = tp_bytes / bandwidth(layout.tp)

    attention = 12.0 * m.num_layers * m.hidden_size * work.seq_length * work.tokens_per_step / (gpus * rate)
    context_parallel = cp_exposed_seconds(work, layout, steps, attention, bandwidth)

    group = layout.dp * layout.cp  # gradients are reduced over DP x CP
    data_parallel, hidden = dp_exposed_seconds(layout, params_per_gpu, distributed_optimizer, compute / micro_batches,
                                               bandwidth(layout.tp * group))

    # 1F1B sends each micro-batch's activations forward and their gradients back, blocking; neighbouring
    # stages are tp*cp*dp ranks apart. Sequence parallelism sends the scattered [s/t, b, h] tensor.
    stride = layout.tp * layout.cp * layout.dp
    # With v chunks per rank a micro-batch crosses v times as many stage boundaries.
    pp_bytes = 2 * chunks * micro_batches * activation / layout.tp if layout.pp > 1 else 0.0
    pipeline_parallel = pp_bytes / bandwidth(stride + 1)
    return StepTime(compute, bubble, tensor_parallel, context_parallel, data_parallel, pipeline_parallel, model,
                    hidden)


def cp_exposed_seconds(work: Workload, layout: Layout, steps: int, attention: float, bandwidth) -> float:
    """Context parallelism's exchange, per layer pass, by type (bytes per GPU, bus bandwidth convention
    bytes x (n-1)/n for collectives). passes = forward + the backward's two (inputs and their gradients)
    + the forward again under recompute.
    p2p: in each of CP-1 ring steps K and V go on (K, V, dK, dV in the backward): passes x (CP-1) x kv,
        overlapped with the attention math; only what exceeds it is exposed.
    allgather: the same bytes as all-gather + reduce-scatter, not overlapped (megatron-core's
        TransformerConfig.cp_comm_type doc: "The all-gather is not async").
    a2a: q, k, v before and the output after attention, all-to-all over CP ranks (their gradients in the
        backward): passes' (2 + recompute) x qkvo x (CP-1)/CP, exposed (attention waits for it).
    a2a+p2p: the a2a over a2a_size ranks (exposed) and the ring over CP / a2a_size groups (hidden as p2p)."""
    if layout.cp == 1:
        return 0.0
    kv, qkvo = cp_exchange_tensors(work, work.seq_length // layout.cp, layout.micro_batch_size, layout.tp)
    recompute = layout.recompute != "none"
    ring_passes, a2a_passes = 3 + recompute, 2 + recompute
    span = layout.tp * layout.cp
    if layout.cp_comm_type == "allgather":
        return steps * ring_passes * (layout.cp - 1) * kv / bandwidth(span)
    a2a_size = {"p2p": 1, "a2a": layout.cp, "a2a+p2p": layout.a2a_size}[layout.cp_comm_type]
    ring_size = layout.cp // a2a_size
    a2a = steps * a2a_passes * qkvo * (a2a_size - 1) / a2a_size / bandwidth(layout.tp * a2a_size)
    ring = steps * ring_passes * (ring_size - 1) * kv / bandwidth(span)
    return a2a + max(0.0, ring - attention)


def dp_exposed_seconds(layout: Layout, params_per_gpu: int, distributed_optimizer: bool, micro_batch_compute: float,
                       bw: float) -> tuple[float, float]:
    """(exposed, hidden) seconds of the gradient reduction over DP x CP ranks (and the distributed optimizer's
    weight all-gather). Without overlap all of it waits for the backward's end. With overlap_grad_reduce the
    reduction runs bucket by bucket during the backward of the last micro-batch (the earlier ones accumulate
    under no_sync), about 2/3 of a micro-batch's compute, except the last bucket; with overlap_param_gather
    the all-gather runs during the next forward's first micro-batch (1/3), except the first bucket."""
    group = layout.dp * layout.cp
    share = (group - 1) / group
    if not distributed_optimizer:
        reduce, gather = GRAD_REDUCE_BYTES[False] * params_per_gpu * share / bw, 0.0
    else:
        reduce, gather = FP32 * params_per_gpu * share / bw, BF16 * params_per_gpu * share / bw
    if not layout.overlap:
        return reduce + gather, 0.0
    bucket = min(1.0, max(BUCKET_PARAMETERS, BUCKET_PARAMETERS_PER_RANK * group) / max(1, params_per_gpu))
    exposed = max(bucket * reduce, reduce - 2 * micro_batch_compute / 3)
    if gather:
        exposed += max(bucket * gather, gather - micro_batch_compute / 3)
    return exposed, reduce + gather - exposed
