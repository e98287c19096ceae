"""checkpoint.dir's lock across hosts (megatron_ext/checkpoint/lock.py): a lock left by a job killed on another node
is taken over when SLURM says that job is gone (this job's earlier run after a requeue, or squeue lists it as
ended) or its heartbeat stopped; a live holder is still refused, and the refusal is recorded for the sbatch script."""

import json
import logging
import os
import socket
import time

import pytest

from megatron_ext.checkpoint import lock as lock_module
from megatron_ext.checkpoint.lock import (LOCK_FILE, STALE_AFTER_SECONDS, CheckpointDirLocked, lock_checkpoint_dir,
                                          release_checkpoint_dir, touch_held_locks)

OTHER_NODE = {"host": "gpu-node-07", "pid": 4242}


@pytest.fixture
def slurm_job(monkeypatch, tmp_path):
    """This process as a task of SLURM job 777, with a `squeue` stand-in on PATH that answers
    $SQUEUE_STATE (or fails with $SQUEUE_ERROR) and logs the job it was asked about."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    squeue = bin_dir / "squeue"
    squeue.write_text('#!/bin/bash\necho "$*" >> "$SQUEUE_LOG"\n'
                      'if [[ -n $SQUEUE_ERROR ]]; then echo "$SQUEUE_ERROR" >&2; exit 1; fi\necho "$SQUEUE_STATE"\n')
    squeue.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SQUEUE_LOG", str(tmp_path / "squeue.log"))
    monkeypatch.setenv("SQUEUE_STATE", "RUNNING")
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    monkeypatch.delenv(lock_module.REFUSALS_FILE_VARIABLE, raising=False)
    return monkeypatch


def write_lock(root, owner: dict, age_seconds: float = 0.0):
    root.mkdir(parents=True, exist_ok=True)
    lock = root / LOCK_FILE
    lock.write_text(json.dumps(owner) + "\n")
    stamp = time.time() - age_seconds
    os.utime(lock, (stamp, stamp))
    return lock


def owner_of(root) -> dict:
    return json.loads((root / LOCK_FILE).read_text())


def take(root):
    """lock_checkpoint_dir, and the lock given back when the test is done (the module keeps held locks)."""
    try:
        return lock_checkpoint_dir(root)
    finally:
        if owner_of(root)["pid"] == os.getpid():
            release_checkpoint_dir(root)


def test_the_requeued_job_takes_over_its_earlier_runs_lock_from_another_node(slurm_job, tmp_path, caplog):
    """The issue's case: the run on gpu-node-07 died with the node; SLURM requeued job 777 onto other nodes."""
    root = tmp_path / "ckpt"
    write_lock(root, dict(OTHER_NODE, heartbeat_s=30.0, slurm_job_id="777", slurm_restart_count=0))
    slurm_job.setenv("SLURM_RESTART_COUNT", "1")
    with caplog.at_level(logging.WARNING, logger="megatron_ext"):
        assert lock_checkpoint_dir(root) is True
    try:
        assert owner_of(root)["pid"] == os.getpid()
        assert owner_of(root)["slurm_job_id"] == "777" and owner_of(root)["slurm_restart_count"] == 1
        assert "taking over" in caplog.text and "SLURM job 777's earlier run (restart 0" in caplog.text
    finally:
        release_checkpoint_dir(root)
    assert not (root / LOCK_FILE).exists()
    assert not (tmp_path / "squeue.log").exists()  # the job's own record decided; the scheduler was not asked


def test_a_second_step_of_the_same_run_is_refused(slurm_job, tmp_path):
    """Same job id, same restart count, another node: both run now (two steps of one allocation)."""
    root = tmp_path / "ckpt"
    write_lock(root, dict(OTHER_NODE, heartbeat_s=30.0, slurm_job_id="777", slurm_restart_count=2))
    slurm_job.setenv("SLURM_RESTART_COUNT", "2")
    with pytest.raises(CheckpointDirLocked, match=r"in use by process 4242 on gpu-node-07, SLURM job 777 "):
        take(root)
    assert owner_of(root)["pid"] == 4242


