"""One writer per checkpoint directory: `checkpoint.dir/megatron_ext.lock` records the host and pid of the job
that saves there. A second job is refused by name; a lock whose pid is gone on this host is stale and taken over.

Standard library only. A save holds the lock while it runs; a job that calls `lock_checkpoint_dir` first
(a training run, at its start) holds it until it exits.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import socket
from pathlib import Path

from megatron_ext.errors import UserError

log = logging.getLogger("megatron_ext")

LOCK_FILE = "megatron_ext.lock"
_held: set[Path] = set()


class CheckpointDirLocked(UserError, RuntimeError):
    """Another live job saves into the same checkpoint.dir."""


def _this_process() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid()}


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


def _is_stale(owner: dict | None) -> bool:
    return owner is not None and owner.get("host") == socket.gethostname() and not _pid_alive(owner["pid"])


def lock_checkpoint_dir(root: str | Path) -> bool:
    """Take root's lock for this process; True if taken now, False if this process held it already. Raises
    CheckpointDirLocked naming the owner if another live job holds it."""
    root = Path(root)
    lock = root / LOCK_FILE
    if lock.resolve() in _held and _read_owner(lock) == _this_process():
        return False
    root.mkdir(parents=True, exist_ok=True)
    mine = root / f"{LOCK_FILE}.{os.getpid()}"
    mine.write_text(json.dumps(_this_process()) + "\n")
    try:
        try:
            os.link(mine, lock)  # atomic: fails if the lock exists
        except FileExistsError:
            owner = _read_owner(lock)
            if owner == _this_process():
                pass
            elif _is_stale(owner):
                log.warning(f"megatron_ext: taking over {lock} from process {owner['pid']}, which is gone")
                os.replace(mine, lock)
                mine = None
            else:
                who = f"process {owner['pid']} on {owner.get('host')}" if owner else "an unreadable lock file"
                raise CheckpointDirLocked(
                    f"checkpoint.dir ({str(root)!r}) is in use by {who} ({lock}): two jobs saving into one "
                    f"directory delete each other's checkpoints. Set another checkpoint.dir, or remove {lock} "
                    f"if that job is gone") from None
    finally:
        if mine is not None:
            mine.unlink(missing_ok=True)
    _held.add(lock.resolve())
    atexit.register(release_checkpoint_dir, root)
    return True


def release_checkpoint_dir(root: str | Path) -> None:
    """Give root's lock back if this process holds it."""
    lock = Path(root) / LOCK_FILE
    if _read_owner(lock) == _this_process():
        lock.unlink(missing_ok=True)
    _held.discard(lock.resolve())
