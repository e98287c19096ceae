"""The processes of a `train --nproc-per-node` launch, for the tests that kill, stop and signal them
(tests/test_signals.py, tests/test_chaos.py)."""

import psutil


def ranks_of(wrapper_pid: int) -> dict[int, psutil.Process]:
    """RANK -> process, of the ranks torchrun (the wrapper's child) started."""
    ranks = {}
    for process in psutil.Process(wrapper_pid).children(recursive=True):
        try:
            rank = process.environ().get("RANK")
            if rank is not None and "megatron_ext.cli" in " ".join(process.cmdline()):
                ranks[int(rank)] = process
        except psutil.Error:
            pass
    return ranks


def alive(processes) -> list[int]:
    """The pids of `processes` still running (zombies count as gone)."""
    living = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                living.append(process.pid)
        except psutil.NoSuchProcess:
            pass
    return living
