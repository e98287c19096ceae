"""`megatron-ext plan` (layouts that fit, ranked) and `megatron-ext launch` (an sbatch from a config and
the planner's choice). Bad input raises LaunchError, printed by megatron_ext.cli. Imports no megatron.
"""

import argparse
import shlex
from pathlib import Path

from megatron_ext.launch.errors import LaunchError
from megatron_ext.launch.sbatch import CONTAINER_RUNTIMES
from megatron_ext.launch.presets import FP8_GEMM_SPEEDUP, GPUS, METHODS, MODELS

JOBS = ("train", "eval", "convert")
JOB_NOTES = {  # header lines of the scripts whose arguments come at submission
    "eval": "Example: sbatch {script} suite --config examples/configs/eval_llama2_7b_128k_suite.yaml (passkey\n"
            "and RULER of Llama-2-7B HARPE at 128k on TP2 x CP4; the config says why). Ranks = TP x PP x CP x DP:\n"
            "TP x PP x CP ranks run each prompt, the DP replicas split the prompts (megatron-ext eval --help).\n"
            "A Hugging Face model runs on one device: sbatch --ntasks-per-node=1 {script} passkey --model DIR",
    "convert": "Example: sbatch {script} hf-to-mcore --hf /models/Llama-2-7b-hf --out /checkpoints/llama2_7b\n"
               "(megatron-ext convert --help); one task.",
}


# --- plan ------------------------------------------------------------------------------------


def add_plan_args(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "plan", help="estimate memory and step time of parallel layouts; rank those that fit",
        description="Enumerate TP/PP/CP/DP/micro-batch/recompute layouts, reject those that do not fit "
                    "(with the reason), rank the rest by estimated step time. Formulas: docs/launch.md.")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", choices=sorted(MODELS), help="a preset model shape")
    what.add_argument("--config", help="a training YAML (model shape, lengths, PoSE, global batch from it)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of --config (repeatable)")
    parser.add_argument("--seq-length", type=int, help="with --model: the context length (PoSE: the target)")
    parser.add_argument("--method", choices=METHODS, default="harpe",
                        help="with --model: harpe (train at full length, a base per KV group), pose (train a "
                             "short window with ids up to --seq-length), rope (one base)")
    parser.add_argument("--pose-window", type=int, default=2048, help="with --method pose: the trained window")
    parser.add_argument("--global-batch-size", type=int, help="samples per step (default: the config's, or 32)")
    _add_hardware_args(parser)
    parser.add_argument("--gpus", type=int, required=True, help="total GPUs")
    parser.add_argument("--tp", type=int, help="pin tensor parallelism")
    parser.add_argument("--pp", type=int, help="pin pipeline parallelism")
    parser.add_argument("--cp", type=int, help="pin context parallelism")
    parser.add_argument("--micro-batch-size", type=int, help="pin the micro-batch size")
    parser.add_argument("--recompute", help="pin activation recompute: none, selective or full")
    parser.add_argument("--cp-comm-type", choices=("p2p", "a2a", "allgather", "a2a+p2p"),
                        help="pin the context-parallel exchange (default: each one is ranked)")
    parser.add_argument("--top", type=int, default=10, help="rows of the ranked table")
    parser.add_argument("--show-rejected", type=int, default=0, metavar="N",
                        help="also list the N rejected layouts closest to fitting, each with why "
                             "(when none fits: 5 unless given)")
    parser.add_argument("--format", choices=("text", "markdown", "json"), default="text")
    parser.add_argument("--simulate", action="store_true",
                        help="with --config: also build one rank of every pipeline stage of row 1 on fake tensors "
                             "(the real model, DDP and optimizer), run one step, report its measured peak memory")
    parser.add_argument("--simulate-layers", type=int, metavar="N",
                        help="with --simulate: N transformer layers instead of the model's (a quick check)")
    parser.set_defaults(func=run_plan)
    return parser