@pytest.mark.parametrize("answer, taken", [
    (dict(SQUEUE_STATE="COMPLETED"), True),
    (dict(SQUEUE_STATE="NODE_FAIL"), True),
    (dict(SQUEUE_STATE="PENDING"), True),  # requeued: none of its processes run
    (dict(SQUEUE_ERROR="slurm_load_jobs error: Invalid job id specified"), True),  # ended before MinJobAge
    (dict(SQUEUE_STATE="RUNNING"), False),
    (dict(SQUEUE_STATE="SUSPENDED"), False),
    (dict(SQUEUE_ERROR="slurm_load_jobs error: Unable to contact slurm controller"), False),  # cannot tell
])
def test_another_jobs_lock_is_taken_over_when_squeue_says_that_job_is_gone(slurm_job, tmp_path, answer, taken):
    root = tmp_path / "ckpt"
    write_lock(root, dict(OTHER_NODE, heartbeat_s=30.0, slurm_job_id="512", slurm_restart_count=0))
    for name, value in answer.items():
        slurm_job.setenv(name, value)
    if taken:
        assert take(root) is True
    else:
        with pytest.raises(CheckpointDirLocked, match="in use by process 4242 on gpu-node-07, SLURM job 512"):
            take(root)
        assert owner_of(root)["pid"] == 4242
    assert (tmp_path / "squeue.log").read_text().split() == ["--noheader", "--jobs=512", "--states=all",
                                                              "--format=%T"]


@pytest.mark.parametrize("age, taken", [(STALE_AFTER_SECONDS + 5, True), (STALE_AFTER_SECONDS - 60, False)])
def test_a_lock_whose_heartbeat_stopped_is_taken_over(slurm_job, tmp_path, age, taken):
    """Where the scheduler cannot say (no job id in the lock, or no squeue), the heartbeat's age decides."""
    root = tmp_path / "ckpt"
    write_lock(root, dict(OTHER_NODE, heartbeat_s=30.0), age_seconds=age)
    if taken:
        assert take(root) is True
    else:
        with pytest.raises(CheckpointDirLocked, match=r"lock touched 2\d\d s ago"):
            take(root)


def test_a_lock_without_a_heartbeat_is_never_judged_by_its_age(slurm_job, tmp_path):
    """A lock of the issue's form (an earlier version, never refreshed): its age says when it was taken, not whether
    its job runs; only the same-host pid rule could free it, so it is refused with the way out named."""
    root = tmp_path / "ckpt"
    write_lock(root, OTHER_NODE, age_seconds=10 * STALE_AFTER_SECONDS)
    with pytest.raises(CheckpointDirLocked, match=r"in use by process 4242 on gpu-node-07 \(.*remove .* if that job"):
        take(root)


def test_the_holder_keeps_its_lock_fresh_and_one_that_lost_it_is_refused_at_its_next_save(slurm_job, tmp_path):
    root = tmp_path / "ckpt"
    assert lock_checkpoint_dir(root) is True
    try:
        lock = root / LOCK_FILE
        assert owner_of(root) == {"host": socket.gethostname(), "pid": os.getpid(), "heartbeat_s": 30.0,
                                  "slurm_job_id": "777", "slurm_restart_count": 0}
        assert lock_module._heartbeat is not None and lock_module._heartbeat.is_alive()
        old = time.time() - 2 * STALE_AFTER_SECONDS
        os.utime(lock, (old, old))
        touch_held_locks()  # one beat of the heartbeat thread
        assert time.time() - lock.stat().st_mtime < 5

        # frozen past the stale age, the lock went to another job; back, this process must not save beside it
        write_lock(root, dict(OTHER_NODE, heartbeat_s=30.0))
        with pytest.raises(CheckpointDirLocked, match="in use by process 4242 on gpu-node-07"):
            lock_checkpoint_dir(root)  # what every save does first
        touch_held_locks()
        assert owner_of(root)["pid"] == 4242  # a lock it lost is not touched either
    finally:
        release_checkpoint_dir(root)
    assert owner_of(root)["pid"] == 4242  # nor removed


