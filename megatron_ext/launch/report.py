"""The planner's output: the ranked table, the chosen layout's memory and time by term, and the YAML
overrides that select it. Text, Markdown (docs/results) or JSON. Imports no megatron.
"""

import json

import yaml

from megatron_ext.launch.memory import GIB
from megatron_ext.launch.planner import Candidate, Plan
from megatron_ext.launch.workload import yaml_word

COLUMNS = ("#", "TP", "PP", "CP", "CP comm", "DP", "mbs", "recompute", "GiB/GPU", "step s", "tokens/s/GPU",
           "MFU %", "GPU-h/1B tokens")


def row(plan: Plan, index: int, candidate: Candidate) -> list[str]:
    request, layout, time = plan.request, candidate.layout, candidate.time
    tokens = request.workload.tokens_per_step
    return [str(index), str(layout.tp), str(layout.pp), str(layout.cp), layout.cp_exchange, str(layout.dp),
            str(layout.micro_batch_size), layout.recompute, f"{candidate.memory.total / GIB:.1f}",
            f"{time.total:.2f}", f"{tokens / time.total / request.gpus:,.0f}",
            f"{100 * time.mfu(request.gpus, request.gpu.peak_tflops):.1f}",
            f"{request.gpus * time.total / tokens * 1e9 / 3600:,.0f}"]


def table(plan: Plan, top: int = 10, markdown: bool = False) -> str:
    rows = [row(plan, i + 1, c) for i, c in enumerate(plan.ranked[:top])]
    if markdown:
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---:|" * len(COLUMNS)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(COLUMNS)]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in [list(COLUMNS), *rows])