def _add_hardware_args(parser) -> None:
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h100-80gb")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--mfu", type=float, default=0.40,
                        help="fraction of peak bf16 FLOP/s the executed math reaches (Llama 3 at 128k: 0.38)")
    parser.add_argument("--reserve-gib", type=float, default=8.0,
                        help="memory per GPU outside the estimate (CUDA context, NCCL, workspaces, fragmentation)")
    parser.add_argument("--no-distributed-optimizer", dest="distributed_optimizer", action="store_false",
                        help="replicate the optimizer states on every DP rank")
    parser.add_argument("--no-flash-attention", dest="flash_attention", action="store_false",
                        help="count the s x s attention scores (unfused attention)")
    parser.add_argument("--no-overlap", dest="overlap", action="store_false",
                        help="gradient reduction and weight all-gather after compute, not overlapped with it")
    parser.add_argument("--fp8", choices=("off", "hybrid", "e4m3"), default="off",
                        help="FP8 GEMMs (Transformer Engine) in the transformer layers")
    parser.add_argument("--fp8-gemm-speedup", type=float, default=FP8_GEMM_SPEEDUP,
                        help="with --fp8: how much faster those GEMMs run than in bf16 (an assumption)")


def plan_request(args, *, workload=None, gpus=None):
    """The PlanRequest the arguments describe (workload and gpus may be given by the caller)."""
    import dataclasses

    from megatron_ext.launch.planner import PlanRequest

    if not 0 < args.mfu <= 1:
        raise LaunchError(f"--mfu {args.mfu}: give a fraction in (0, 1], e.g. 0.4")
    gpus = gpus or args.gpus
    if gpus < 1 or args.gpus_per_node < 1:
        raise LaunchError(f"--gpus ({gpus}) and --gpus-per-node ({args.gpus_per_node}) must be at least 1")
    gpu = dataclasses.replace(GPUS[args.gpu], gpus_per_node=args.gpus_per_node)
    return PlanRequest(workload or plan_workload(args), gpu, gpus, mfu=args.mfu,
                       reserve_gib=args.reserve_gib, distributed_optimizer=args.distributed_optimizer,
                       flash_attention=args.flash_attention, overlap=args.overlap, fp8=args.fp8,
                       fp8_gemm_speedup=args.fp8_gemm_speedup)


def plan_workload(args):
    from megatron_ext.launch.presets import model_preset
    from megatron_ext.launch.workload import read_train_config, workload_from_config, workload_from_preset

    if args.config:
        config = read_train_config(args.config, args.overrides)
        if args.global_batch_size:
            config.training.global_batch_size = args.global_batch_size
        return workload_from_config(config, Path(args.config).stem)
    if args.overrides:
        raise LaunchError("--set needs --config (with --model use --seq-length, --method, --global-batch-size)")
    if not args.seq_length:
        raise LaunchError("--model needs --seq-length, e.g. --seq-length 131072")
    return workload_from_preset(args.model, model_preset(args.model), args.seq_length, method=args.method,
                                pose_window=args.pose_window, global_batch_size=args.global_batch_size or 32)


def run_plan(args) -> int:
    from megatron_ext.launch import report
    from megatron_ext.launch.planner import plan
    from megatron_ext.launch.workload import RECOMPUTE

    if args.recompute not in (None, *RECOMPUTE):
        raise LaunchError(f"--recompute {args.recompute!r}: pick one of {', '.join(RECOMPUTE)}")

    fixed = {key: getattr(args, key) for key in ("tp", "pp", "cp", "micro_batch_size", "recompute", "cp_comm_type")
             if getattr(args, key) is not None}
    if args.simulate and not args.config:
        raise LaunchError("--simulate needs --config (a training YAML: the simulation builds its model)")
    result = plan(plan_request(args), fixed)
    if args.simulate:
        from megatron_ext.launch.simulation_report import run_simulation
        return run_simulation(args, result)
    if args.format == "json":
        print(report.json_report(result))
    elif args.format == "markdown":
        print(report.markdown_report(result, args.top, args.show_rejected))
    else:
        print(report.text_report(result, args.top, args.show_rejected))
    return 0 if result.best else 1


