"""`megatron-ext train`: check the config, start local ranks if asked, run the loop (megatron_ext/training/train.py).

Imports nothing heavy until the command runs.
"""

import os
import sys


def add_train_args(subparsers):
    parser = subparsers.add_parser("train", help="train or resume a model from a YAML config",
                                   description="Train a LongContextGPTModel (HARPE / PoSE / any RoPE scaling).")
    parser.add_argument("--config", required=True, help="YAML file, e.g. examples/configs/tiny_harpe_cpu.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. --set optimizer.lr=1e-4 (repeatable)")
    parser.add_argument("--resume", help="auto | none | a checkpoint directory (overrides checkpoint.resume)")
    parser.add_argument("--nproc-per-node", type=int, default=1,
                        help="start this many local processes with torch.distributed.run (CPU: gloo ranks)")
    parser.set_defaults(func=run_train)
    return parser


def run_train(args) -> int:
    from megatron_ext.checkpoint.layout import validate_checkpoint_dir
    from megatron_ext.config import ConfigError, TrainConfig, from_dict, read_raw, validate
    from megatron_ext.training.start import settle_start

    if args.nproc_per_node < 1:
        raise ConfigError(f"--nproc-per-node ({args.nproc_per_node}) must be >= 1")
    overrides = list(args.overrides) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
    given = read_raw(args.config, overrides, example="examples/configs/*.yaml")
    config = from_dict(TrainConfig, given, prefix="")
    # every setting is checked before any process starts: the checkpoint it starts from first (it supplies the
    # architecture), then the whole config
    validate_checkpoint_dir(config.checkpoint.dir)
    start = settle_start(config, given)
    validate(config)
    if args.nproc_per_node > 1 and "RANK" not in os.environ:
        return relaunch(args.argv, args.nproc_per_node)
    from megatron_ext.training.train import train

    result = train(config, start)
    if int(os.environ.get("RANK", "0")) == int(os.environ.get("WORLD_SIZE", "1")) - 1:
        print(f"checkpoint: {result.last_checkpoint}")
        print(f"metrics: {config.logging.metrics_file}  tensorboard: {config.logging.tensorboard_dir}")
    return 0


def relaunch(argv: list[str], nproc: int) -> int:
    """Re-run this very command under torch.distributed.run with nproc local ranks."""
    import subprocess

    argv = list(argv)
    if "--nproc-per-node" in argv:
        i = argv.index("--nproc-per-node")
        del argv[i:i + 2]
    argv = [a for a in argv if not a.startswith("--nproc-per-node=")]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "megatron_ext.cli", *argv]
    return subprocess.call(command)