def test_a_refusal_is_appended_to_the_file_the_batch_script_reads(slurm_job, tmp_path):
    root, refusals = tmp_path / "ckpt", tmp_path / "refused"
    write_lock(root, dict(OTHER_NODE, heartbeat_s=30.0))
    slurm_job.setenv(lock_module.REFUSALS_FILE_VARIABLE, str(refusals))
    for _ in range(2):
        with pytest.raises(CheckpointDirLocked):
            take(root)
    lines = refusals.read_text().splitlines()
    assert len(lines) == 2 and lines[0].startswith("checkpoint.dir (") and "in use by process 4242" in lines[0]


# --- many processes taking over one stale lock at once --------------------------------------------------------

CONTENDERS, TRIALS = 8, 30


def _contend(root, barrier, results):
    """A forked contender: in each trial, try to take the stale lock the parent wrote, report, give it back."""
    import random

    judge = lock_module.stale_reason

    def slow_judge(*args, **kwargs):  # asking squeue takes tens of ms: the window in which several judge one lock
        time.sleep(random.uniform(0, 0.01))
        return judge(*args, **kwargs)

    lock_module.stale_reason = slow_judge
    for trial in range(TRIALS):
        barrier.wait(60)  # the stale lock is in place
        try:
            lock_checkpoint_dir(root)
            won = True
        except CheckpointDirLocked:
            won = False
        results.put((trial, os.getpid(), won))
        barrier.wait(60)  # every contender has tried, and the parent has read the lock
        if won:
            release_checkpoint_dir(root)
        barrier.wait(60)  # the lock is given back


def test_of_many_processes_taking_over_one_stale_lock_at_once_exactly_one_gets_it(tmp_path, monkeypatch):
    """Issue 30, case 14: two processes taking over the same stale lock both got it in 5 of 30 trials (a stale check,
    then os.replace). 8 processes x 30 trials, each trial a lock whose heartbeat stopped an hour ago: one winner."""
    import multiprocessing

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    context = multiprocessing.get_context("fork")
    root = tmp_path / "ckpt"
    barrier, results = context.Barrier(CONTENDERS + 1), context.Queue()
    contenders = [context.Process(target=_contend, args=(root, barrier, results)) for _ in range(CONTENDERS)]
    for process in contenders:
        process.start()
    winners, owners = [], []
    try:
        for trial in range(TRIALS):
            write_lock(root, dict(OTHER_NODE, heartbeat_s=30.0), age_seconds=3600)
            barrier.wait(60)
            reports = [results.get(timeout=60) for _ in range(CONTENDERS)]
            winners.append(sorted(pid for _, pid, won in reports if won))
            owners.append(owner_of(root)["pid"])
            barrier.wait(60)
            barrier.wait(60)
            assert not (root / LOCK_FILE).exists()
    finally:
        for process in contenders:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
    assert [len(w) for w in winners] == [1] * TRIALS, winners
    assert owners == [w[0] for w in winners]  # the winner's record is the lock's
    assert sorted(p.name for p in root.iterdir()) == []  # no guard or record file left behind


def test_a_takeover_guard_left_by_a_crashed_contender_is_passed_over_once_abandoned(slurm_job, tmp_path, monkeypatch):
    """A process that died between winning a stale lock's guard and moving its record in leaves the guard: while it
    is fresh others wait and then refuse, naming it; once it is older than GUARD_ABANDONED_SECONDS the next guard
    is taken and the lock with it."""
    root = tmp_path / "ckpt"
    lock = write_lock(root, dict(OTHER_NODE, heartbeat_s=30.0), age_seconds=3600)
    _, identity, _ = lock_module._read_lock(lock)
    guard = root / f"{LOCK_FILE}.takeover-{identity}-1"
    guard.touch()
    monkeypatch.setattr(lock_module, "TAKEOVER_WAIT_SECONDS", 0.3)
    with pytest.raises(CheckpointDirLocked, match=r"another process has been taking over the stale lock .*takeover"):
        take(root)
    assert owner_of(root)["pid"] == 4242

    abandoned = time.time() - lock_module.GUARD_ABANDONED_SECONDS - 5
    os.utime(guard, (abandoned, abandoned))
    assert take(root) is True
    assert sorted(p.name for p in root.iterdir()) == []  # taken, given back; guards and records gone
