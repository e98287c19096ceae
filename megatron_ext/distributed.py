"""Processes and parallel groups: the SLURM -> torch.distributed environment mapping, the process group and
megatron's TP/PP/CP/DP groups for a run, and the one-process group conversion and evaluation use.

Imports torch and megatron only inside the functions that need them (launch/slurm.py's srun wrapper
imports the mapping before anything heavy); never the training loop, the launcher or the CLI.
"""

import atexit
import contextlib
import logging
import os
import re
from collections.abc import Mapping

from megatron_ext.errors import UserError

log = logging.getLogger("megatron_ext")


class LayoutError(UserError, ValueError):
    """The processes started do not fit the parallel layout asked for."""


# --- SLURM: srun starts one process per GPU, without torchrun --------------------------------

PORT_BASE, PORT_SPAN = 15000, 15000  # below Linux's ephemeral ports (32768+)


def expand_hostlist(hostlist: str) -> list[str]:
    """SLURM's compressed host list -> host names: 'gpu[07-08,10],login1' -> gpu07, gpu08, gpu10, login1.

    Zero padding is kept ('[07-08]'); several bracket groups in one name multiply ('r[1-2]n[1-2]')."""
    hosts = []
    for item in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", hostlist):
        hosts += _expand_one(item)
    return hosts


