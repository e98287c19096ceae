"""Enumerate TP/PP/CP/DP/micro-batch/recompute layouts of a workload on N GPUs, reject those that cannot
run or do not fit in memory (each with its reason), and rank the rest by estimated step time.

Imports no megatron. Memory: megatron_ext.launch.memory; time: megatron_ext.launch.timing.
"""

import dataclasses
from dataclasses import dataclass, field

from megatron_ext.config.layout import layout_problems
from megatron_ext.launch.memory import GIB, StageMemory, peak_memory
from megatron_ext.launch.presets import FP8_GEMM_SPEEDUP, GPU
from megatron_ext.launch.timing import StepTime, step_time
from megatron_ext.launch.workload import CP_COMM_TYPES, RECOMPUTE, Layout, Workload


@dataclass(frozen=True)
class PlanRequest:
    """What to plan for and the assumptions the estimate rests on.

    mfu:          the fraction of peak bf16 FLOP/s that the executed math runs at.
    reserve_gib:  memory per GPU outside the estimate: CUDA context, NCCL buffers, cuBLAS/TE
                  workspaces, allocator fragmentation.
    overlap:      overlap the gradient reduction (and the distributed optimizer's weight all-gather)
                  with compute; it costs no memory, so the planner turns it on unless told not to.
    fp8:          off | hybrid | e4m3: the transformer layers' GEMMs in FP8 (Transformer Engine), which
                  changes the numerics, so only when asked; they run fp8_gemm_speedup x faster (assumed).
    """

    workload: Workload
    gpu: GPU
    gpus: int
    mfu: float = 0.40
    reserve_gib: float = 8.0
    distributed_optimizer: bool = True
    flash_attention: bool = True
    overlap: bool = True
    fp8: str = "off"
    fp8_gemm_speedup: float = FP8_GEMM_SPEEDUP

    @property
    def usable_bytes(self) -> float:
        return (self.gpu.memory_gib - self.reserve_gib) * GIB


@dataclass
class Candidate:
    layout: Layout
    problems: list[str] = field(default_factory=list)  # empty: the layout runs and fits
    memory: StageMemory | None = None  # the peak pipeline stage (None: the layout cannot run)
    time: StepTime | None = None

    @property
    def fits(self) -> bool:
        return not self.problems


