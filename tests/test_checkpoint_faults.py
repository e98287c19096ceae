"""Checkpoint faults in a process of their own (tests/checkpoint_fault_worker.py): a trainer killed while a
background save writes leaves `latest` on the previous checkpoint and no process behind; a write the kernel
cuts short (a file-size limit: EFBIG, as a full disk gives ENOSPC) fails with a clear error, keeps the previous
checkpoint, and once there is room the next save succeeds and removes what the failed one left."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from megatron_ext.checkpoint.integrity import verify_checkpoint
from megatron_ext.checkpoint.layout import find_checkpoint

pytestmark = pytest.mark.slow  # end to end: real runs in child processes (make test-fast skips them)

WORKER = Path(__file__).with_name("checkpoint_fault_worker.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def test_a_trainer_killed_during_a_background_write_leaves_latest_on_the_previous_checkpoint(tmp_path):
    worker = subprocess.Popen([sys.executable, str(WORKER), str(tmp_path), "kill-while-writing"], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert worker.stdout.readline().strip() == "writing"
        family = psutil.Process(worker.pid).children(recursive=True)
        os.kill(worker.pid, signal.SIGKILL)
    finally:
        worker.kill()
        worker.wait(timeout=60)
    assert family == []  # the write ran on a thread: nothing of the save can outlive the trainer
    assert (tmp_path / "latest").read_text().strip() == "iter_0000001"
    assert not (tmp_path / "iter_0000002").exists()
    assert [p.name.split(".tmp-")[0] for p in tmp_path.glob("iter_*.tmp-*")] == ["iter_0000002"]
    assert find_checkpoint(tmp_path, "auto") == tmp_path / "iter_0000001"
    assert verify_checkpoint(tmp_path / "iter_0000001") == []


@pytest.mark.parametrize("next_save", ["sync", "async"])
def test_a_write_cut_short_keeps_the_previous_checkpoint_and_the_next_save_succeeds(tmp_path, next_save):
    run = subprocess.run([sys.executable, str(WORKER), str(tmp_path), "file-size-limit", next_save], env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    outcome = json.loads(run.stdout.strip().splitlines()[-1])
    assert outcome["error"].startswith(f"iter_0000002 could not be written in checkpoint.dir ('{tmp_path}'): rank 0:")
    assert "latest names iter_0000001" in outcome["error"] and "resume with --resume auto" in outcome["error"]
    assert [name.split(".tmp-")[0] for name in outcome["left_after_failure"]] == ["iter_0000001", "iter_0000002",
                                                                                 "latest"]
    assert outcome["third"] == "iter_0000003"
    assert outcome["left_at_end"] == ["iter_0000001", "iter_0000003", "latest"]  # the stale directory is gone
    assert verify_checkpoint(tmp_path / "iter_0000003") == []
