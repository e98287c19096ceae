"""keep_last: which older checkpoints a save removes, so that removing never leaves only checkpoints that fail
their manifest.

Imports torch.distributed (the verification is shared by the ranks) and the checkpoint package's layout and
integrity modules; used by checkpoint/store.py at the end of every save, on every rank.

keep_last=K keeps the K newest complete checkpoints, the one just saved always among them (a newer iteration may
exist that a resume skipped because it failed verification). With K >= 2 the K - 1 older ones are the fallback
should the newest be lost; a fallback that no longer matches its manifest (a bit flipped at rest, a truncated
shard) is no fallback, so before anything is removed the kept older ones are verified, newest first, until one
verifies. If none does, the newest of the ones due for removal that verifies is kept aside (one more than K) and a
warning names the ones that failed; it goes at a later save, once a kept older checkpoint verifies again.
The checkpoint just saved is not read again: its checksums were taken from the files this save wrote.

Cost, chosen on purpose: a save that removes something reads one older checkpoint in full (more only when the
newest kept ones fail), every rank a share of its files (size first, then CRC-32), so about
checkpoint size / ranks of reading per rank; a save that removes nothing, and keep_last=1 (no fallback asked for),
read nothing. Results are not cached: the damage this guards against happens at rest, after any earlier check.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import torch

from megatron_ext.checkpoint.integrity import CheckpointCorrupt, file_problems, read_manifest
from megatron_ext.checkpoint.layout import TMP_INFIX, list_checkpoints

log = logging.getLogger("megatron_ext")


def retire(checkpoint: Path, token: str) -> None:
    """Remove a checkpoint: renamed to a staging name first, so a crash mid-delete never leaves a half 'complete'
    one (the next save removes what is left)."""
    doomed = checkpoint.parent / f"{checkpoint.name}{TMP_INFIX}retired-{token}"
    os.replace(checkpoint, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def prune(root: Path, keep_last: int, saved: Path, token: str) -> list[str]:
    """Collective (every rank calls it, after `saved` is in place): remove all but the keep_last newest complete
    checkpoints in root, never `saved`, keeping aside the newest that verifies when no kept older one does (see the
    module docstring). Returns the names removed (on rank 0; [] elsewhere)."""
    rank0 = torch.distributed.get_rank() == 0
    kept_others, doomed = _broadcast(_plan(root, keep_last, saved) if rank0 else None)
    if not doomed:
        return []
    aside = None
    if keep_last >= 2:
        failed = []
        for name in kept_others:  # newest first; normally the first one verifies and the search ends
            problems = _problems_collectively(root / name)
            if not problems:
                break
            failed.append(f"{name} ({problems[0]})")
        else:
            aside = next((name for name in doomed if not _problems_collectively(root / name)), None)
            if rank0 and failed:
                log.warning(f"megatron_ext: keep_last={keep_last}: the kept older checkpoints do not match their "
                            f"manifest: {'; '.join(failed)}. "
                            + (f"Keeping {aside} as well, the newest older one that verifies" if aside else
                               "None of the ones due for removal verifies either"))
    removed = []
    if rank0:
        for name in doomed:
            if name == aside:
                continue
            try:
                retire(root / name, token)
                removed.append(name)
            except OSError as error:  # the save itself is complete: a removal that fails is retried next save
                log.warning(f"megatron_ext: keep_last={keep_last}: could not remove {root / name} ({error})")
    return removed


def _plan(root: Path, keep_last: int, saved: Path) -> tuple[list[str], list[str]]:
    """(the kept checkpoints other than `saved`, newest first; the ones due for removal, newest first). Kept: the
    keep_last newest and `saved` (one more when `saved` is not among them)."""
    complete = list_checkpoints(root)
    kept = {path.name for path in complete[-keep_last:]} | {saved.name}
    newest_first = [path.name for path in reversed(complete)]
    return ([name for name in newest_first if name in kept and name != saved.name],
            [name for name in newest_first if name not in kept])


def _problems_collectively(checkpoint: Path) -> list[str]:
    """What differs between `checkpoint`'s files and its manifest, each rank reading a share ([] when none: a
    checkpoint saved before manifests counts as verified, as a resume loads it). Read now, never from a cache."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    started = time.perf_counter()
    try:
        listed = read_manifest(checkpoint)
    except CheckpointCorrupt as error:
        listed, problems = {}, [str(error)]
    else:
        problems = []
    if listed:
        share = sorted(listed)[rank::world]
        try:
            problems += file_problems(checkpoint, {name: listed[name] for name in share})
        except OSError as error:  # unreadable (permissions, an I/O error): not a fallback either
            problems.append(f"{type(error).__name__}: {error}")
    if world > 1:
        every_rank = [None] * world
        torch.distributed.all_gather_object(every_rank, problems)
        problems = list(dict.fromkeys(problem for share in every_rank for problem in share))
    if rank == 0:
        log.info(f"megatron_ext: keep_last verified {checkpoint.name} before removing older checkpoints "
                 f"({'ok' if not problems else 'does not match its manifest'}, "
                 f"{time.perf_counter() - started:.2f} s)")
    return problems


def _broadcast(value):
    """Rank 0's `value` on every rank."""
    if torch.distributed.get_world_size() == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
