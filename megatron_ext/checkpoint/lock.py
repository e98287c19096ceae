"""One writer per checkpoint directory: `checkpoint.dir/megatron_ext.lock` records the job that saves there (host,
pid, SLURM job id and restart count). A second live job is refused by name; a lock whose job is gone is taken over.

A lock is gone ("stale") when one of these says so, first match wins:
  1. same host: its pid no longer runs (a pid that runs means a live holder, whatever else the lock says);
  2. it names this SLURM job with a lower restart count: the job was requeued (after a node failure, a
     preemption or our own time-limit requeue), and SLURM runs one run of a job at a time, so the holder is
     this job's earlier run;
  3. it names another SLURM job that `squeue` lists as pending or ended, or no longer knows (the
     scheduler's word; skipped where squeue is not on PATH, e.g. inside a container);
  4. its heartbeat stopped: the holder touches the file every HEARTBEAT_SECONDS from a daemon thread while it
     holds the lock; STALE_AFTER_SECONDS without a touch (ten missed beats) means the process is dead or
     frozen that long. A holder that comes back after its lock was taken over is refused at its next save
     (the new holder's heartbeat is fresh), so it never writes beside the new owner. Locks written before
     heartbeats existed (no "heartbeat_s") are never judged by age.
A refusal is also appended to the file named by $MEGATRON_EXT_LOCK_REFUSED, if set: the sbatch script's
requeue path reads it (megatron_ext/launch/sbatch.py).

Standard library only. A save holds the lock while it runs; a job that calls `lock_checkpoint_dir` first
(a training run, at its start) holds it until it exits.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from megatron_ext.errors import UserError

log = logging.getLogger("megatron_ext")

LOCK_FILE = "megatron_ext.lock"
HEARTBEAT_SECONDS = 30.0
STALE_AFTER_SECONDS = 300.0
REFUSALS_FILE_VARIABLE = "MEGATRON_EXT_LOCK_REFUSED"
# squeue states in which none of a job's processes run (squeue(1), JOB STATE CODES); others count as live
GONE_STATES = frozenset({"PENDING", "COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                         "BOOT_FAIL", "DEADLINE", "OUT_OF_MEMORY", "SPECIAL_EXIT", "REVOKED"})
_held: set[Path] = set()
_heartbeat: threading.Thread | None = None


class CheckpointDirLocked(UserError, RuntimeError):
    """Another live job saves into the same checkpoint.dir."""


def _this_process(environ: Mapping[str, str] = os.environ) -> dict:
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "heartbeat_s": HEARTBEAT_SECONDS}
    if environ.get("SLURM_JOB_ID"):
        owner.update(slurm_job_id=environ["SLURM_JOB_ID"], slurm_restart_count=_restart_count(environ))
    return owner


def _restart_count(record: Mapping) -> int:
    """SLURM_RESTART_COUNT (set from a job's first requeue on; absent means 0) or a lock's slurm_restart_count."""
    value = record.get("SLURM_RESTART_COUNT", record.get("slurm_restart_count")) or 0
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _is_this_process(owner: dict | None) -> bool:
    return owner is not None and owner.get("host") == socket.gethostname() and owner.get("pid") == os.getpid()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _read_owner(lock: Path) -> dict | None:
    """The recorded owner; None when the file is gone or unreadable (written by the atomic link, so only
    a hand-made file can be unreadable)."""
    try:
        owner = json.loads(lock.read_text())
        return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None
    except (OSError, ValueError):
        return None


def slurm_job_state(job_id: str) -> str | None:
    """What squeue says of `job_id`: its state (e.g. RUNNING, COMPLETED), "UNKNOWN" when the controller no longer
    knows the job (it ended longer ago than MinJobAge), None when squeue cannot be asked."""
    if shutil.which("squeue") is None:
        return None
    try:
        run = subprocess.run(["squeue", "--noheader", f"--jobs={job_id}", "--states=all", "--format=%T"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if run.returncode != 0:
        return "UNKNOWN" if "invalid job id" in run.stderr.lower() else None
    states = run.stdout.split()
    return states[0] if states else "UNKNOWN"


def stale_reason(owner: dict, heartbeat_age: float, environ: Mapping[str, str] = os.environ,
                 job_state=slurm_job_state) -> str | None:
    """Why the job that wrote `owner` is gone (the rules of the module docstring), or None if it may still run.
    heartbeat_age: seconds since the lock file was last touched."""
    if owner.get("host") == socket.gethostname():
        return None if _pid_alive(owner["pid"]) else f"process {owner['pid']} on this host is gone"
    job = owner.get("slurm_job_id")
    if job is not None and str(job) == environ.get("SLURM_JOB_ID"):
        if _restart_count(owner) < _restart_count(environ):
            return (f"it is SLURM job {job}'s earlier run (restart {_restart_count(owner)}; this is restart "
                    f"{_restart_count(environ)}, and SLURM runs one run of a job at a time)")
    elif job is not None:
        state = job_state(str(job))
        if state in GONE_STATES or state == "UNKNOWN":
            return f"squeue lists its SLURM job {job} as {state.lower()}"
    if "heartbeat_s" in owner and heartbeat_age > STALE_AFTER_SECONDS:
        return (f"its heartbeat stopped {heartbeat_age:.0f} s ago (the holder touches the lock every "
                f"{owner['heartbeat_s']:.0f} s; stale after {STALE_AFTER_SECONDS:.0f} s)")
    return None


def _heartbeat_age(lock: Path) -> float:
    try:
        return max(0.0, time.time() - lock.stat().st_mtime)
    except OSError:
        return 0.0


def _describe(owner: dict | None) -> str:
    if owner is None:
        return "an unreadable lock file"
    job = f", SLURM job {owner['slurm_job_id']}" if owner.get("slurm_job_id") is not None else ""
    return f"process {owner['pid']} on {owner.get('host')}{job}"


def lock_checkpoint_dir(root: str | Path) -> bool:
    """Take root's lock for this process; True if taken now, False if this process held it already. Raises
    CheckpointDirLocked naming the owner if another live job holds it."""
    root = Path(root)
    lock = root / LOCK_FILE
    if lock.resolve() in _held and _is_this_process(_read_owner(lock)):
        return False
    root.mkdir(parents=True, exist_ok=True)
    mine = root / f"{LOCK_FILE}.{os.getpid()}"
    mine.write_text(json.dumps(_this_process()) + "\n")
    try:
        try:
            os.link(mine, lock)  # atomic: fails if the lock exists
        except FileExistsError:
            owner, age = _read_owner(lock), _heartbeat_age(lock)
            reason = stale_reason(owner, age) if owner is not None and not _is_this_process(owner) else None
            if _is_this_process(owner):
                pass
            elif reason is not None:
                log.warning(f"megatron_ext: taking over {lock} from {_describe(owner)}: {reason}")
                os.replace(mine, lock)
                mine = None
            else:
                _refuse(root, lock, owner, age)
    finally:
        if mine is not None:
            mine.unlink(missing_ok=True)
    _held.add(lock.resolve())
    _start_heartbeat()
    atexit.register(release_checkpoint_dir, root)
    return True


def _refuse(root: Path, lock: Path, owner: dict | None, age: float) -> None:
    heartbeat = f", lock touched {age:.0f} s ago" if owner is not None and "heartbeat_s" in owner else ""
    message = (f"checkpoint.dir ({str(root)!r}) is in use by {_describe(owner)} ({lock}{heartbeat}): two jobs "
               "saving into one directory delete each other's checkpoints. Set another checkpoint.dir, or remove "
               f"{lock} if that job is gone (a lock is taken over by itself once its SLURM job has ended or "
               f"after {STALE_AFTER_SECONDS:.0f} s without a heartbeat)")
    refusals = os.environ.get(REFUSALS_FILE_VARIABLE)
    if refusals:  # the batch script requeues on it
        try:
            with open(refusals, "a") as file:
                file.write(" ".join(message.split()) + "\n")
        except OSError as error:
            log.warning(f"megatron_ext: cannot record the refused lock in ${REFUSALS_FILE_VARIABLE} ({error})")
    raise CheckpointDirLocked(message) from None


def release_checkpoint_dir(root: str | Path) -> None:
    """Give root's lock back if this process holds it."""
    lock = Path(root) / LOCK_FILE
    if _is_this_process(_read_owner(lock)):
        lock.unlink(missing_ok=True)
    _held.discard(lock.resolve())


def touch_held_locks() -> None:
    """One heartbeat: refresh the modification time of every lock this process still holds."""
    for lock in list(_held):
        if _is_this_process(_read_owner(lock)):
            try:
                os.utime(lock)
            except OSError:  # gone or unreachable this time; the next beat tries again
                pass


def _start_heartbeat() -> None:
    global _heartbeat
    if _heartbeat is None or not _heartbeat.is_alive():  # also after a fork, which keeps no threads
        _heartbeat = threading.Thread(target=_beat_forever, name="megatron_ext-lock-heartbeat", daemon=True)
        _heartbeat.start()


def _beat_forever() -> None:
    while True:
        time.sleep(HEARTBEAT_SECONDS)
        touch_held_locks()
