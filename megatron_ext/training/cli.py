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
    from megatron_ext.config import ConfigError, TrainConfig, from_dict, read_raw, validate, validate_optimizer
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
    validate_optimizer(config.optimizer)  # no checkpoint supplies these: refused before one is read and verified
    relaunching = args.nproc_per_node > 1 and "RANK" not in os.environ
    start = settle_start(config, given, log_settings=not relaunching and first_rank())
    validate(config)
    check_ranks(config, *ranks_to_start(args.nproc_per_node, relaunching))
    check_data(config)
    if "RANK" not in os.environ:  # ranks that torchrun/srun started were checked by whoever started them
        check_checkpoint_dir_free(config.checkpoint.dir)
    if relaunching:
        return relaunch(args.argv, args.nproc_per_node)
    from megatron_ext.distributed import lost_rank_error
    from megatron_ext.training.train import StopSignal, train

    try:
        result = train(config, start)
    except RuntimeError as error:  # a collective that timed out or lost its peer: name the rank, one line
        lost = lost_rank_error(error, config.parallel.distributed_timeout_minutes,
                               latest_checkpoint(config.checkpoint.dir))
        if lost is None:
            raise
        raise lost from None
    finally:
        if "RANK" in os.environ:  # a launched rank, which exits next (not a caller's process, e.g. a test's)
            StopSignal.ignore_from_now_on()
    if int(os.environ.get("RANK", "0")) == int(os.environ.get("WORLD_SIZE", "1")) - 1:
        print(f"checkpoint: {result.last_checkpoint}")
        print(f"metrics: {config.logging.metrics_file}  tensorboard: {config.logging.tensorboard_dir}")
    return 0


def check_data(config) -> None:
    """The data was made with the run's tokenizer and no id exceeds the vocabulary (megatron_ext/data/
    tokenizer_record.py): one line before any process starts, not an IndexError inside the first step."""
    from megatron_ext.data.tokenizer_record import check_training_data

    if config.data.tiny_corpus:  # the tiny corpus is made, with its own tokenizer, by the ranks
        return
    for name in ("train_data", "valid_data"):  # each refusal names the setting the data came from
        if getattr(config.data, name):
            check_training_data(getattr(config.data, name), *config.data.tokenizer_source(),
                                model_vocab_size=config.model.vocab_size, mask_eod_loss=config.data.mask_eod_loss,
                                setting=f"data.{name}")


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


def latest_checkpoint(root) -> str | None:
    """The checkpoint `root/latest` names, as the error of a failed run quotes it (None: no checkpoint yet)."""
    from pathlib import Path

    try:
        name = (Path(root) / "latest").read_text().strip()
    except OSError:
        return None
    return str(Path(root) / name) if name else None


def check_checkpoint_dir_free(root) -> None:
    """Refuse, before any rank starts, a checkpoint.dir another live job holds (rank 0 takes the lock for the
    run; a refusal inside the ranks would end in torchrun's traceback). A holder that outlived its launcher
    (an orphaned rank of an earlier job) is named as such, with the command that ends it."""
    from megatron_ext.checkpoint.lock import CheckpointDirLocked, lock_checkpoint_dir, release_checkpoint_dir

    try:
        taken = lock_checkpoint_dir(root)
    except CheckpointDirLocked as refusal:
        orphan = describe_orphan(root)
        raise CheckpointDirLocked(f"{refusal}{orphan}") from None
    if taken:
        release_checkpoint_dir(root)


def describe_orphan(root) -> str:
    """'; process N is ... whose launcher is gone' when the lock's holder runs on this host without its parent
    (re-parented to init or a subreaper), else ''."""
    import json
    import socket
    from pathlib import Path

    import psutil

    from megatron_ext.checkpoint.lock import LOCK_FILE

    try:
        owner = json.loads((Path(root) / LOCK_FILE).read_text())
        if owner.get("host") != socket.gethostname():
            return ""
        holder = psutil.Process(int(owner["pid"]))
        parent = holder.parent()
        command = " ".join(holder.cmdline())[:160]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, psutil.Error):
        return ""
    # re-parented: to init (pid 1) or a session's reaper (systemd --user); a holder whose parent lives is no orphan
    if parent is not None and parent.pid != 1 and parent.name() not in ("systemd", "init"):
        return ""
    return (f"; process {holder.pid} on {owner['host']} is an orphan: its launcher is gone (parent now "
            f"{parent.pid if parent else 'none'} {parent.name() if parent else ''}), command: {command!r}. "
            f"End it with `kill {holder.pid}` (it saves and exits), then start this job again")


def relaunch(argv: list[str], nproc: int) -> int:
    """Re-run this very command under torch.distributed.run with nproc local ranks; return its exit code.

    torchrun runs in its own session, so a signal sent to this process's group (Ctrl-C, SLURM, a closed SSH
    session) reaches this process only. SIGTERM / SIGUSR1 / SIGINT / SIGHUP are passed on to the ranks, which
    save and exit 0, and then torchrun exits 0; we wait for it, so nothing is left behind. (Signalled itself,
    torchrun would kill the ranks after 30 s and fail; SIGUSR1 would kill it outright.) A second signal goes
    to torchrun, which stops the ranks.

    Killed outright (kill -9, the OOM killer), this process cannot pass anything on: torchrun then gets SIGTERM
    from the kernel (Linux's parent-death signal), passes it to the ranks, which save and exit, so no rank
    outlives us holding checkpoint.dir's lock. The ranks also stop by themselves once torchrun is gone
    (StopSignal in training/train.py).
    """
    import signal
    import subprocess

    argv = list(argv)
    if "--nproc-per-node" in argv:
        i = argv.index("--nproc-per-node")
        del argv[i:i + 2]
    argv = [a for a in argv if not a.startswith("--nproc-per-node=")]
    command = [sys.executable, "-c", "import sys; from megatron_ext.training.cli import torchrun_main; "
               "sys.exit(torchrun_main(sys.argv[1:]))", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "megatron_ext.cli", *argv]
    forwarded = []
    torchrun = subprocess.Popen(command, start_new_session=True, preexec_fn=die_with_parent(os.getpid()))

    def forward(signum, frame):
        if forwarded or not _signal_ranks(torchrun.pid, signum):
            torchrun.send_signal(signal.SIGTERM)
        forwarded.append(signum)

    previous = {sig: signal.signal(sig, forward) for sig in map(signal.Signals.__getitem__, FORWARDED_SIGNALS)}
    try:
        return torchrun.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


FORWARDED_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT", "SIGHUP")  # the ranks' stop signals (StopSignal.SIGNALS)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent_pid: int):
    """A preexec_fn: the child gets SIGTERM when `parent_pid` (the thread that forks it) dies, on Linux; and at
    once if that happened before the call (the fork raced the death). None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None

    def preexec():
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGTERM)
    return preexec


def torchrun_main(argv: list[str]) -> int:
    """torch.distributed.run with its arguments, ending in our terms: exit 2 when a rank refused with a one-line
    error (exit 2, its line printed above), else 1 with one line naming the ranks that failed and how, in place
    of torchrun's ChildFailedError traceback."""
    import signal

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv))
    except ChildFailedError as error:
        failures = sorted(error.failures.items())
        codes = [failure.exitcode for _, failure in failures]
        if 2 in codes:
            return 2

        def how(code):
            return f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"
        print("megatron-ext train: " + "; ".join(f"rank {rank} {how(f.exitcode)}" for rank, f in failures)
              + " (the ranks' output is above)", file=sys.stderr)
        return 1
    return 0


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
