"""Whether a checkpoint's files are the ones its save wrote: `manifest.json` lists every file with its size
and CRC-32 (zlib.crc32, streamed in 4 MiB blocks); `verify_checkpoint` reads them back and names what differs.

Standard library only: no torch, no megatron (the resolver in layout.py verifies before anything heavy loads).
"""
from __future__ import annotations

import json
import logging
import os
import zlib
from pathlib import Path

from megatron_ext.errors import UserError

log = logging.getLogger("megatron_ext")

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
CHECKSUM = "crc32"
_BLOCK = 4 << 20
MANIFEST_MAX_BYTES = 64 << 20  # about 500k files listed; a larger one is not ours
_UNLISTED = ("complete", MANIFEST_FILE)  # the marker and the manifest itself are written after it


class CheckpointCorrupt(UserError, ValueError):
    """A checkpoint whose files differ from what its manifest lists (a flipped bit, a truncated shard)."""


def file_crc32(path: Path) -> int:
    """CRC-32 of a file, read in blocks so that a multi-GB shard never sits in memory."""
    crc = 0
    with open(path, "rb") as handle:
        while block := handle.read(_BLOCK):
            crc = zlib.crc32(block, crc)
    return crc


def checkpoint_files(checkpoint: Path) -> list[str]:
    """Every file below `checkpoint` (relative, '/'-separated, sorted) that the manifest covers."""
    names = []
    for folder, _, files in os.walk(checkpoint):
        for name in files:
            relative = (Path(folder) / name).relative_to(checkpoint).as_posix()
            if relative not in _UNLISTED:
                names.append(relative)
    return sorted(names)


def describe_files(checkpoint: Path, names: list[str]) -> dict[str, dict]:
    """{name: {"size", "crc32"}} of these files (a rank's share of a checkpoint)."""
    return {name: {"size": (checkpoint / name).stat().st_size, CHECKSUM: f"{file_crc32(checkpoint / name):08x}"}
            for name in names}


def write_manifest(checkpoint: Path, files: dict[str, dict]) -> None:
    """Write manifest.json (fsynced) listing `files`, as describe_files gives them."""
    manifest = {"format": MANIFEST_FORMAT, "checksum": CHECKSUM, "files": dict(sorted(files.items()))}
    with open(checkpoint / MANIFEST_FILE, "w") as handle:
        handle.write(json.dumps(manifest, indent=1) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_manifest(checkpoint: Path) -> dict[str, dict] | None:
    """The files the manifest lists; None for a checkpoint saved before manifests existed. A manifest that is not a
    regular file (a FIFO, a device, a directory) or larger than MANIFEST_MAX_BYTES is refused unread."""
    path = Path(checkpoint) / MANIFEST_FILE
    if not path.exists() and not path.is_symlink():
        return None
    try:
        if not path.is_file():
            raise ValueError("not a regular file")
        with open(path, "rb") as handle:
            raw = handle.read(MANIFEST_MAX_BYTES + 1)
        if len(raw) > MANIFEST_MAX_BYTES:
            raise ValueError(f"larger than {MANIFEST_MAX_BYTES} bytes")
        manifest = json.loads(raw.decode("utf-8"))
        files = manifest["files"]
        if manifest.get("checksum") != CHECKSUM or not all(
                isinstance(entry["size"], int) and isinstance(entry[CHECKSUM], str) for entry in files.values()):
            raise ValueError("unexpected entries")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as error:
        raise CheckpointCorrupt(f"{path} is not a readable manifest ({type(error).__name__}: "
                                f"{str(error)[:200]})") from None
    return files


def file_problems(checkpoint: Path, listed: dict[str, dict]) -> list[str]:
    """What differs between these listed files and the disk, cheapest check first (size, then CRC-32)."""
    problems = []
    for name, entry in listed.items():
        try:
            problems += _file_problem(Path(checkpoint), name, entry)
        except (OSError, ValueError) as error:  # a name no file can have (a NUL, too long), an unreadable file
            problems.append(f"{name[:100]!r}: cannot be read ({type(error).__name__})")
    return problems


def _file_problem(checkpoint: Path, name: str, entry: dict) -> list[str]:
    path = checkpoint / name
    if Path(name).is_absolute() or ".." in Path(name).parts:
        return [f"{name[:100]}: names a file outside the checkpoint"]
    if not path.is_file():
        return [f"{name[:100]}: missing"]
    if path.stat().st_size != entry["size"]:
        return [f"{name}: {path.stat().st_size} bytes, the save wrote {entry['size']}"]
    if f"{file_crc32(path):08x}" != entry[CHECKSUM]:
        return [f"{name}: CRC-32 {file_crc32(path):08x} differs from the saved {entry[CHECKSUM][:16]}"]
    return []


_verified: dict[tuple, list[str]] = {}  # (path, manifest mtime, share) -> problems: find, then load, read once


def verify_checkpoint(checkpoint: str | Path, rank: int = 0, world_size: int = 1) -> list[str]:
    """The problems of a checkpoint's files ([] when every listed file matches); with world_size > 1, of this
    rank's share of them. A checkpoint without a manifest (saved before they existed) passes with a warning:
    its files cannot be checked."""
    checkpoint = Path(checkpoint)
    try:
        listed = read_manifest(checkpoint)
    except CheckpointCorrupt as error:
        return [str(error)]
    if listed is None:
        if rank == 0:
            log.warning(f"megatron_ext: {checkpoint} has no {MANIFEST_FILE} (saved before manifests): "
                        f"loading it unverified")
        return []
    stat = (checkpoint / MANIFEST_FILE).stat()
    key = (str(checkpoint.resolve()), stat.st_mtime_ns, stat.st_size, rank, world_size)
    if key not in _verified:
        share = sorted(listed)[rank::world_size]
        _verified[key] = file_problems(checkpoint, {name: listed[name] for name in share})
    return list(_verified[key])


def require_verified(checkpoint: Path, setting: str) -> None:
    """Raise a CheckpointCorrupt naming `setting` and the files at fault if the checkpoint does not verify."""
    problems = verify_checkpoint(checkpoint)
    if problems:
        raise corrupt(checkpoint, setting, problems)


def corrupt(checkpoint: Path, setting: str, problems: list[str]) -> CheckpointCorrupt:
    """The error for a checkpoint whose files do not match its manifest."""
    return CheckpointCorrupt(
            f"{setting} ({str(checkpoint)!r}) does not match its {MANIFEST_FILE}: {'; '.join(problems[:3])}"
            f"{f' (+{len(problems) - 3} more)' if len(problems) > 3 else ''}. Use another checkpoint, "
            f"or load it anyway with checkpoint.verify: false (--no-verify)")
