"""torch.distributed.checkpoint's files read without running code, each byte read once: `.metadata` through a pickle
allowed only the metadata classes that torch DCP and megatron's torch_dist format write (found by tracing the
unpickling of our checkpoints), the object blobs inside `__*.distcp` vetted from the very bytes that are loaded.

torch's FileSystemReader.read_metadata uses plain pickle.load, so a crafted `.metadata` would run anything; and a
file vetted once, then read again by torch, could be swapped in between (write access to the checkpoint during the
load). `SafeFileSystemReader` is the one reader megatron_ext's loads and conversions use: it reads `.metadata`
once, vets it and hands that same object to every later read_metadata call (megatron-core's load included,
through `vetted_load_strategy`). The object blobs (megatron's ShardedObjects, e.g. a layer's `_extra_state`) are
unpickled by torch's load planner with `torch.load(weights_only=False)`: the reader first loads the bytes it read
with `weights_only=True` and hands the planner those same bytes, so one that asks to build anything but plain data
(tensors, numbers, strings, containers) is refused. Every file `.metadata` points at must lie in the checkpoint.
A file that does not read as what the save wrote ends in one CheckpointUnreadable naming it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
import io
import pickle
import threading
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta
from torch.futures import Future

from megatron_ext.checkpoint.layout import CheckpointError
from megatron_ext.errors import UserError

DCP_METADATA = ".metadata"
_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.planner": {"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # a layout by its name
    "torch": {"Size"},
    "collections": {"OrderedDict"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},  # storage_meta.checkpoint_id
}
# What reading back a file that is not the one the save wrote can raise: torch.load, zipfile and pickle of arbitrary
# bytes end in almost any exception type (UnpicklingError, RuntimeError, IndexError, KeyError, struct.error, ...), and
# these calls do nothing but read that one file, so any Exception there is the file's.
READ_ERRORS = (Exception,)


class UnsafeCheckpointMetadata(CheckpointError):
    """A `.metadata` file that asks to build something other than checkpoint metadata."""


class CheckpointUnreadable(CheckpointError):
    """A checkpoint file that does not read as what the save wrote (damaged, or replaced by another file)."""


def unreadable(path: str | Path, error: BaseException) -> CheckpointUnreadable:
    """The one-line error for a checkpoint file that torch, pickle or JSON cannot read back."""
    return CheckpointUnreadable(
        f"{path} cannot be read ({short_reason(error)}): it is damaged or is not the file the save wrote. Use "
        "another checkpoint (an earlier iter_ directory), or restore this one from a copy you trust; a manifest "
        "that matches does not vouch for it (its CRC-32 finds damage, not a replaced file)")


def short_reason(error: BaseException) -> str:
    """The informative line of an error: torch's weights-only refusal names its cause on a later line."""
    text = str(error)
    if "WeightsUnpickler error:" in text:
        text = "WeightsUnpickler error: " + text.split("WeightsUnpickler error:", 1)[1].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else 'no message'}"[:240]


def _enum_member(cls, name: str):
    """Python 3.11.0 to 3.11.4 (Debian 12's 3.11.2: the CPU image) pickle an Enum member as getattr(its class,
    its name), later ones as its class called with its value. The class came through the allow-list, so only
    the members of allowed enums are reachable this way."""
    if isinstance(cls, type) and issubclass(cls, enum.Enum) and isinstance(name, str) and name in cls.__members__:
        return cls[name]
    raise pickle.UnpicklingError(f"getattr({getattr(cls, '__name__', cls)!r}, {name!r}) is not a member of an "
                                 "enum of checkpoint metadata")


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if (module, name) == ("builtins", "getattr"):
            return _enum_member
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a checkpoint metadata class")


def load_dcp_metadata(data: bytes, where: str):
    """Unpickle a `.metadata` payload with the allow-list; an UnsafeCheckpointMetadata naming `where` otherwise."""
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except READ_ERRORS as error:  # damaged bytes fail in any way; the allow-list's own refusal is one of them
        raise UnsafeCheckpointMetadata(
            f"{where} is not plain checkpoint metadata ({error}); refusing to load it. Was the checkpoint "
            f"written by megatron_ext or megatron-core? Re-create it from a trusted source") from None
    return metadata


def check_dcp_metadata(checkpoint: str | Path) -> SafeFileSystemReader | None:
    """The reader of `checkpoint` once its `.metadata` is vetted: only metadata classes, only files of the
    checkpoint, every object blob plain data (UnsafeCheckpointMetadata otherwise); None without a `.metadata`.
    Load through the reader it returns: it hands on the metadata it vetted, never a second read of the file."""
    if not (Path(checkpoint) / DCP_METADATA).is_file():
        return None
    reader = SafeFileSystemReader(str(checkpoint))
    reader.read_metadata()
    return reader


def _check_storage(checkpoint: Path, metadata) -> None:
    objects = {fqn for fqn, entry in metadata.state_dict_metadata.items() if isinstance(entry, BytesStorageMetadata)}
    for index, info in (metadata.storage_data or {}).items():
        name = str(info.relative_path)
        if Path(name).name != name or name in ("", ".", ".."):
            raise UnsafeCheckpointMetadata(
                f"{checkpoint / DCP_METADATA} points {index.fqn!r} at {name!r}, outside the checkpoint directory; "
                "refusing to load it. Re-create the checkpoint from a trusted source")
        if index.fqn in objects:
            if getattr(info, "transform_descriptors", None):
                raise UnsafeCheckpointMetadata(
                    f"{checkpoint / name} (object {index.fqn!r}) is stored transformed ({info.transform_descriptors});"
                    " megatron_ext cannot vet such objects before loading. Re-save the checkpoint without them")
            try:
                with open(checkpoint / name, "rb") as handle:
                    handle.seek(info.offset)
                    blob = handle.read(info.length)
            except OSError as error:
                raise unreadable(checkpoint / name, error) from None
            _require_plain_data(blob, f"{checkpoint / name} (object {index.fqn!r} at byte {info.offset})")


