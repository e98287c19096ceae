"""torch.distributed.checkpoint's `.metadata` read without running code: a pickle allowed only the metadata classes
that torch DCP and megatron's torch_dist format write (found by tracing the unpickling of our checkpoints).

torch's FileSystemReader.read_metadata uses plain pickle.load, so a crafted `.metadata` would run anything;
`check_dcp_metadata` vets the file before megatron/torch read it, and `SafeFileSystemReader` reads it itself.
The object blobs inside the `__*.distcp` files (megatron's ShardedObjects, e.g. a layer's `_extra_state`) are
read by torch's load planner with `torch.load(weights_only=False)`: `check_dcp_metadata` also loads each one
with `weights_only=True` first, so one that asks to build anything but plain data (tensors, numbers, strings,
containers) is refused before megatron reads it; and every file `.metadata` points at must lie in the checkpoint.
"""
from __future__ import annotations

import enum
import io
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, StorageMeta

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


class UnsafeCheckpointMetadata(UserError, ValueError):
    """A `.metadata` file that asks to build something other than checkpoint metadata."""


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
        return _MetadataUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError, ValueError) as error:
        raise UnsafeCheckpointMetadata(
            f"{where} is not plain checkpoint metadata ({error}); refusing to load it. Was the checkpoint "
            f"written by megatron_ext or megatron-core? Re-create it from a trusted source") from None


def check_dcp_metadata(checkpoint: str | Path) -> None:
    """Raise UnsafeCheckpointMetadata unless `checkpoint/.metadata` holds only metadata classes, names only files
    of the checkpoint, and every object blob it lists loads as plain data (no `.metadata`: no-op)."""
    checkpoint = Path(checkpoint)
    path = checkpoint / DCP_METADATA
    if path.is_file():
        metadata = load_dcp_metadata(path.read_bytes(), str(path))
        _check_storage(checkpoint, metadata)


def _check_storage(checkpoint: Path, metadata) -> None:
    objects = {fqn for fqn, entry in metadata.state_dict_metadata.items() if isinstance(entry, BytesStorageMetadata)}
    for index, info in (metadata.storage_data or {}).items():
        name = str(info.relative_path)
        if Path(name).name != name or name in ("", ".", ".."):
            raise UnsafeCheckpointMetadata(
                f"{checkpoint / DCP_METADATA} points {index.fqn!r} at {name!r}, outside the checkpoint directory; "
                "refusing to load it. Re-create the checkpoint from a trusted source")
        if index.fqn in objects:
            _check_object_blob(checkpoint / name, index.fqn, info)


def _check_object_blob(file: Path, fqn: str, info) -> None:
    where = f"{file} (object {fqn!r} at byte {info.offset})"
    if getattr(info, "transform_descriptors", None):
        raise UnsafeCheckpointMetadata(f"{where} is stored transformed ({info.transform_descriptors}); megatron_ext "
                                       "cannot vet such objects before loading. Re-save the checkpoint without them")
    with open(file, "rb") as handle:
        handle.seek(info.offset)
        blob = handle.read(info.length)
    try:
        torch.load(io.BytesIO(blob), weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        reason = str(error).strip().splitlines()[-1][:300]
        raise UnsafeCheckpointMetadata(
            f"{where} is not plain data or is damaged ({reason}); torch would unpickle it with weights_only=False, which can run "
            "code, so it is refused. Was the checkpoint written by megatron_ext or megatron-core? Re-create it from "
            "a trusted source") from None


class SafeFileSystemReader(FileSystemReader):
    """torch's FileSystemReader whose read_metadata uses the allow-listed unpickler and vets the object blobs."""

    def read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = load_dcp_metadata(stream.read(), str(path))
        _check_storage(Path(self.path), metadata)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id  # as torch's read_metadata does
        return metadata
