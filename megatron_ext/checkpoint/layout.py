"""Where checkpoints live on disk and which ones exist: names, completeness, `latest`, and the one resolver
for every command that takes a checkpoint (train's checkpoint.resume / checkpoint.pretrained, eval's
--model, convert's --ckpt, tools/inspect_checkpoint.py).

Standard library only. On-disk layout: see megatron_ext/checkpoint/store.py.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from megatron_ext.checkpoint.integrity import require_verified, verify_checkpoint
from megatron_ext.errors import UserError

log = logging.getLogger("megatron_ext")


class CheckpointError(UserError, ValueError):
    """A checkpoint argument that names no usable checkpoint, or a checkpoint that contradicts the run."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """A checkpoint argument naming a path that does not exist."""


class CheckpointUnverifiable(CheckpointError):
    """checkpoint.resume 'auto' finds checkpoints, but none matches its manifest."""


FORMAT_VERSION = 1
LATEST_FILE = "latest"
COMPLETE_MARKER = "complete"
JSON_FILE = "megatron_ext.json"
RNG_DIR = "rng"
COMMON_KEY = "megatron_ext"  # our entry in megatron's common.pt
TMP_INFIX = ".tmp-"
DISTRIB_OPTIM_SHARDING_TYPES = ("fully_reshardable", "dp_reshardable")
_CHECKPOINT_NAME = re.compile(r"^iter_(\d{7,})$")
LATEST_MAX_BYTES = 4096  # `latest` holds one directory name


def checkpoint_name(iteration: int) -> str:
    """iter_0000010 for iteration 10 (megatron's naming)."""
    return f"iter_{iteration:07d}"


# --- which checkpoints exist ---------------------------------------------------------------

def is_complete_checkpoint(path: str | Path) -> bool:
    """A final-named iter_ directory holding our `complete` marker (written after the tensors and the
    manifest). megatron's metadata.json alone does not count: a stray or foreign directory has it too."""
    path = Path(path)
    return _CHECKPOINT_NAME.match(path.name) is not None and path.is_dir() and (path / COMPLETE_MARKER).is_file()


def _iteration_of(path: Path) -> int:
    return int(_CHECKPOINT_NAME.match(path.name).group(1))


def list_checkpoints(root: str | Path) -> list[Path]:
    """The complete checkpoints under root, oldest (lowest iteration) first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if is_complete_checkpoint(p)), key=_iteration_of)


def latest_target(root: Path) -> Path | None:
    """The checkpoint `root/latest` names (complete or not), if it names an iter_ directory inside root.
    A `latest` that is binary, not a regular file (a directory, a FIFO, a device), longer than a name can be, or
    names anything else is ignored with a warning: it is a hint (see _newest_verified), of which no more than
    LATEST_MAX_BYTES are read."""
    latest = Path(root) / LATEST_FILE
    try:
        if not latest.is_file():  # follows a symlink: /dev/zero or a FIFO behind one is no regular file either
            if latest.exists() or latest.is_symlink():
                log.warning(f"megatron_ext: ignoring {latest}: not a regular file")
            return None
        with open(latest, "rb") as handle:
            raw = handle.read(LATEST_MAX_BYTES + 1)
        if len(raw) > LATEST_MAX_BYTES:
            log.warning(f"megatron_ext: ignoring {latest}: longer than {LATEST_MAX_BYTES} bytes, no checkpoint name")
            return None
        name = raw.decode("utf-8").strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, UnicodeDecodeError) as error:
        log.warning(f"megatron_ext: ignoring {latest}: not a readable text file ({type(error).__name__})")
        return None
    if not name:
        return None
    if _CHECKPOINT_NAME.match(name) is None:
        log.warning(f"megatron_ext: ignoring {latest}: it names {name[:80]!r}, not an iter_XXXXXXX directory "
                    f"of {root}")
        return None
    return Path(root) / name


def find_checkpoint(root: str | Path, resume: str, *, setting: str = "checkpoint.resume",
                    verify: bool = True) -> Path | None:
    """The checkpoint to resume from, as `checkpoint.resume` asks.

    "auto": the newest complete checkpoint that verifies against its manifest, whatever `root/latest` names
    (a hint that can lag behind: a disagreement is named in a warning); skipped ones are named in a warning;
    None when root holds no complete checkpoint, and a CheckpointUnverifiable error when it holds only ones that
    fail (no silent fresh start). "none": None.
    Anything else is a checkpoint directory (absolute, relative to the working directory, or a name inside
    root); it must exist, be complete and verify. Errors name `setting`.
    """
    root = Path(root)
    if resume is None or str(resume).strip().lower() == "none":
        return None
    if str(resume).strip().lower() == "auto":
        return _newest_verified(root, setting, verify)
    path = Path(resume).expanduser()
    if not path.is_absolute() and not path.exists() and (root / path).exists():
        path = root / path
    path = require_complete(path, setting)
    if verify:
        require_verified(path, setting)
    return path


def _newest_verified(root: Path, setting: str, verify: bool) -> Path | None:
    """The newest complete checkpoint that verifies, scanning every iter_ directory newest first. `latest` is a
    hint, not the answer: it can lag behind (its write failed on a full disk after the checkpoint was in place),
    name a checkpoint that is gone or damaged, or be damaged itself; a disagreement is named in a warning."""
    complete = list_checkpoints(root)
    latest = latest_target(root)
    if latest is not None and not is_complete_checkpoint(latest):
        log.warning(f"megatron_ext: {root / LATEST_FILE} names {latest.name}, which is not a complete "
                    f"checkpoint; using the newest complete one that verifies instead")
    skipped = []
    for candidate in reversed(complete):
        problems = verify_checkpoint(candidate) if verify else []
        if not problems:
            if skipped:
                log.warning(f"megatron_ext: using {candidate}; skipped, as not matching their manifest: "
                            + "; ".join(f"{path.name} ({reason})" for path, reason in skipped))
            if latest in complete and _iteration_of(latest) < _iteration_of(candidate):
                log.warning(f"megatron_ext: {root / LATEST_FILE} names {latest.name}, and {candidate.name} is newer "
                            f"and {'verifies' if verify else 'complete'} (the save's last step, moving `latest`, "
                            f"did not happen): resuming from {candidate.name}. To resume from {latest.name}, set "
                            f"{setting} to {str(latest)!r}")
            return candidate
        skipped.append((candidate, problems[0]))
    if skipped:
        raise CheckpointUnverifiable(
            f"{setting} is 'auto' and no checkpoint in {str(root)!r} verifies: "
            + "; ".join(f"{path.name}: {reason}" for path, reason in skipped)
            + f". Remove or repair them, set {setting} to 'none' (--resume none) to start from scratch, or "
              f"load one anyway with checkpoint.verify: false (--no-verify)")
    return None


def resolve_checkpoint(argument: str | Path, *, setting: str) -> Path:
    """The one checkpoint a command argument names; errors name `setting` (`--model`, `--ckpt`,
    `checkpoint.pretrained`, ...).

    Accepted: an iter_XXXXXXX directory; a checkpoint root (its newest complete checkpoint that verifies, see
    find_checkpoint); a run directory holding such
    a root as `checkpoints/`; a `latest` file.
    """
    path = Path(argument).expanduser()
    if path.name == LATEST_FILE and path.is_file():
        path = path.parent
    if path.is_dir() and not is_complete_checkpoint(path):
        for root in (path, path / "checkpoints"):
            found = find_checkpoint(root, "auto", setting=setting)
            if found is not None:
                return found
    return require_complete(path, setting)


def require_complete(path: Path, setting: str = "checkpoint.resume") -> Path:
    """`path` if it is a complete checkpoint; else an error saying what to set `setting` to."""
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFound(
            f"{setting} ({str(path)!r}) does not exist: set {setting} to an existing iter_XXXXXXX "
            f"directory or a checkpoint root{_RESUME_CHOICES.get(setting, '')}")
    if is_complete_checkpoint(path):
        return path
    inside = list_checkpoints(path)
    if inside:
        raise CheckpointError(
            f"{setting} ({str(path)!r}) is a directory of checkpoints, not one "
            f"checkpoint: set {setting} to one of its iter_ directories (newest complete: "
            f"{inside[-1]}) or to 'auto' with checkpoint.dir: {str(path)!r}")
    siblings = list_checkpoints(path.parent)
    hint = f" (newest complete next to it: {siblings[-1]})" if siblings else ""
    if path.is_dir() and _CHECKPOINT_NAME.match(path.name):
        raise CheckpointError(
            f"{setting} ({str(path)!r}) is not a complete checkpoint: it has no "
            f"'{COMPLETE_MARKER}' marker (an interrupted save, or not written by megatron_ext?). "
            f"Set {setting} to a complete iter_ directory{hint}")
    raise CheckpointError(
        f"{setting} ({str(path)!r}) holds no complete megatron_ext checkpoint: give an iter_XXXXXXX "
        f"directory, a checkpoint root (with `latest`) or a run directory with checkpoints/{hint}")


_RESUME_CHOICES = {"checkpoint.resume": ", to 'auto' (the newest complete checkpoint in checkpoint.dir) or to "
                                        "'none' (start from scratch)"}


class CheckpointDirIsFile(CheckpointError, NotADirectoryError):
    """checkpoint.dir (or a parent of it) is a file."""


class CheckpointDirNotWritable(CheckpointError, PermissionError):
    """checkpoint.dir cannot be written."""


def validate_checkpoint_dir(root: str | Path) -> None:
    """Raise before any work when checkpoint.dir cannot hold checkpoints. Creates nothing."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise CheckpointDirIsFile(
            f"checkpoint.dir ({str(root)!r}) is a file: set checkpoint.dir to a directory")
    existing = root
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise CheckpointDirIsFile(
            f"checkpoint.dir ({str(root)!r}) cannot be created: {str(existing)!r} is a file. "
            f"Set checkpoint.dir to a directory path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CheckpointDirNotWritable(
            f"checkpoint.dir ({str(root)!r}) is not writable ({str(existing)!r} denies write "
            f"access): set checkpoint.dir to a writable directory")