def _require_plain_data(blob: bytes, where: str) -> None:
    """Refuse an object blob that torch's weights-only unpickler does not take (code, or not a pickle at all)."""
    try:
        torch.load(io.BytesIO(blob), weights_only=True, map_location="cpu")
    except READ_ERRORS as error:
        raise UnsafeCheckpointMetadata(
            f"{where} is not plain data or is damaged ({short_reason(error)}); torch would unpickle it with "
            "weights_only=False, which can run code, so it is refused. Was the checkpoint written by megatron_ext "
            "or megatron-core? Re-create it from a trusted source") from None


class SafeFileSystemReader(FileSystemReader):
    """torch's FileSystemReader that reads `.metadata` once with the allow-listed unpickler (every later
    read_metadata returns that vetted object), loads object blobs only after vetting the bytes it hands on, and
    names the file in a CheckpointUnreadable when one does not read."""

    def __init__(self, path):
        super().__init__(path)
        self._vetted: dict = {}  # rank (None: the global .metadata) -> the metadata read and vetted once

    def read_metadata(self, *args, **kwargs):
        rank = kwargs.get("rank")
        if rank not in self._vetted:
            path = self._get_metadata_path(rank)
            with self.fs.create_stream(path, "rb") as stream:
                metadata = load_dcp_metadata(stream.read(), str(path))
            if not isinstance(metadata, Metadata):
                raise UnsafeCheckpointMetadata(f"{path} holds a {type(metadata).__name__}, not checkpoint metadata; "
                                               "refusing to load it. Re-create the checkpoint from a trusted source")
            try:
                _check_storage(Path(self.path), metadata)
            except UserError:
                raise
            except READ_ERRORS as error:  # entries of allowed classes, but not in the shape torch writes them
                raise UnsafeCheckpointMetadata(f"{path} does not describe the checkpoint's files as torch writes them "
                                               f"({short_reason(error)}); refusing to load it. Re-create the "
                                               "checkpoint from a trusted source") from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            self._vetted[rank] = metadata
        metadata = self._vetted[rank]
        metadata.storage_meta.load_id = self.load_id  # as torch's read_metadata does
        return metadata

    def read_data(self, plan, planner) -> Future:
        per_file: dict[str, list] = {}
        for item in plan.items:
            per_file.setdefault(str(self.storage_data[item.storage_index].relative_path), []).append(item)
        vetting = _VettingPlanner(planner, Path(self.path), self.storage_data)
        for name, items in per_file.items():
            try:
                super().read_data(dataclasses.replace(plan, items=items), vetting).wait()
            except UserError:
                raise
            except READ_ERRORS as error:
                raise unreadable(Path(self.path) / name, error) from None
        done: Future = Future()
        done.set_result(None)
        return done


class _VettingPlanner:
    """The load planner, except that an object blob reaches it only once its bytes load with weights_only=True:
    the planner unpickles those bytes, already in memory, so what was vetted is what loads."""

    def __init__(self, planner, checkpoint: Path, storage_data):
        self._planner, self._checkpoint, self._storage = planner, checkpoint, storage_data

    def __getattr__(self, name):
        return getattr(self._planner, name)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        blob = value.getvalue()
        info = self._storage[read_item.storage_index]
        _require_plain_data(blob, f"{self._checkpoint / info.relative_path} (object {read_item.storage_index.fqn!r}"
                                  f" at byte {info.offset})")
        self._planner.load_bytes(read_item, io.BytesIO(blob))


_PLACING_READER = threading.Lock()


def vetted_load_strategy(reader: SafeFileSystemReader):
    """megatron-core's torch_dist load strategy reading through `reader` (its vetted `.metadata`, its vetted object
    blobs) instead of a FileSystemReader of its own: pass it as dist_checkpointing.load(sharded_strategy=...)."""
    from megatron.core.dist_checkpointing.strategies import torch as mcore_torch

    if not callable(getattr(mcore_torch, "_get_filesystem_reader", None)):
        raise RuntimeError("megatron-core no longer makes its checkpoint reader in strategies.torch."
                           "_get_filesystem_reader: megatron_ext cannot make it read through the vetted reader")

    @contextlib.contextmanager
    def reading_through_reader():
        with _PLACING_READER:
            own = mcore_torch._get_filesystem_reader
            mcore_torch._get_filesystem_reader = lambda *args, **kwargs: reader
            try:
                yield
            finally:
                mcore_torch._get_filesystem_reader = own

    class VettedLoadStrategy(mcore_torch.TorchDistLoadShardedStrategy):
        def load(self, sharded_state_dict, checkpoint_dir):
            with reading_through_reader():
                return super().load(sharded_state_dict, checkpoint_dir)

        def load_tensors_metadata(self, checkpoint_dir, metadata=None):
            return super().load_tensors_metadata(checkpoint_dir, metadata or reader.read_metadata())

        def load_sharded_metadata(self, checkpoint_dir):
            with reading_through_reader():
                return super().load_sharded_metadata(checkpoint_dir)

    return VettedLoadStrategy()
