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

Taking the lock is atomic, fresh or stale. A fresh lock is a hard link of this process's record to the lock's name
(fails if the name exists). A stale one is taken over by exactly one process, however many judge it stale at once:
each contender creates a guard file named after that lock's identity (a hash of its bytes, inode and modification
time) with O_CREAT|O_EXCL, which one wins; the winner checks that the lock is still the one it judged and only then
moves its record onto it, and the others wait for the lock to change and judge the new one (a live holder: refused).
A guard whose holder died inside that millisecond step is left aside after GUARD_ABANDONED_SECONDS. Why not
flock/fcntl: advisory locks are not reliable where checkpoints live (Lustre clients mounted without `flock` answer
ENOSYS or lock per node with `localflock`; NFSv3 needs lockd; a lock held by a dead node lingers until a lease
expires), and ownership has to outlive the process anyway for the SLURM and heartbeat rules above. O_EXCL create,
link and rename are atomic on local file systems, NFSv3+ and Lustre.

Standard library only. A save holds the lock while it runs; a job that calls `lock_checkpoint_dir` first
(a training run, at its start) holds it until it exits.
"""
from __future__ import annotations

import atexit
import hashlib
import itertools
import json
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

from megatron_ext.errors import UserError

log = logging.getLogger("megatron_ext")

LOCK_FILE = "megatron_ext.lock"
HEARTBEAT_SECONDS = 30.0
STALE_AFTER_SECONDS = 300.0
GUARD_ABANDONED_SECONDS = 10.0  # a takeover guard this old belongs to a process that died while taking over
TAKEOVER_WAIT_SECONDS = GUARD_ABANDONED_SECONDS + 5.0  # how long a contender waits for another's takeover
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
    # unique across hosts too: pids of two nodes sharing the directory may be equal
    mine = root / f"{LOCK_FILE}.{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    mine.write_text(json.dumps(_this_process()) + "\n")
    try:
        _acquire(root, lock, mine)
    finally:
        mine.unlink(missing_ok=True)  # gone already when it was moved onto the lock
    _held.add(lock.resolve())
    _start_heartbeat()
    atexit.register(release_checkpoint_dir, root)
    return True


def _acquire(root: Path, lock: Path, mine: Path) -> None:
    """Make `lock` this process's (`mine` is its record, beside it), or refuse naming the live holder."""
    deadline = time.monotonic() + TAKEOVER_WAIT_SECONDS
    while True:
        try:
            os.link(mine, lock)  # atomic: fails if the lock exists
            return
        except FileExistsError:
            pass
        seen = _read_lock(lock)
        if seen is None:
            continue  # released between the link and the read: link again
        owner, identity, age = seen
        if _is_this_process(owner):  # taken earlier by this process, and forgotten here (e.g. released in a test)
            return
        reason = stale_reason(owner, age) if owner is not None else None
        if reason is None:
            _refuse(root, lock, owner, age)
        outcome = _take_over(lock, mine, identity)
        if outcome == "taken":
            log.warning(f"megatron_ext: taking over {lock} from {_describe(owner)}: {reason}")
            return
        if outcome == "busy":  # another process is taking this very lock over: wait for it, then judge its lock
            if time.monotonic() > deadline:
                _refuse(root, lock, owner, age, busy=True)
            _wait_for_change(lock, identity, deadline)
        # "changed": the lock is no longer the one judged (taken over or released meanwhile): judge it again


def _read_lock(lock: Path) -> tuple[dict | None, str, float] | None:
    """(recorded owner or None if unreadable, identity, heartbeat age) of the lock as it is now; None when absent.
    The identity (bytes, inode, modification time, read through one descriptor) changes with any takeover,
    re-creation or heartbeat."""
    try:
        with open(lock, "rb") as handle:
            data = handle.read(1 << 16)
            stat = os.fstat(handle.fileno())
    except FileNotFoundError:
        return None
    except OSError:
        return None, "unreadable", _heartbeat_age(lock)
    identity = hashlib.sha256(data + f"|{stat.st_ino}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    try:
        owner = json.loads(data)
        owner = owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None
    except (ValueError, RecursionError):  # hand-made or damaged: refused as unreadable
        owner = None
    return owner, identity, max(0.0, time.time() - stat.st_mtime)


def _take_over(lock: Path, mine: Path, identity: str) -> str:
    """Move `mine` onto the stale lock whose identity is `identity`, if this process wins that lock's guard:
    "taken"; "busy" when another process holds the guard; "changed" when the lock is no longer that one."""
    guard = _claim_guard(lock, identity)
    if guard is None:
        return "busy"
    try:
        seen = _read_lock(lock)
        if seen is None or seen[1] != identity:
            return "changed"
        os.replace(mine, lock)
    finally:
        guard.unlink(missing_ok=True)
    for abandoned in lock.parent.glob(f"{lock.name}.takeover-{identity}-*"):  # useless now the lock changed
        abandoned.unlink(missing_ok=True)
    return "taken"


def _claim_guard(lock: Path, identity: str) -> Path | None:
    """Create this lock's takeover guard with O_EXCL (the next one past any abandoned); None if another holds it."""
    for attempt in itertools.count(1):
        guard = lock.parent / f"{lock.name}.takeover-{identity}-{attempt}"
        try:
            os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return guard
        except FileExistsError:
            try:
                abandoned = time.time() - guard.stat().st_mtime > GUARD_ABANDONED_SECONDS
            except FileNotFoundError:  # its holder finished just now: the lock changed, as the caller will see
                return None
            if not abandoned:
                return None


def _wait_for_change(lock: Path, identity: str, deadline: float) -> None:
    """Poll until the lock is no longer `identity` (another process's takeover finished) or the deadline."""
    delay = 0.002
    while time.monotonic() < deadline:
        seen = _read_lock(lock)
        if seen is None or seen[1] != identity:
            return
        time.sleep(delay)
        delay = min(2 * delay, 0.1)


def _refuse(root: Path, lock: Path, owner: dict | None, age: float, busy: bool = False) -> None:
    heartbeat = f", lock touched {age:.0f} s ago" if owner is not None and "heartbeat_s" in owner else ""
    if busy:
        message = (f"checkpoint.dir ({str(root)!r}): another process has been taking over the stale lock {lock} of "
                   f"{_describe(owner)} for {TAKEOVER_WAIT_SECONDS:.0f} s (its {lock.name}.takeover-* file): two "
                   "jobs saving into one directory delete each other's checkpoints. Set another checkpoint.dir, "
                   "or start this job again once that one has the lock")
    else:
        message = (f"checkpoint.dir ({str(root)!r}) is in use by {_describe(owner)} ({lock}{heartbeat}): two jobs "
                   "saving into one directory delete each other's checkpoints. Set another checkpoint.dir, or "
                   f"remove {lock} if that job is gone (a lock is taken over by itself once its SLURM job has ended "
                   f"or after {STALE_AFTER_SECONDS:.0f} s without a heartbeat)")
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
