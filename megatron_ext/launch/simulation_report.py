"""`megatron-ext plan --simulate`'s output: per pipeline stage, the simulated peak split by category next to
the planner's terms for the same stage, where the peak happened, whether it fits; text, Markdown or JSON.
Imports no megatron.
"""

import json

from megatron_ext.launch.live_storage import ACTIVATIONS, CATEGORIES, TEMPORARIES
from megatron_ext.launch.memory import GIB
from megatron_ext.launch.simulate import Simulation, StageSimulation


def difference(simulated: float, planned: float) -> str:
    if planned == 0:
        return "-" if simulated == 0 else "new"
    return f"{100 * (simulated - planned) / planned:+.1f}%"


def stage_rows(stage: StageSimulation) -> list[tuple[str, float, float]]:
    planned = stage.planner_split()
    rows = [(category, stage.split[category] / GIB, planned[category] / GIB) for category in CATEGORIES]
    # at a peak inside the cross entropy its fp32 logits are not saved yet (a temporary here, an activation to
    # the planner): the two compare as a sum
    both = [sum(split[c] for c in (ACTIVATIONS, TEMPORARIES)) / GIB for split in (stage.split, planned)]
    return rows + [("activations + temp.", *both), ("peak", stage.peak / GIB, stage.planner.total / GIB)]


def verdict(simulation: Simulation) -> str:
    peak = simulation.peak
    usable = simulation.usable_bytes / GIB
    if simulation.fits:
        return f"fits: simulated peak {peak.peak / GIB:.2f} GiB (stage {peak.stage}) of {usable:.1f} GiB usable"
    return (f"DOES NOT FIT: simulated peak {peak.peak / GIB:.2f} GiB (stage {peak.stage}) exceeds the "
            f"{usable:.1f} GiB usable of {simulation.device_bytes / GIB:.1f} GiB per GPU")


def _stage_header(simulation: Simulation, stage: StageSimulation) -> str:
    phases = ", ".join(f"{phase} {value / GIB:.2f}" for phase, value in stage.phase_peaks.items())
    return (f"stage {stage.stage} (rank {stage.rank} of {simulation.world_size}): {stage.micro_batches} micro-batches, "
            f"{stage.parameters / 1e9:.3f} B parameters, simulated in {stage.seconds:.1f} s; peak during "
            f"{stage.peak_phase} ({stage.peak_op}); phase peaks GiB: {phases}; activations of one micro-batch "
            f"{stage.activations_per_micro_batch / GIB:.2f} GiB")


def text_report(simulation: Simulation) -> str:
    lines = [f"simulation of {simulation.config_name}: {simulation.layout}, {simulation.layers} layers, one full step "
             "on fake tensors (megatron-core model, DDP, optimizer; flash-attention and fused-RMSNorm stand-ins)"]
    for stage in simulation.stages:
        lines += ["", _stage_header(simulation, stage),
                  f"  {'GiB per GPU':<20}{'simulated':>10}{'planner':>10}{'difference':>12}"]
        lines += [f"  {name:<20}{sim:>10.2f}{plan:>10.2f}{difference(sim, plan):>12}"
                  for name, sim, plan in stage_rows(stage)]
    lines += ["", verdict(simulation), "not simulated: " + "; ".join(simulation.not_simulated)]
    return "\n".join(lines)


def markdown_report(simulation: Simulation) -> str:
    lines = [f"Simulation of `{simulation.config_name}`: {simulation.layout}, {simulation.layers} layers.", ""]
    for stage in simulation.stages:
        lines += [_stage_header(simulation, stage), "", "| GiB per GPU | simulated | planner | difference |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {name} | {sim:.2f} | {plan:.2f} | {difference(sim, plan)} |"
                  for name, sim, plan in stage_rows(stage)]
        lines.append("")
    lines += [verdict(simulation), "", "Not simulated: " + "; ".join(simulation.not_simulated) + "."]
    return "\n".join(lines)


def json_report(simulation: Simulation) -> str:
    return json.dumps(as_dict(simulation), indent=2)


def as_dict(simulation: Simulation) -> dict:
    return dict(
        config=simulation.config_name, layout=str(simulation.layout), layers=simulation.layers,
        world_size=simulation.world_size, usable_gib=simulation.usable_bytes / GIB,
        device_gib=simulation.device_bytes / GIB, fits=simulation.fits,
        peak_gib=simulation.peak.peak / GIB, not_simulated=list(simulation.not_simulated),
        stages=[dict(stage=s.stage, rank=s.rank, micro_batches=s.micro_batches, parameters=s.parameters,
                     seconds=round(s.seconds, 2), peak_gib=s.peak / GIB, planner_gib=s.planner.total / GIB,
                     peak_phase=s.peak_phase, peak_op=s.peak_op,
                     simulated_gib={k: v / GIB for k, v in s.split.items()},
                     planner_gib_by_category={k: v / GIB for k, v in s.planner_split().items()},
                     planner_terms_gib={k: v / GIB for k, v in s.planner.terms.items()},
                     phase_peaks_gib={k: v / GIB for k, v in s.phase_peaks.items()},
                     activations_per_micro_batch_gib=s.activations_per_micro_batch / GIB)
                for s in simulation.stages])


def run_simulation(args, plan) -> int:
    """`plan --simulate`: the plan as `plan` prints it, then the simulation of its first row (the planner's pick,
    after any pinned sizes). Exit 1 when nothing fits or the simulated peak does not fit."""
    from megatron_ext.launch import report
    from megatron_ext.launch.simulate import simulate
    from megatron_ext.launch.workload import read_train_config

    if plan.best is None:
        print(report.text_report(plan, args.top, args.show_rejected))
        return 1
    config = read_train_config(args.config, args.overrides)
    if args.global_batch_size:
        config.training.global_batch_size = args.global_batch_size
    request = plan.request
    simulation = simulate(config, plan.best.layout, name=plan.request.workload.name,
                          distributed_optimizer=request.distributed_optimizer, usable_bytes=request.usable_bytes,
                          device_bytes=request.gpu.memory_gib * GIB, num_layers=args.simulate_layers,
                          flash_attention=request.flash_attention)
    if args.format == "json":
        print(json.dumps(dict(plan=json.loads(report.json_report(plan)), simulation=as_dict(simulation)), indent=2))
    elif args.format == "markdown":
        print(report.markdown_report(plan, args.top, args.show_rejected) + "\n\n" + markdown_report(simulation))
    else:
        print(report.text_report(plan, args.top, args.show_rejected) + "\n\n" + text_report(simulation))
    return 0 if simulation.fits else 1
