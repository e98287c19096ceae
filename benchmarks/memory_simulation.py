"""The planner's memory estimate against the simulation (`megatron-ext plan --simulate`) for the 128k recipes.

Run: python benchmarks/memory_simulation.py [--recipes llama2 llama3 qwen2] [--layers N] [--output PATH]
     python benchmarks/memory_simulation.py --planner-only   (the planner's columns of the stored simulations
     recomputed with the current formulas: checks a planner change against them without simulating again)
For each recipe: the planner's layout for its cluster (row 1 of `megatron-ext plan --config <recipe> --gpus N`,
the layout the recipe's parallel section states), then one rank of every pipeline stage of it simulated on fake
tensors for one full step. Prints, per recipe, the planner's and the simulation's peak per GPU by category,
with the simulation's wall time on this machine, and writes docs/results/memory_simulation.json.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {  # name -> (config, GPUs the recipe's comments plan for)
    "llama2": ("examples/configs/llama2_7b_harpe_128k.yaml", 64),
    "llama3": ("examples/configs/llama3_8b_harpe_128k.yaml", 64),
    "qwen2": ("examples/configs/qwen2_7b_pose_128k.yaml", 8),
}


def run(name: str, layers: int | None) -> dict:
    from megatron_ext.launch.cli import add_plan_args
    from megatron_ext.launch.planner import plan
    from megatron_ext.launch.simulate import simulate
    from megatron_ext.launch.simulation_report import as_dict, text_report
    from megatron_ext.launch.workload import read_train_config

    config_path, gpus = RECIPES[name]
    parser = argparse.ArgumentParser()
    add_plan_args(parser.add_subparsers())
    args = parser.parse_args(["plan", "--config", str(ROOT / config_path), "--gpus", str(gpus)])
    from megatron_ext.launch.cli import plan_request

    request = plan_request(args)
    best = plan(request).best
    config = read_train_config(ROOT / config_path)
    started = time.perf_counter()
    simulation = simulate(config, best.layout, name=Path(config_path).stem, usable_bytes=request.usable_bytes,
                          device_bytes=request.gpu.memory_gib * 1024 ** 3, num_layers=layers,
                          distributed_optimizer=request.distributed_optimizer)
    print(text_report(simulation), flush=True)
    result = as_dict(simulation)
    result.update(recipe=config_path, gpus=gpus, wall_seconds=round(time.perf_counter() - started, 1),
                  cpu_threads=os.cpu_count(),
                  command=f"python benchmarks/memory_simulation.py --recipes {name}"
                          + (f" --layers {layers}" if layers else ""))
    return result


def replan(result: dict) -> None:
    """Recompute the planner's columns of one stored recipe result with the current launch/memory.py."""
    from megatron_ext.launch.cli import add_plan_args, plan_request
    from megatron_ext.launch.memory import GIB, stage_memory
    from megatron_ext.launch.simulate import PLANNER_CATEGORY, layout_config
    from megatron_ext.launch.planner import plan
    from megatron_ext.launch.workload import read_train_config, workload_from_config

    parser = argparse.ArgumentParser()
    add_plan_args(parser.add_subparsers())
    args = parser.parse_args(["plan", "--config", str(ROOT / result["recipe"]), "--gpus", str(result["gpus"])])
    layout = plan(plan_request(args)).best.layout
    assert str(layout) == result["layout"], (str(layout), result["layout"])
    config = layout_config(read_train_config(ROOT / result["recipe"]), layout, num_layers=result.get("layers"))
    work = workload_from_config(config, Path(result["recipe"]).stem)
    for stage in result["stages"]:
        memory = stage_memory(work, layout, stage["stage"])
        by_category = dict.fromkeys(stage["planner_gib_by_category"], 0.0)
        for term, value in memory.terms.items():
            by_category[PLANNER_CATEGORY.get(term, "temporaries")] += value / GIB
        stage.update(planner_gib=memory.total / GIB, planner_gib_by_category=by_category,
                     planner_terms_gib={k: v / GIB for k, v in memory.terms.items()})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=sorted(RECIPES))
    parser.add_argument("--layers", type=int, help="simulate this many layers instead of the model's")
    parser.add_argument("--output", default=str(ROOT / "docs/results/memory_simulation.json"),
                        help="JSON file; results of recipes not run now are kept from it")
    parser.add_argument("--planner-only", action="store_true",
                        help="recompute the planner's columns of the stored results; simulate nothing")
    args = parser.parse_args(argv)
    output = Path(args.output)
    results = json.loads(output.read_text()) if output.is_file() else {}
    for result in results.values() if args.planner_only else ():
        replan(result)
    for name in [] if args.planner_only else args.recipes:
        key = name if args.layers is None else f"{name}_{args.layers}_layers"
        results[key] = run(name, args.layers)
        output.write_text(json.dumps(results, indent=2) + "\n")
    if args.planner_only:
        output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{'recipe':<24}{'layout':<52}{'planner GiB':>12}{'simulated GiB':>15}{'wall s':>8}")
    for key, r in results.items():
        stage = max(r["stages"], key=lambda s: s["peak_gib"])
        print(f"{key:<24}{r['layout']:<52}{stage['planner_gib']:>12.2f}{stage['peak_gib']:>15.2f}"
              f"{r['wall_seconds']:>8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
