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

from megatron_ext.errors import UserError

log = logging.getLogger("megatron_ext")


class CheckpointError(UserError, ValueError):
    """A checkpoint argument that names no usable checkpoint, or a checkpoint that contradicts the run."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """A checkpoint argument naming a path that does not exist."""


FORMAT_VERSION = 1
LATEST_FILE = "latest"
COMPLETE_MARKER = "complete"
MEGATRON_METADATA = "metadata.json"  # written by dist_checkpointing.save once all shards are in
JSON_FILE = "megatron_ext.json"
RNG_DIR = "rng"
COMMON_KEY = "megatron_ext"  # our entry in megatron's common.pt
TMP_INFIX = ".tmp-"
DISTRIB_OPTIM_SHARDING_TYPES = ("fully_reshardable", "dp_reshardable")
_CHECKPOINT_NAME = re.compile(r"^iter_(\d{7,})$")


def checkpoint_name(iteration: int) -> str:
    """iter_0000010 for iteration 10 (megatron's naming)."""
    return f"iter_{iteration:07d}"


# --- which checkpoints exist ---------------------------------------------------------------

def is_complete_checkpoint(path: str | Path) -> bool:
    """A final-named iter_ directory holding our `complete` marker or megatron's metadata.json."""
    path = Path(path)
    return (_CHECKPOINT_NAME.match(path.name) is not None and path.is_dir()
            and ((path / COMPLETE_MARKER).is_file() or (path / MEGATRON_METADATA).is_file()))


def _iteration_of(path: Path) -> int:
    return int(_CHECKPOINT_NAME.match(path.name).group(1))


def list_checkpoints(root: str | Path) -> list[Path]:
    """The complete checkpoints under root, oldest (lowest iteration) first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if is_complete_checkpoint(p)), key=_iteration_of)


def latest_target(root: Path) -> Path | None:
    """The checkpoint `root/latest` names, if the file exists (complete or not)."""
    try:
        name = (root / LATEST_FILE).read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return root / name if name else None


def find_checkpoint(root: str | Path, resume: str, *, setting: str = "checkpoint.resume") -> Path | None:
    """The checkpoint to resume from, as `checkpoint.resume` asks.

    "auto": the one `root/latest` names if it is complete, else the newest complete one, else
    None. "none": None. Anything else is a checkpoint directory (absolute, relative to the
    working directory, or a name inside root); it must exist and be complete. Errors name `setting`.
    """
    root = Path(root)
    if resume is None or str(resume).strip().lower() == "none":
        return None
    if str(resume).strip().lower() == "auto":
        latest = latest_target(root)
        if latest is not None and is_complete_checkpoint(latest):
            return latest
        complete = list_checkpoints(root)
        if latest is not None:
            log.warning(f"megatron_ext: {root / LATEST_FILE} names {latest.name}, which is not a "
                        f"complete checkpoint; using the newest complete one instead "
                        f"({complete[-1].name if complete else 'none found'})")
        return complete[-1] if complete else None
    path = Path(resume).expanduser()
    if not path.is_absolute() and not path.exists() and (root / path).exists():
        path = root / path
    return require_complete(path, setting)


def resolve_checkpoint(argument: str | Path, *, setting: str) -> Path:
    """The one checkpoint a command argument names; errors name `setting` (`--model`, `--ckpt`,
    `checkpoint.pretrained`, ...).

    Accepted: an iter_XXXXXXX directory; a checkpoint root (the checkpoint its `latest` names, else
    the newest complete one); a run directory holding such a root as `checkpoints/`; a `latest` file.
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
            f"{setting} ({str(path)!r}) is not a complete checkpoint: it has neither a "
            f"'{COMPLETE_MARKER}' marker nor megatron's {MEGATRON_METADATA} (an interrupted save?). "
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