def header(plan: Plan) -> str:
    r, gpu = plan.request, plan.request.gpu
    nodes = -(-r.gpus // gpu.gpus_per_node)
    return "\n".join([
        f"workload: {r.workload.describe()} ({r.workload.tokens_per_step / 1e6:.2f} M tokens per step)",
        f"model: {r.workload.describe_model()}",
        f"hardware: {r.gpus} x {gpu.name} ({nodes} node{'s' * (nodes > 1)} of {gpu.gpus_per_node}), "
        f"{gpu.memory_gib:.1f} GiB each of which {r.usable_bytes / GIB:.1f} usable ({r.reserve_gib:g} reserved), "
        f"{gpu.peak_tflops:g} TFLOP/s bf16 at an assumed {100 * r.mfu:g}% utilization",
        f"options: distributed optimizer {'on' if r.distributed_optimizer else 'off'}, "
        f"flash attention {'on' if r.flash_attention else 'off'}, sequence parallelism whenever TP > 1, "
        f"DP communication overlap {'on' if r.overlap else 'off'}, "
        + (f"FP8 {r.fp8} (transformer-layer GEMMs assumed {r.fp8_gemm_speedup:g}x faster)" if r.fp8 != "off"
           else "FP8 off"),
        f"layouts: {len(plan.ranked) + len(plan.rejected)} enumerated, {len(plan.ranked)} fit, "
        f"{len(plan.rejected)} rejected",
    ])


def breakdown(plan: Plan, candidate: Candidate) -> str:
    """Memory of the peak stage and step time, term by term."""
    request, memory, time, layout = plan.request, candidate.memory, candidate.time, candidate.layout
    layers = request.workload.model.num_layers // layout.pp
    in_flight = min(layout.pp - memory.stage, layout.micro_batches(request.workload.global_batch_size))
    notes = {
        "optimizer (fp32 master, Adam m and v)":
            f"sharded over DP x CP = {layout.dp * layout.cp}; "
            f"{memory.optimizer_without_distributed / GIB:.2f} without the distributed optimizer"
            if request.distributed_optimizer else "not sharded (--no-distributed-optimizer)",
        "activations": f"{layers} layers x {in_flight} micro-batch(es) x "
                       f"{memory.per_layer[layout.recompute] / GIB:.3f}; per layer "
                       + ", ".join(f"{k} {v / GIB:.3f}" for k, v in memory.per_layer.items()),
    }
    lines = [f"{layout}: memory per GPU of pipeline stage {memory.stage} (GiB), "
             f"{memory.parameters / 1e9:.2f} B parameters"]
    for name, value in memory.terms.items():
        note = f"   ({notes[name]})" if name in notes else ""
        lines.append(f"  {name:<40} {value / GIB:8.2f}{note}")
    lines.append(f"  {'total':<40} {memory.total / GIB:8.2f}   of {request.usable_bytes / GIB:.1f} usable")
    parts = [("compute", time.compute), ("pipeline bubble", time.pipeline_bubble),
             ("TP comm", time.tensor_parallel), (f"CP comm ({layout.cp_exchange}) not hidden", time.context_parallel),
             ("DP comm not hidden", time.data_parallel), ("PP comm", time.pipeline_parallel)]
    lines.append(f"step time {time.total:.2f} s = " + " + ".join(f"{name} {value:.2f}" for name, value in parts))
    if layout.overlap:
        lines.append(f"  (overlap hides {time.data_parallel_hidden:.2f} s of DP comm; "
                     f"{time.data_parallel + time.data_parallel_hidden:.2f} s without it)")
    return "\n".join(lines)


def assumed_settings(candidate: Candidate, distributed_optimizer: bool) -> dict[str, object]:
    """The layout's overrides and the settings the estimate assumed besides it: the CP exchange (also the
    default p2p) and DP communication overlap, so a config runs what was estimated."""
    layout = candidate.layout
    options = {"parallel.cp_comm_type": layout.cp_comm_type} if layout.cp > 1 else {}
    options.update({"parallel.overlap_grad_reduce": layout.overlap,
                    "parallel.overlap_param_gather": layout.overlap and distributed_optimizer})
    settings = layout.overrides(distributed_optimizer)
    parallel = {k: v for k, v in settings.items() if k.startswith("parallel.")}
    return {**parallel, **options, **{k: v for k, v in settings.items() if k not in parallel}}


def overrides_yaml(candidate: Candidate, distributed_optimizer: bool) -> str:
    nested: dict = {}
    for key, value in assumed_settings(candidate, distributed_optimizer).items():
        section, name = key.split(".")
        nested.setdefault(section, {})[name] = value
    return yaml.safe_dump(nested, sort_keys=False).rstrip()


def overrides_flags(candidate: Candidate, distributed_optimizer: bool) -> str:
    return " ".join(f"--set {key}={yaml_word(value)}"
                    for key, value in assumed_settings(candidate, distributed_optimizer).items())


CLOSEST_WHEN_NOTHING_FITS = 5  # rejected layouts listed when none fits and --show-rejected is not given


def rejected_lines(plan: Plan, count: int) -> list[str]:
    """The `count` rejected layouts closest to fitting (Plan.rejected's order), each with why it fails."""
    shown = plan.rejected[:count]
    title = (f"no layout fits; the closest {len(shown)} of {len(plan.rejected)} rejected:" if plan.best is None
             else f"rejected (the closest {len(shown)} of {len(plan.rejected)}):")
    return [title, *(f"  {c.layout}: {'; '.join(c.problems)}{_cp_note(c.layout)}" for c in shown)]


def _cp_note(layout) -> str:
    """The CP exchange of a rejected layout when it is not the default ring (the sizes read alike)."""
    return f" [CP {layout.cp_exchange}]" if layout.cp > 1 and layout.cp_comm_type != "p2p" else ""


def text_report(plan: Plan, top: int = 10, show_rejected: int = 0) -> str:
    parts = [header(plan), ""]
    if plan.best is None:
        return "\n".join(parts + rejected_lines(plan, show_rejected or CLOSEST_WHEN_NOTHING_FITS))
    parts += [table(plan, top), "", breakdown(plan, plan.best), "",
              "YAML overrides (or pass them to megatron-ext train as below):",
              overrides_yaml(plan.best, plan.request.distributed_optimizer),
              overrides_flags(plan.best, plan.request.distributed_optimizer)]
    if show_rejected:
        parts += ["", *rejected_lines(plan, show_rejected)]
    return "\n".join(parts)


def markdown_report(plan: Plan, top: int = 10, show_rejected: int = 0) -> str:
    bullets = "\n".join(f"- {line}" for line in header(plan).splitlines())
    if plan.best is None:
        return "\n".join([bullets, "", "```", *rejected_lines(plan, show_rejected or CLOSEST_WHEN_NOTHING_FITS),
                          "```"])
    parts = [bullets, "", table(plan, top, markdown=True), "",
             "```", breakdown(plan, plan.best), "```", "",
             f"Overrides: `{overrides_flags(plan.best, plan.request.distributed_optimizer)}`"]
    if show_rejected:
        parts += ["", "```", *rejected_lines(plan, show_rejected), "```"]
    return "\n".join(parts)


def json_report(plan: Plan) -> str:
    def entry(c: Candidate) -> dict:
        out = {"layout": vars(c.layout), "problems": c.problems}
        if c.memory:
            out["memory_gib"] = {k: v / GIB for k, v in c.memory.terms.items()}
            out["memory_gib"]["total"] = c.memory.total / GIB
            out["step_s"] = {k: v for k, v in vars(c.time).items() if k != "model_flops"}
            out["step_s"]["total"] = c.time.total
            out["mfu"] = c.time.mfu(plan.request.gpus, plan.request.gpu.peak_tflops)
        return out

    return json.dumps({"header": header(plan).splitlines(), "ranked": [entry(c) for c in plan.ranked],
                       "rejected": [entry(c) for c in plan.rejected]}, indent=1)
