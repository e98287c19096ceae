"""Checkpoint faults that need a process of their own (tests/test_checkpoint_faults.py starts this file).

    python checkpoint_fault_worker.py ROOT kill-while-writing   save iteration 1, start a background save of
        iteration 2 whose write hangs, print "writing", wait to be killed (the test sends SIGKILL)
    python checkpoint_fault_worker.py ROOT file-size-limit [async]   save iteration 1; under a file-size limit
        the kernel enforces (EFBIG, as a full disk gives ENOSPC) fail iteration 2; lift it, save iteration 3
        (in the background with `async`); print one JSON line of what happened
"""
import json
import os
import resource
import signal
import sys
import threading
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from megatron_ext.checkpoint import writer  # noqa: E402
from megatron_ext.checkpoint.store import save_checkpoint  # noqa: E402
from megatron_ext.checkpoint.writer import BackgroundSaves  # noqa: E402
from megatron_ext.compat import prepare_megatron  # noqa: E402
from megatron_ext.distributed import single_process_group  # noqa: E402


def save(root, iteration, training, **kwargs):
    from test_checkpoint import STATE
    model, optimizer, scheduler = training
    return save_checkpoint(root, iteration, model=model, optimizer=optimizer, scheduler=scheduler, state=STATE,
                           **kwargs)


def kill_while_writing(root: Path, training) -> None:
    from test_checkpoint import train_step
    save(root, 1, training)
    train_step(*training, 1)
    started = threading.Event()

    def hang(*args):
        started.set()
        threading.Event().wait()  # never returns: the process is killed while "writing"
    writer._write_buckets = hang
    save(root, 2, training, background=BackgroundSaves())
    assert started.wait(timeout=60)
    print("writing", flush=True)
    threading.Event().wait(timeout=600)


def file_size_limit(root: Path, training) -> None:
    from test_checkpoint import train_step
    outcome = {"first": save(root, 1, training).name}
    train_step(*training, 1)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        save(root, 2, training)
    except OSError as error:
        outcome["error"] = str(error)
        outcome["left_after_failure"] = sorted(p.name for p in root.iterdir())
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    train_step(*training, 2)
    background = BackgroundSaves() if sys.argv[3:] == ["async"] else None
    outcome["third"] = save(root, 3, training, background=background).name
    if background is not None:
        background.wait()
    outcome["left_at_end"] = sorted(p.name for p in root.iterdir())
    print(json.dumps(outcome), flush=True)


def main() -> None:
    from test_checkpoint import build_training, train_step
    root, mode = Path(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    prepare_megatron()
    with single_process_group():
        training = build_training(seed=0, distributed=False)
        train_step(*training, 0)
        {"kill-while-writing": kill_while_writing, "file-size-limit": file_size_limit}[mode](root, training)
    os._exit(0)


if __name__ == "__main__":
    main()