def _expand_one(name: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", name)
    if match is None:
        return [name]
    head, tail = name[:match.start()], name[match.end():]
    numbers = []
    for part in match.group(1).split(","):
        first, _, last = part.partition("-")
        width = len(first)
        numbers += [str(i).zfill(width) for i in range(int(first), int(last or first) + 1)]
    return [head + number + rest for number in numbers for rest in _expand_one(tail)]


def expand_tasks_per_node(spec: str) -> list[int]:
    """SLURM's tasks-per-node list -> one count per node: '4(x2),3' -> [4, 4, 3]."""
    counts = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            raise ValueError(f"cannot read tasks per node {spec!r}: expected e.g. '8(x2),4'")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def distributed_env_from_slurm(environ: Mapping[str, str]) -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT of this srun task,
    or {} outside an srun step (a batch script, salloc shell or no SLURM: SLURM_STEP_NUM_TASKS unset).

    MASTER_ADDR is the step's first node, where SLURM puts rank 0; MASTER_PORT is derived from the
    job id so that every task agrees without talking. A MASTER_ADDR or MASTER_PORT already in
    `environ` (e.g. exported by the sbatch script) is kept.
    """
    if "SLURM_STEP_NUM_TASKS" not in environ or "SLURM_PROCID" not in environ:
        return {}
    rank, world = int(environ["SLURM_PROCID"]), int(environ["SLURM_STEP_NUM_TASKS"])
    local_rank, node = int(environ["SLURM_LOCALID"]), int(environ.get("SLURM_NODEID", "0"))
    per_node = expand_tasks_per_node(environ.get("SLURM_STEP_TASKS_PER_NODE")
                                     or environ.get("SLURM_TASKS_PER_NODE", str(world)))
    nodelist = (environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
                or environ.get("SLURM_NODELIST"))
    if node >= len(per_node) or not 0 <= local_rank < per_node[node] or not 0 <= rank < world:
        raise ValueError(
            f"inconsistent SLURM task: SLURM_PROCID={rank} of {world}, SLURM_LOCALID={local_rank}, "
            f"SLURM_NODEID={node}, tasks per node {per_node}: start it with srun inside the allocation"
        )
    master = environ.get("MASTER_ADDR") or (expand_hostlist(nodelist)[0] if nodelist else None)
    if master is None:
        raise ValueError("no SLURM_STEP_NODELIST / SLURM_JOB_NODELIST to find rank 0's node: export MASTER_ADDR")
    port = environ.get("MASTER_PORT") or str(PORT_BASE + int(environ.get("SLURM_JOB_ID", "0")) % PORT_SPAN)
    return dict(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank),
                LOCAL_WORLD_SIZE=str(per_node[node]), MASTER_ADDR=master, MASTER_PORT=port)


# --- the process group and megatron's parallel groups -----------------------------------------

def setup_distributed(parallel):
    """Join (or create) the process group and megatron's TP/PP/CP/DP groups for `parallel` (a ParallelConfig).

    Under torchrun or srun the environment says who we are; alone, a one-process group is made.
    Returns this rank's device (CUDA with NCCL, else CPU with gloo and megatron's CPU patches).
    """
    import torch
    from megatron.core import parallel_state as ps

    from megatron_ext.compat import prepare_megatron
    from megatron_ext.compat.extras import fused_kernels_line

    if not torch.distributed.is_initialized():
        for key, value in distributed_env_from_slurm(os.environ).items():  # srun without torchrun
            os.environ.setdefault(key, value)
    prepare_megatron()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device, backend = torch.device("cuda", torch.cuda.current_device()), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        share_cpus_among_local_ranks(torch)
    log.info(f"megatron_ext: device {device}, backend {backend}, fused kernels: {fused_kernels_line()}")
    if not torch.distributed.is_initialized():
        if "RANK" not in os.environ:  # a plain single-process run: an in-process store, so no port is held and
            # no rendezvous variable is exported (a `megatron-ext train` this script starts later would inherit
            # MASTER_PORT and fail to bind it while this group lives)
            torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1,
                                                 timeout=collective_timeout(parallel))
        else:
            torch.distributed.init_process_group(backend, timeout=collective_timeout(parallel))
    world = torch.distributed.get_world_size()
    model_parallel = (parallel.tensor_model_parallel_size * parallel.pipeline_model_parallel_size
                      * parallel.context_parallel_size)
    if world % model_parallel != 0:
        raise LayoutError(
            f"world size {world} is not a multiple of TP x PP x CP = {model_parallel}: launch "
            f"a multiple of {model_parallel} processes or change the parallel section")
    hierarchical = getattr(parallel, "hierarchical_context_parallel_sizes", None)
    if getattr(parallel, "cp_comm_type", "p2p") != "a2a+p2p" or parallel.context_parallel_size == 1:
        hierarchical = None  # only the a2a+p2p exchange reads megatron's hierarchical CP groups
    ps.initialize_model_parallel(tensor_model_parallel_size=parallel.tensor_model_parallel_size,
                                 pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
                                 virtual_pipeline_model_parallel_size=getattr(
                                     parallel, "virtual_pipeline_model_parallel_size", None),
                                 context_parallel_size=parallel.context_parallel_size,
                                 hierarchical_context_parallel_sizes=hierarchical,
                                 distributed_timeout_minutes=collective_timeout(parallel).total_seconds() / 60)
    if world > 1:
        RankHeartbeat.start(torch.distributed.get_rank(), world)
    return device


def collective_timeout(parallel):
    """parallel.distributed_timeout_minutes as the timedelta torch's process groups take (Megatron-LM's default 10
    minutes where the setting is absent, e.g. an older ParallelConfig)."""
    import datetime

    return datetime.timedelta(minutes=float(getattr(parallel, "distributed_timeout_minutes", 10.0)))


def join_parallel_state(parallel, *, setting: str | None = None):
    """setup_distributed(parallel) for a caller that may find the process group and megatron's groups already
    there (evaluation inside a script or a suite, a second model of one run): those are used when their TP, PP and
    CP sizes are `parallel`'s, and refused by name when not. `setting` names where the sizes came from in a
    refusal (e.g. evaluation's flags); without it setup_distributed's own error stands. Returns this rank's device.
    """
    import torch
    from megatron.core import parallel_state as ps

    from megatron_ext.compat import prepare_megatron

    wanted = (parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
              parallel.context_parallel_size)
    if not ps.model_parallel_is_initialized():
        try:
            return setup_distributed(parallel)
        except LayoutError:
            if setting is None:
                raise
            blocks = wanted[0] * wanted[1] * wanted[2]
            raise LayoutError(
                f"{torch.distributed.get_world_size()} ranks do not split into model replicas of TP x PP x CP = "
                f"{' x '.join(map(str, wanted))} = {blocks} ranks: launch a multiple of {blocks} ranks or change "
                f"{setting}") from None
    have = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
            ps.get_context_parallel_world_size())
    if have != wanted:
        raise LayoutError(f"megatron's parallel state has TP, PP, CP = {have} but {setting or 'the parallel section'} "
                          f"asks for {wanted}: use the same tensor/pipeline/context parallel sizes in one process")
    prepare_megatron()
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def cpu_threads_per_rank(environ=os.environ, cpus: int | None = None) -> int | None:
    """Intra-op threads for one CPU rank: the CPUs this process may use divided among the ranks of this node
    (LOCAL_WORLD_SIZE, or SLURM's tasks on this node); None when OMP_NUM_THREADS says it (the user's choice,
    or torchrun's default of 1 for several ranks)."""
    if environ.get("OMP_NUM_THREADS"):
        return None
    local = environ.get("LOCAL_WORLD_SIZE")
    if local is None and "SLURM_STEP_NUM_TASKS" in environ:
        mapping = distributed_env_from_slurm(environ)
        local = mapping.get("LOCAL_WORLD_SIZE")
    cpus = cpus or len(os.sched_getaffinity(0))
    return max(1, cpus // max(1, int(local or 1)))


def share_cpus_among_local_ranks(torch) -> None:
    """Without OMP_NUM_THREADS, each rank would use every core: two ranks on one machine then oversubscribe it
    (several times slower under load). Give each rank its share, and say so once."""
    threads = cpu_threads_per_rank()
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
        if os.environ.get("RANK", "0") == "0":
            log.info(f"megatron_ext: {threads} CPU threads per rank (the CPUs of this node shared by its ranks; "
                     "OMP_NUM_THREADS overrides)")


@contextlib.contextmanager
def single_process_group():
    """A one-process gloo group and megatron's parallel state at size 1, unless the caller has them.

    Conversion builds the full (unsharded) model in one process: dist_checkpointing then saves
    global tensors that load at any TP/PP, and loads any TP/PP checkpoint into full tensors.
    """
    import tempfile

    import torch
    from megatron.core import parallel_state as ps

    from megatron_ext.compat import prepare_megatron

    prepare_megatron()
    made_group = not torch.distributed.is_initialized()
    with tempfile.TemporaryDirectory() as rendezvous:
        if made_group:
            torch.distributed.init_process_group("gloo", init_method=f"file://{rendezvous}/store",
                                                 rank=0, world_size=1)
        elif torch.distributed.get_world_size() != 1:
            raise LayoutError("this command runs in a single process: start it without torchrun/srun tasks")
        made_state = not ps.model_parallel_is_initialized()
        if made_state:
            ps.initialize_model_parallel()
        elif ps.get_tensor_model_parallel_world_size() * ps.get_pipeline_model_parallel_world_size() != 1:
            raise LayoutError("this command needs megatron's parallel state at TP=PP=1")
        try:
            yield
        finally:
            if made_state:
                ps.destroy_model_parallel()
            if made_group:
                torch.distributed.destroy_process_group()


# --- which rank did not answer: a heartbeat in the rendezvous store --------------------------

class CollectiveTimeout(UserError, RuntimeError):
    """A collective failed because a rank stopped answering (stopped, hung or dead): one line naming it."""


HEARTBEAT_PREFIX = "megatron_ext/heartbeat"


class RankHeartbeat:
    """Every rank counts up a key of its own in the rendezvous store (torchrun's or rank 0's TCPStore) from a
    daemon thread, every `interval` seconds, and records where it runs once. A gloo collective that times out
    (parallel.distributed_timeout_minutes) or loses its peer says nothing about which rank failed; the counters
    do: a rank that is stopped (SIGSTOP, a frozen node), dead or unreachable stops counting, while a rank that
    only waits in a collective keeps counting (the thread runs beside the wait).

    The thread has a store client of its own (a TCPStore client is not shared between threads).
    """

    interval = 1.0
    _running: "RankHeartbeat | None" = None

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    @classmethod
    def start(cls, rank: int, world: int) -> None:
        if cls._running is not None or not os.environ.get("MASTER_ADDR") or not os.environ.get("MASTER_PORT"):
            return  # no TCP rendezvous (a one-process run or a file:// group): nothing to ask later
        import threading

        heartbeat = cls(rank, world)
        heartbeat._stop = threading.Event()
        thread = threading.Thread(target=heartbeat._beat, name="megatron_ext-rank-heartbeat", daemon=True)
        thread.start()
        cls._running = heartbeat

        def stop():  # before the interpreter tears down: a thread still inside the store's C++ client then can
            heartbeat._stop.set()  # abort the process ("terminate called without an active exception")
            thread.join(timeout=2 * cls.interval + 5)
        atexit.register(stop)

    @staticmethod
    def _store(seconds: float):
        import datetime

        import torch

        return torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                          is_master=False, timeout=datetime.timedelta(seconds=seconds),
                                          wait_for_workers=False)

    def _beat(self) -> None:
        import socket

        try:
            store = self._store(60)
            store.set(f"{HEARTBEAT_PREFIX}/where/{self.rank}", f"pid {os.getpid()} on {socket.gethostname()}")
            while not self._stop.is_set():
                store.add(f"{HEARTBEAT_PREFIX}/count/{self.rank}", 1)
                self._stop.wait(self.interval)
        except Exception:  # the store is gone: the run is ending (or its host is); nothing left to tell
            return

    def silent_ranks(self) -> tuple[list[int], list[str]]:
        """(ranks whose counter did not move over a few intervals, where they run); every rank but this one when
        the store itself does not answer (it lives in rank 0 outside torchrun, or in the launcher)."""
        import time

        try:
            store = self._store(max(5.0, 3 * self.interval))
            keys = [f"{HEARTBEAT_PREFIX}/count/{r}" for r in range(self.world)]
            before = [store.add(key, 0) for key in keys]
            time.sleep(3 * self.interval)
            after = [store.add(key, 0) for key in keys]
            silent = [r for r in range(self.world) if r != self.rank and after[r] == before[r]]
            where = []
            for r in silent:
                key = f"{HEARTBEAT_PREFIX}/where/{r}"
                where.append(store.get(key).decode() if store.check([key]) else "never reported")
            return silent, where
        except Exception:
            return [r for r in range(self.world) if r != self.rank], []


# gloo's words for a collective that ran out of time or lost its peer
# (its messages carry the source path, e.g. "[.../gloo/transport/tcp/pair.cc:553] Connection closed by peer ...")
_LOST_PEER = re.compile(r"gloo/|timed out waiting|connection (closed|reset) by peer", re.IGNORECASE)


def lost_rank_error(error: BaseException, timeout_minutes: float, last_checkpoint: str | None) -> UserError | None:
    """The one-line error for a collective that failed because another rank did not answer, or None when `error`
    is something else (then it keeps its traceback)."""
    import torch

    if (not isinstance(error, RuntimeError) or not torch.distributed.is_available()
            or not torch.distributed.is_initialized() or torch.distributed.get_world_size() < 2
            or not _LOST_PEER.search(str(error)) or RankHeartbeat._running is None):
        return None
    heartbeat = RankHeartbeat._running
    silent, where = heartbeat.silent_ranks()
    timed_out = re.search(r"timed out|timeout", str(error), re.IGNORECASE) is not None
    waited = (f"waited parallel.distributed_timeout_minutes={timeout_minutes:g} for"
              if timed_out else "lost its connection to")
    if silent:
        named = ", ".join(f"rank {r}" + (f" ({w})" if w else "") for r, w in zip(silent, where + [""] * len(silent)))
        who = f"{named} did not answer (stopped, hung or dead)"
    else:
        who = "every rank still runs, so one is stuck elsewhere (a collective that not all ranks entered)"
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return CollectiveTimeout(
        f"rank {heartbeat.rank}: a collective {waited} another rank: {who}; gloo said: {first_line[:200]}. The last "
        f"checkpoint is {last_checkpoint or 'none'} (intact): restart or free that node, then resume with "
        "--resume auto")
