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
    parser.add_argument("--no-verify", action="store_true",
                        help="load checkpoints without checking their files against the manifest (checkpoint.verify)")
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
    overrides += ["checkpoint.verify=false"] if args.no_verify else []
    given = read_raw(args.config, overrides, example="examples/configs/*.yaml")
    config = from_dict(TrainConfig, given, prefix="")
    # every setting is checked before any process starts: the checkpoint it starts from first (it supplies the
    # architecture), then the whole config
    validate_checkpoint_dir(config.checkpoint.dir)
    relaunching = args.nproc_per_node > 1 and "RANK" not in os.environ
    start = settle_start(config, given, log_settings=not relaunching and first_rank())
    validate(config)
    check_ranks(config, *ranks_to_start(args.nproc_per_node, relaunching))
    check_data(config)
    if relaunching:
        return relaunch(args.argv, args.nproc_per_node)
    from megatron_ext.training.train import train

    result = train(config, start)
    if int(os.environ.get("RANK", "0")) == int(os.environ.get("WORLD_SIZE", "1")) - 1:
        print(f"checkpoint: {result.last_checkpoint}")
        print(f"metrics: {config.logging.metrics_file}  tensorboard: {config.logging.tensorboard_dir}")
    return 0


def check_data(config) -> None:
    """The data was made with the run's tokenizer and no id exceeds the vocabulary (megatron_ext/data/
    tokenizer_record.py): one line before any process starts, not an IndexError inside the first step."""
    from megatron_ext.data.tokenizer_record import check_training_data

    if not config.data.tiny_corpus:  # the tiny corpus is made, with its own tokenizer, by the ranks
        check_training_data(config.data.train_data, *config.data.tokenizer_source(),
                            model_vocab_size=config.model.vocab_size)


def ranks_to_start(nproc_per_node: int, relaunching: bool) -> tuple[int, str]:
    """(the world size this command will run in, where that number comes from): --nproc-per-node when this
    process starts the ranks, else torchrun's or srun's environment, else one process."""
    from megatron_ext.distributed import distributed_env_from_slurm

    if relaunching:
        return nproc_per_node, f"--nproc-per-node {nproc_per_node}"
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"]), "WORLD_SIZE"
    slurm = distributed_env_from_slurm(os.environ)
    if slurm:
        return int(slurm["WORLD_SIZE"]), "the srun tasks"
    return nproc_per_node, f"--nproc-per-node {nproc_per_node}"


def check_ranks(config, ranks: int, source: str) -> None:
    """The planner's layout rules (megatron_ext/config/layout.py) with the ranks about to start: one line, before
    any process exists, instead of a failure inside every rank."""
    from megatron_ext.config import ConfigError
    from megatron_ext.config.layout import config_layout_problems

    problems = config_layout_problems(config, ranks)
    if problems:
        raise ConfigError(f"{'; '.join(problems)} (ranks: {source})")


def first_rank() -> bool:
    """Whether this process is rank 0 (or the only one), under torchrun or srun."""
    from megatron_ext.distributed import distributed_env_from_slurm

    rank = os.environ.get("RANK") or distributed_env_from_slurm(os.environ).get("RANK", "0")
    return int(rank) == 0


def relaunch(argv: list[str], nproc: int) -> int:
    """Re-run this very command under torch.distributed.run with nproc local ranks; return its exit code.

    torchrun runs in its own session, so a signal sent to this process's group (Ctrl-C, SLURM) reaches this
    process only. SIGTERM / SIGUSR1 / SIGINT are passed on to the ranks, which save and exit 0, and then
    torchrun exits 0; we wait for it, so nothing is left behind. (Signalled itself, torchrun would kill the
    ranks after 30 s and fail; SIGUSR1 would kill it outright.) A second signal goes to torchrun, which stops
    the ranks.
    """
    import signal
    import subprocess

    argv = list(argv)
    if "--nproc-per-node" in argv:
        i = argv.index("--nproc-per-node")
        del argv[i:i + 2]
    argv = [a for a in argv if not a.startswith("--nproc-per-node=")]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "megatron_ext.cli", *argv]
    forwarded = []
    torchrun = subprocess.Popen(command, start_new_session=True)

    def forward(signum, frame):
        if forwarded or not _signal_ranks(torchrun.pid, signum):
            torchrun.send_signal(signal.SIGTERM)
        forwarded.append(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        return torchrun.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _signal_ranks(torchrun_pid: int, signum: int) -> bool:
    """Send `signum` to the ranks torchrun started; False if it has none (yet)."""
    import psutil

    try:
        ranks = psutil.Process(torchrun_pid).children()
    except psutil.NoSuchProcess:
        return False
    for rank in ranks:
        try:
            rank.send_signal(signum)
        except psutil.NoSuchProcess:
            pass
    return bool(ranks)
