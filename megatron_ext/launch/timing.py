"""Step time of a layout: FLOPs at an assumed utilization, the pipeline bubble, and the communication
that is not hidden behind compute. Pure arithmetic (imports no megatron); sources in docs/launch.md.

FLOPs per token are the trainer's own formula (megatron_ext.sizes, PaLM App. B):
6N + 12*L*h*s, so the MFU printed here is the one the training log reports.
"""

from dataclasses import dataclass

from megatron_ext.launch.memory import BF16, FP32
from megatron_ext.launch.presets import GPU
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


@dataclass
class StepTime:
    """Seconds of one optimizer step, by cause, and the model FLOPs it does."""

    compute: float
    pipeline_bubble: float
    tensor_parallel: float  # exposed: megatron runs these collectives between its GEMMs
    context_parallel: float  # only what the ring's K/V exchange does not hide behind attention
    data_parallel: float  # exposed: our trainer reduces gradients after the backward
    pipeline_parallel: float
    model_flops: float  # per step, all GPUs

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


def step_time(work: Workload, layout: Layout, gpu: GPU, *, mfu: float, params_per_gpu: int,
              distributed_optimizer: bool = True) -> StepTime:
    m = work.model
    gpus = layout.gpus
    rate = gpu.peak_tflops * 1e12 * mfu  # FLOP/s one GPU sustains
    model = work.tokens_per_step * model_flops_per_token(work, layout.tp)
    extra = work.tokens_per_step * recompute_flops_per_token(work, layout.recompute)
    compute = (model + extra) / (gpus * rate)
    micro_batches = layout.micro_batches(work.global_batch_size)
    bubble = compute * (layout.pp - 1) / micro_batches  # 1F1B (Narayanan et al. 2021, Sec. 2.2)

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

    # Ring attention: in each of cp - 1 steps a rank passes K and V on (forward), K, V and their
    # gradients (backward); recompute repeats the forward's exchange. It overlaps the attention math.
    kv = 2 * BF16 * tokens * layout.micro_batch_size * (work.kv_groups // layout.tp) * work.head_dim
    passes = 3 + (layout.recompute != "none")
    cp_bytes = steps * passes * (layout.cp - 1) * kv
    attention = 12.0 * m.num_layers * m.hidden_size * work.seq_length * work.tokens_per_step / (gpus * rate)
    context_parallel = max(0.0, cp_bytes / bandwidth(layout.tp * layout.cp) - attention)

    group = layout.dp * layout.cp  # gradients are reduced over DP x CP
    dp_bytes = GRAD_REDUCE_BYTES[distributed_optimizer] * params_per_gpu * (group - 1) / group
    data_parallel = dp_bytes / bandwidth(layout.tp * group)

    # 1F1B sends each micro-batch's activations forward and their gradients back, blocking; neighbouring
    # stages are tp*cp*dp ranks apart. Sequence parallelism sends the scattered [s/t, b, h] tensor.
    stride = layout.tp * layout.cp * layout.dp
    pp_bytes = 2 * micro_batches * activation / layout.tp if layout.pp > 1 else 0.0
    pipeline_parallel = pp_bytes / bandwidth(stride + 1)
    return StepTime(compute, bubble, tensor_parallel, context_parallel, data_parallel, pipeline_parallel, model)