@dataclass
class Plan:
    request: PlanRequest
    ranked: list[Candidate]  # fitting layouts, fastest first
    rejected: list[Candidate]  # closest to fitting first (closeness_key)

    @property
    def best(self) -> Candidate | None:
        return self.ranked[0] if self.ranked else None


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def enumerate_layouts(request: PlanRequest, fixed: dict | None = None) -> list[Layout]:
    """Every TP x PP x CP x DP = gpus, micro-batch a power of two up to the global batch, every recompute
    mode, the CP exchange of `fixed` (default p2p, see cp_variants); `fixed` pins any of tp, pp, cp,
    micro_batch_size, recompute, cp_comm_type (which leaves out the layouts without CP: they exchange nothing)."""
    fixed = fixed or {}
    n, batch = request.gpus, request.workload.global_batch_size

    def options(key, default):
        return [fixed[key]] if key in fixed else default

    def split(rest):  # divisors of what is left, or [1] if a pinned size does not divide the GPUs
        return divisors(n // rest) if n % rest == 0 else [1]

    layouts = []
    for tp in options("tp", divisors(n)):
        for pp in options("pp", split(tp)):
            for cp in options("cp", split(tp * pp)):
                dp = max(1, n // (tp * pp * cp))
                for mbs in options("micro_batch_size", [1 << k for k in range(batch.bit_length())]):
                    for recompute in options("recompute", RECOMPUTE):
                        layout = Layout(tp, pp, cp, dp, mbs, recompute, overlap=request.overlap)
                        if "cp_comm_type" not in fixed:
                            layouts.append(layout)
                        elif cp > 1:
                            layouts += cp_variants(layout, [fixed["cp_comm_type"]])
    return layouts


# The exchange types ranked by default. a2a+p2p (megatron's hierarchical CP groups, which
# megatron_ext.distributed.setup_distributed creates from parallel.hierarchical_context_parallel_sizes) is
# evaluated when pinned (--cp-comm-type a2a+p2p): ranked, it would top the 128k recipes by under 1% of step
# time, within this model's error, with an exchange that has not yet run on a GPU here.
RANKED_CP_TYPES = ("p2p", "a2a", "allgather")


def cp_variants(layout: Layout, kinds=RANKED_CP_TYPES) -> list[Layout]:
    """The layout with each CP exchange type of `kinds` (a2a+p2p once per a2a group size 1 < a < CP);
    without CP, the layout itself."""
    if layout.cp == 1:
        return [layout]
    variants = []
    for kind in kinds:
        sizes = [a for a in divisors(layout.cp) if 1 < a < layout.cp] if kind == "a2a+p2p" else [1]
        variants += [dataclasses.replace(layout, cp_comm_type=kind, a2a_size=a) for a in sizes]
    return variants


def structural_problems(request: PlanRequest, layout: Layout) -> list[str]:
    """Why megatron (or our trainer) cannot run this layout at all."""
    work, m = request.workload, request.workload.model
    shared = layout_problems(heads=m.num_attention_heads, kv_groups=work.kv_groups, layers=m.num_layers,
                             seq_length=work.seq_length, global_batch_size=work.global_batch_size,
                             micro_batch_size=layout.micro_batch_size, tp=layout.tp, pp=layout.pp, cp=layout.cp,
                             dp=layout.dp, ranks=request.gpus)  # the rules `train` checks before it starts ranks
    checks = [
        (layout.tp <= request.gpu.gpus_per_node,
         f"TP {layout.tp} spans nodes: keep TP within the {request.gpu.gpus_per_node} GPUs of a node"),
        a2a_check(work, layout),
        interleaving_check(work, layout),
    ]
    return shared + [message for ok, message in checks if not ok]


def a2a_check(work: Workload, layout: Layout) -> tuple[bool, str]:
    """Transformer Engine's all-to-all scatters each TP rank's query and KV heads over its a2a group."""
    group = {"a2a": layout.cp, "a2a+p2p": layout.a2a_size}.get(layout.cp_comm_type, 1) if layout.cp > 1 else 1
    heads, kv = work.model.num_attention_heads // layout.tp, work.kv_groups // layout.tp
    return (heads % group == 0 and kv % group == 0,
            f"{layout.cp_comm_type} scatters the {heads} query and {kv} KV heads of a TP rank over {group} ranks")


def interleaving_check(work: Workload, layout: Layout) -> tuple[bool, str]:
    """parallel.virtual_pipeline_model_parallel_size: v chunks of layers / (PP x v) layers on each of >= 2 stages,
    micro-batches in groups of PP (megatron-core's interleaved schedule; training/batches.py checks it too)."""
    v = work.virtual_pipeline_stages
    if v is None:
        return True, ""
    micro_batches = layout.micro_batches(work.global_batch_size)
    return (layout.pp >= 2 and work.model.num_layers % (layout.pp * v) == 0 and micro_batches % layout.pp == 0,
            f"interleaving {v} chunks per stage needs PP >= 2 dividing the micro-batches ({micro_batches}) and "
            f"PP x {v} dividing the {work.model.num_layers} layers")


def memory_problem(request: PlanRequest, memory: StageMemory) -> str | None:
    if memory.total <= request.usable_bytes:
        return None
    name, largest = max(memory.terms.items(), key=lambda item: item[1])
    remedy = {
        "activations": "more CP or TP, more PP, or recompute",
        "optimizer (fp32 master, Adam m and v)": "the distributed optimizer, or more DP/CP to shard over",
    }.get(name, "more TP or PP")
    return (f"needs {memory.total / GIB:.1f} GiB per GPU (stage {memory.stage}) > "
            f"{request.usable_bytes / GIB:.1f} GiB usable; largest: {name} {largest / GIB:.1f} GiB ({remedy})")


def evaluate(request: PlanRequest, layout: Layout) -> Candidate:
    problems = structural_problems(request, layout)
    if problems:
        return Candidate(layout, problems)
    work = request.workload
    memory = peak_memory(work, layout, distributed_optimizer=request.distributed_optimizer,
                         flash_attention=request.flash_attention, fp8=request.fp8)
    time = step_time(work, layout, request.gpu, mfu=request.mfu, params_per_gpu=memory.parameters,
                     distributed_optimizer=request.distributed_optimizer, fp8=request.fp8,
                     fp8_gemm_speedup=request.fp8_gemm_speedup)
    problem = memory_problem(request, memory)
    return Candidate(layout, [problem] if problem else [], memory, time)


def rank_key(candidate: Candidate) -> tuple:
    """Fastest first. At equal estimated time: the smaller model-parallel group TP x PP x CP (what the
    model counts as hidden, such as CP's ring exchange, still costs kernel efficiency on smaller
    chunks), then more memory to spare (the FLOP model does not reward a larger micro-batch), then the
    layout itself, so the order never depends on the order of enumeration."""
    layout = candidate.layout
    return (round(candidate.time.total, 6), layout.tp * layout.pp * layout.cp, round(candidate.memory.total),
            *_shape(layout))


def closeness_key(candidate: Candidate) -> tuple:
    """Closest to running first: layouts that only miss memory, least memory first (the same order as
    how far over the usable memory they are), then layouts megatron cannot run, fewest problems first;
    ties by the layout itself, so the order never depends on the order of enumeration."""
    shape = _shape(candidate.layout)
    if candidate.memory is not None:
        return (0, round(candidate.memory.total), *shape)
    return (1, len(candidate.problems), *shape)


def _shape(layout: Layout) -> tuple:
    return (layout.tp, layout.pp, layout.cp, layout.dp, layout.micro_batch_size, RECOMPUTE.index(layout.recompute),
            CP_COMM_TYPES.index(layout.cp_comm_type), layout.a2a_size, layout.overlap)


def plan(request: PlanRequest, fixed: dict | None = None, layouts: list[Layout] | None = None) -> Plan:
    """Evaluate `layouts` (default: enumerate_layouts), rank those that fit and order those that do not.

    Unless the CP type is pinned, every layout with CP > 1 that megatron can run at all is evaluated with
    each exchange type too (a type cannot rescue a layout of impossible sizes, so those are listed once)."""
    candidates = []
    for layout in layouts or enumerate_layouts(request, fixed):
        candidate = evaluate(request, layout)
        candidates.append(candidate)
        if layouts is None and "cp_comm_type" not in (fixed or {}) and candidate.memory is not None:
            candidates += [evaluate(request, v) for v in cp_variants(layout) if v != layout]
    ranked = sorted((c for c in candidates if c.fits), key=rank_key)
    rejected = sorted((c for c in candidates if not c.fits), key=closeness_key)
    return Plan(request, ranked, rejected)
