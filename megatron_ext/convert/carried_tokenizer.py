"""The tokenizer a checkpoint carries, taken out for an export without trusting megatron_ext.json's paths.

megatron_ext.json is a file anyone with write access to the checkpoint can edit (and rewrite its manifest to match):
`state.tokenizer_model: /etc/shadow`, `state.hf.tokenizer_dir: ../../../../secret` or a tokenizer file that is
/dev/zero would otherwise be copied into the export, or fill the disk. So what an export takes from a checkpoint
must lie inside it (SavedCheckpoint.inside; a symlink may not lead out), only regular files are read (no devices,
pipes or sockets), at most MAX_TOKENIZER_BYTES in all, each opened once (no symlink followed at the last step) and
copied into a private directory that the export then reads: a file swapped after the checks is never read.
A tokenizer recorded outside the checkpoint (an absolute path of an older checkpoint) is not read at all: the
user names it (--tokenizer, --hf-base). Standard library only.
"""
from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from megatron_ext.errors import ConversionError

log = logging.getLogger("megatron_ext")

# all of a checkpoint's tokenizer files together; the largest real ones (a 256k-token tokenizer.json) are ~35 MB
MAX_TOKENIZER_BYTES = 256 << 20


def checkpoint_tokenizer(saved, private: Path) -> Path | None:
    """A private copy (under `private`) of the tokenizer `saved` (a SavedCheckpoint) carries: state.hf.tokenizer_dir
    (a converted checkpoint's), else state.tokenizer_model; None (with a warning) when it records none that exists.
    A record leading out of the checkpoint, or files that are not regular or too large, are refused by name."""
    copied = (saved.state.hf or {}).get("tokenizer_dir")
    if copied:
        own = saved.inside(copied, "state.hf.tokenizer_dir")
        if own.is_dir():
            return _private_copy(own, saved.path, private, "state.hf.tokenizer_dir")
    recorded = saved.tokenizer_path  # a relative record leading out is refused there
    if recorded is None or not recorded.exists():
        log.warning(f"megatron_ext: {saved.path} records no tokenizer that exists here ({recorded}); the export has "
                    f"weights and config only: pass --tokenizer PATH or --hf-base DIR to copy a tokenizer")
        return None
    if not recorded.resolve().is_relative_to(saved.path.resolve()):
        raise ConversionError(
            f"--ckpt {saved.path} records its tokenizer at {recorded} (state.tokenizer_model in megatron_ext.json), "
            f"outside the checkpoint: an export copies only files the checkpoint carries. If that is this model's "
            f"tokenizer, name it yourself: --tokenizer {recorded}")
    return _private_copy(recorded, saved.path, private, "state.tokenizer_model")


def _private_copy(source: Path, checkpoint: Path, private: Path, key: str) -> Path:
    """Copy `source` (a file, or the regular files directly in a directory) into `private`; the copy's path."""
    if source.is_dir():
        entries = sorted(source.iterdir())
        target = private / source.name
    else:
        entries, target = [source], private
    target.mkdir(parents=True, exist_ok=True)
    budget = MAX_TOKENIZER_BYTES
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            continue  # tokenizers are flat: a subdirectory is not part of one
        data = _read_regular(entry, checkpoint, budget, key)
        budget -= len(data)
        (target / entry.name).write_bytes(data)
    return target if source.is_dir() else target / source.name


def _read_regular(path: Path, checkpoint: Path, budget: int, key: str) -> bytes:
    """The bytes of `path` if it is a regular file inside `checkpoint` and fits `budget`; a ConversionError naming
    it (and `key`, the record it came from) otherwise."""
    def refuse(why: str) -> ConversionError:
        return ConversionError(f"{path} ({key} of {checkpoint}) {why}: refusing to copy it into the export. Use a "
                               f"checkpoint megatron_ext wrote, or name the tokenizer yourself (--tokenizer PATH)")

    resolved = path.resolve()
    if not resolved.is_relative_to(checkpoint.resolve()):
        raise refuse(f"leads to {resolved}, outside the checkpoint")
    try:
        # O_NOFOLLOW: the checked target itself, never a symlink put there since; O_NONBLOCK: a pipe never blocks
        descriptor = os.open(resolved, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as error:
        raise refuse(f"cannot be opened ({error.strerror})") from None
    with os.fdopen(descriptor, "rb") as handle:
        mode = os.fstat(handle.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise refuse("is not a regular file (a device, a pipe or a socket)")
        data = handle.read(budget + 1)
    if len(data) > budget:
        raise refuse(f"makes the tokenizer larger than {MAX_TOKENIZER_BYTES >> 20} MiB, more than any tokenizer's "
                     "files take")
    return data