# --- launch ----------------------------------------------------------------------------------


def add_launch_args(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "launch", help="render an sbatch script (srun + container + requeue) from a config and the planner",
        description="Write an sbatch script for SLURM with pyxis/enroot or Apptainer. For --job train the "
                    "planner picks the layout for nodes x GPUs and the script passes it as --set overrides.")
    parser.add_argument("--job", choices=JOBS, default="train")
    parser.add_argument("--config", help="training YAML (required for --job train)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of --config; baked into the script (repeatable)")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--tasks-per-node", type=int,
                        help="default: one per GPU for train; 1 for eval and convert (sbatch --ntasks-per-node=N "
                             "overrides it, e.g. for a megatron checkpoint evaluated at TP N)")
    parser.add_argument("--cpus-per-task", type=int,
                        help="default: each node's CPUs shared by its tasks, worked out in the job")
    parser.add_argument("--mem", default="0", help="SLURM --mem per node (default 0: all of its memory)")
    parser.add_argument("--container-runtime", choices=CONTAINER_RUNTIMES, default="pyxis",
                        help="the script's default CONTAINER_RUNTIME; none runs in the job's own environment")
    parser.add_argument("--time", default="04:00:00", help="SLURM time limit per run (the job requeues)")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--container-image", help="default: $PWD/megatron_ext.sqsh at submission")
    parser.add_argument("--container-mounts",
                        help="host:container,... (default: the top-level directories of the config's paths)")
    parser.add_argument("--keep-layout", action="store_true",
                        help="keep the config's parallel settings (still checked by the planner)")
    parser.add_argument("--checkpoint-seconds", type=float, default=300.0,
                        help="time a checkpoint save takes; sets how early SLURM signals before the limit")
    parser.add_argument("--output", help="write the script here (default: stdout)")
    _add_hardware_args(parser)
    parser.set_defaults(func=run_launch)
    return parser


def run_launch(args) -> int:
    from megatron_ext.launch.sbatch import DEFAULT_IMAGE, DEFAULT_MOUNTS, SbatchJob, render

    if args.nodes < 1:
        raise LaunchError(f"--nodes {args.nodes}: give at least 1")
    if args.gpus_per_node < 0 or (args.gpus_per_node == 0 and not args.tasks_per_node):
        raise LaunchError(f"--gpus-per-node {args.gpus_per_node}: give the GPUs of a node, or 0 for a CPU job "
                          "with --tasks-per-node N")
    job = SbatchJob(
        job=args.job, title=f"megatron-ext {args.job}", job_name=f"megatron-ext-{args.job}",
        command=["megatron-ext", args.job], nodes=args.nodes, gpus_per_node=args.gpus_per_node,
        tasks_per_node=args.tasks_per_node or (args.gpus_per_node if args.job == "train" else 1),
        cpus_per_task=args.cpus_per_task, mem=args.mem, container_runtime=args.container_runtime,
        time=args.time, partition=args.partition, account=args.account,
        container_image=args.container_image or DEFAULT_IMAGE,
        container_mounts=args.container_mounts or DEFAULT_MOUNTS,
        generated_by=shlex.join(["megatron-ext", *args.argv]),  # argv: set by megatron_ext.cli.main
        script=args.output or "job.sbatch",
    )
    if args.job == "train":
        if not args.config:
            raise LaunchError("--job train needs --config (the training YAML the job runs)")
        _plan_training_job(args, job)
    elif args.config:
        raise LaunchError(f"--job {args.job} takes its settings at submission: sbatch script.sbatch ARGS")
    else:
        job.notes = ["", *JOB_NOTES[args.job].format(script=job.script).splitlines()]
    text = render(job)
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}")
    else:
        print(text, end="")
    return 0


