"""`megatron-ext` command line: one subcommand per tool, each module imported only when its command runs.

Keep this module free of megatron (and of anything heavy) at import time: worker processes
started with spawn re-import it.
"""

import argparse
import sys


def _add_preprocess(subparsers):
    from megatron_ext.data.preprocess import add_preprocess_args

    add_preprocess_args(subparsers)


def _add_train(subparsers):
    parser = subparsers.add_parser("train", help="train or resume a model from a YAML config",
                                   description="Train a LongContextGPTModel (HARPE / PoSE / any RoPE scaling).")
    parser.add_argument("--config", required=True, help="YAML file, e.g. examples/configs/tiny_harpe_cpu.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. --set optimizer.lr=1e-4 (repeatable)")
    parser.add_argument("--resume", help="auto | none | a checkpoint directory (overrides checkpoint.resume)")
    parser.add_argument("--nproc-per-node", type=int, default=1,
                        help="start this many local processes with torch.distributed.run (CPU: gloo ranks)")
    parser.set_defaults(func=_run_train)


def _run_train(args) -> int:
    import logging
    import os

    from megatron_ext.training.config import load_config

    overrides = list(args.overrides) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
    config = load_config(args.config, overrides)  # every setting checked before any process starts
    if args.nproc_per_node > 1 and "RANK" not in os.environ:
        return _relaunch(args.nproc_per_node)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # megatron-core's own INFO is very chatty
    from megatron_ext.training.train import train

    result = train(config)
    if int(os.environ.get("RANK", "0")) == int(os.environ.get("WORLD_SIZE", "1")) - 1:
        print(f"checkpoint: {result.last_checkpoint}")
        print(f"metrics: {config.logging.metrics_file}  tensorboard: {config.logging.tensorboard_dir}")
    return 0


def _relaunch(nproc: int) -> int:
    """Re-run this very command under torch.distributed.run with nproc local ranks."""
    import subprocess

    argv = [a for a in sys.argv[1:]]
    if "--nproc-per-node" in argv:
        i = argv.index("--nproc-per-node")
        del argv[i:i + 2]
    argv = [a for a in argv if not a.startswith("--nproc-per-node=")]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "megatron_ext.cli", *argv]
    return subprocess.call(command)


def _add_plan(subparsers):
    from megatron_ext.launch.cli import add_plan_args

    add_plan_args(subparsers)


def _add_launch(subparsers):
    from megatron_ext.launch.cli import add_launch_args

    add_launch_args(subparsers)


def _add_eval(subparsers):
    from megatron_ext.eval.cli import add_eval_args

    add_eval_args(subparsers)


def _add_convert(subparsers):
    from megatron_ext.convert.cli import add_convert_args

    add_convert_args(subparsers)


def _add_repro(subparsers):
    from megatron_ext.repro.cli import add_repro_args

    add_repro_args(subparsers)


COMMANDS = [_add_preprocess, _add_train, _add_eval, _add_convert, _add_plan, _add_launch, _add_repro]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-ext", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(subparsers)
    return parser


def quiet_megatron_warnings() -> None:
    """megatron-core warns once per module that TE/apex are missing; we say which path runs in one line."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed")
    warnings.filterwarnings("ignore", message=r".*full scope is deprecated")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    quiet_megatron_warnings()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
