"""torch.distributed.checkpoint's `.metadata` read without running code: a pickle allowed only the metadata classes
that torch DCP and megatron's torch_dist format write (found by tracing the unpickling of our checkpoints).

torch's FileSystemReader.read_metadata uses plain pickle.load, so a crafted `.metadata` would run anything;
`check_dcp_metadata` vets the file before megatron/torch read it, and `SafeFileSystemReader` reads it itself.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import StorageMeta

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


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
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
    """Raise UnsafeCheckpointMetadata unless `checkpoint/.metadata` holds only metadata classes (no file: no-op)."""
    path = Path(checkpoint) / DCP_METADATA
    if path.is_file():
        load_dcp_metadata(path.read_bytes(), str(path))


class SafeFileSystemReader(FileSystemReader):
    """torch's FileSystemReader whose read_metadata uses the allow-listed unpickler."""

    def read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = load_dcp_metadata(stream.read(), str(path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id  # as torch's read_metadata does
        return metadata