def _plan_training_job(args, job) -> None:
    """Fill the train command from the config and the layout for nodes x GPUs."""
    from megatron_ext.launch.memory import GIB
    from megatron_ext.launch.sbatch import mounts_for, signal_lead_seconds
    from megatron_ext.launch.workload import read_train_config, workload_from_config

    config = read_train_config(args.config, args.overrides)
    name = Path(args.config).stem
    job.job_name = name
    if args.gpus_per_node == 0:  # a CPU job: the config's layout as it is; the planner models GPUs only
        layout_overrides, step = [], 0.0
        job.title = f"{name}: train on {args.nodes} node(s) x {job.tasks_per_node} CPU tasks"
        layout_notes = ["Layout: the config's (a CPU job: the planner models GPUs only)"]
    else:
        request = plan_request(args, workload=workload_from_config(config, name), gpus=args.nodes * args.gpus_per_node)
        chosen, layout_overrides = _training_layout(args, config, request)
        step = chosen.time.total
        job.title = f"{name}: train on {args.nodes} node(s) x {args.gpus_per_node} GPUs"
        layout_notes = [
            f"Layout ({'from the config' if args.keep_layout else 'chosen by megatron-ext plan'}): {chosen.layout}",
            f"estimated {chosen.memory.total / GIB:.1f} GiB per GPU and {step:.1f} s per step on {args.gpu} "
            f"({100 * request.mfu:g}% of peak assumed); {config.training.train_iters} iterations ~ "
            f"{config.training.train_iters * step / 3600:.1f} h"]
    job.command = ["megatron-ext", "train", "--config", args.config, "--resume", "auto",
                   *[word for item in [*args.overrides, *layout_overrides] for word in ("--set", item)]]
    job.signal_seconds = signal_lead_seconds(step, args.checkpoint_seconds)
    job.notes = [
        "",
        *layout_notes,
        f"Checkpoints: {config.checkpoint.dir} (checkpoint.dir); logs: logs/{name}-<job id>.out",
        f"Starts from: {_starting_weights(config)}; later runs resume from the newest checkpoint",
    ]
    if not args.container_mounts:
        job.container_mounts = mounts_for([*config.data.train_data, *config.data.valid_data,
                                           config.data.tokenizer_model, config.data.cache_dir, config.checkpoint.dir,
                                           config.checkpoint.pretrained, config.logging.tensorboard_dir,
                                           config.logging.metrics_file])


def _starting_weights(config) -> str:
    """What the first run of the job starts from, as the config says."""
    if config.checkpoint.pretrained:
        return f"{config.checkpoint.pretrained} (checkpoint.pretrained)"
    if config.checkpoint.from_scratch:
        return "random weights (checkpoint.from_scratch: true)"
    return "random weights (no checkpoint.pretrained; models of 1B+ parameters refuse this)"


def _training_layout(args, config, request):
    """(candidate, --set overrides): the config's own layout, checked (--keep-layout), or the planner's best."""
    import dataclasses

    from megatron_ext.launch.planner import evaluate, plan
    from megatron_ext.launch.workload import Layout

    if not args.keep_layout:
        best = plan(request).best
        if best is None:
            raise LaunchError(f"no layout of {args.config} fits {request.gpus} x {request.gpu.name}: run "
                              f"megatron-ext plan --config {args.config} --gpus {request.gpus} to see why")
        return best, best.layout.override_args(request.distributed_optimizer)
    p, t = config.parallel, config.training
    model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
    layout = Layout(p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size,
                    max(1, request.gpus // model_parallel), t.micro_batch_size, t.recompute)
    chosen = evaluate(dataclasses.replace(request, distributed_optimizer=p.use_distributed_optimizer), layout)
    if not chosen.fits:
        raise LaunchError(f"the config's layout ({layout}) on {request.gpus} GPUs: {'; '.join(chosen.problems)}; "
                          "drop --keep-layout to let the planner choose")
    return chosen, []
