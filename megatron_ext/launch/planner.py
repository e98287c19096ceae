"""Enumerate TP/PP/CP/DP/micro-batch/recompute layouts of a workload on N GPUs, reject those that cannot
run or do not fit in memory (each with its reason), and rank the rest by estimated step time.

Imports no megatron. Memory: megatron_ext.launch.memory; time: megatron_ext.launch.timing.
"""

from dataclasses import dataclass, field

from megatron_ext.launch.memory import GIB, StageMemory, peak_memory
from megatron_ext.launch.presets import GPU
from megatron_ext.launch.timing import StepTime, step_time
from megatron_ext.launch.workload import RECOMPUTE, Layout, Workload


@dataclass(frozen=True)
class PlanRequest:
    """What to plan for and the assumptions the estimate rests on.

    mfu:          the fraction of peak bf16 FLOP/s that the executed math runs at.
    reserve_gib:  memory per GPU outside the estimate: CUDA context, NCCL buffers, cuBLAS/TE
                  workspaces, allocator fragmentation.
    """

    workload: Workload
    gpu: GPU
    gpus: int
    mfu: float = 0.40
    reserve_gib: float = 8.0
    distributed_optimizer: bool = True
    flash_attention: bool = True

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
    mode; `fixed` pins any of tp, pp, cp, micro_batch_size, recompute."""
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
                        layouts.append(Layout(tp, pp, cp, dp, mbs, recompute))
    return layouts


def structural_problems(request: PlanRequest, layout: Layout) -> list[str]:
    """Why megatron (or our trainer) cannot run this layout at all."""
    work, m = request.workload, request.workload.model
    checks = [
        (layout.gpus == request.gpus,
         f"TP x PP x CP x DP = {layout.gpus}, not the {request.gpus} GPUs asked for"),
        (layout.tp <= request.gpu.gpus_per_node,
         f"TP {layout.tp} spans nodes: keep TP within the {request.gpu.gpus_per_node} GPUs of a node"),
        (m.num_attention_heads % layout.tp == 0,
         f"TP {layout.tp} must divide the {m.num_attention_heads} attention heads"),
        (work.kv_groups % layout.tp == 0,
         f"TP {layout.tp} must divide the {work.kv_groups} KV groups (megatron splits KV heads over TP)"),
        (m.num_layers % layout.pp == 0, f"PP {layout.pp} must divide the {m.num_layers} layers"),
        (layout.cp == 1 or work.seq_length % (2 * layout.cp) == 0,
         f"the sequence length {work.seq_length} must divide by 2 x CP = {2 * layout.cp} (zig-zag split)"),
        (work.global_batch_size % (layout.micro_batch_size * layout.dp) == 0,
         f"the global batch {work.global_batch_size} must be a multiple of micro-batch x DP = "
         f"{layout.micro_batch_size * layout.dp}"),
    ]
    return [message for ok, message in checks if not ok]


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
                         flash_attention=request.flash_attention)
    time = step_time(work, layout, request.gpu, mfu=request.mfu, params_per_gpu=memory.parameters,
                     distributed_optimizer=request.distributed_optimizer)
    problem = memory_problem(request, memory)
    return Candidate(layout, [problem] if problem else [], memory, time)


def rank_key(candidate: Candidate) -> tuple:
    """Fastest first. At equal estimated time: the smaller model-parallel group TP x PP x CP (what the
    model counts as hidden, such as CP's ring exchange, still costs kernel efficiency on smaller
    chunks), then more memory to spare (the FLOP model does not reward a larger micro-batch), then the
    layout itself, so the order never depends on the order of enumeration."""
    layout = candidate.layout
    return (round(candidate.time.total, 6), layout.tp * layout.pp * layout.cp, round(candidate.memory.total),
            layout.tp, layout.pp, layout.cp, layout.micro_batch_size, RECOMPUTE.index(layout.recompute))


def closeness_key(candidate: Candidate) -> tuple:
    """Closest to running first: layouts that only miss memory, least memory first (the same order as
    how far over the usable memory they are), then layouts megatron cannot run, fewest problems first;
    ties by the layout itself, so the order never depends on the order of enumeration."""
    layout = candidate.layout
    shape = (layout.tp, layout.pp, layout.cp, layout.dp, layout.micro_batch_size, RECOMPUTE.index(layout.recompute))
    if candidate.memory is not None:
        return (0, round(candidate.memory.total), *shape)
    return (1, len(candidate.problems), *shape)


def plan(request: PlanRequest, fixed: dict | None = None, layouts: list[Layout] | None = None) -> Plan:
    """Evaluate `layouts` (default: enumerate_layouts), rank those that fit and order those that do not."""
    candidates = [evaluate(request, layout) for layout in (layouts or enumerate_layouts(request, fixed))]
    ranked = sorted((c for c in candidates if c.fits), key=rank_key)
    rejected = sorted((c for c in candidates if not c.fits), key=closeness_key)
    return Plan(request, ranked, rejected)
