"""megatron_ext checkpoints one tensor at a time: a weightless model skeleton, a save strategy that
pulls each tensor from a source while megatron's format is written, and loads of a few tensors.

The skeleton is a LongContextGPTModel built without initialisation: its parameters are torch.empty
and never written, so the OS backs none of their pages (RSS stays flat), yet it gives megatron
everything its dist_checkpointing needs: names, shapes, checkpoint keys, layer offsets.
The one module of megatron_ext.convert that imports megatron.
"""

import contextlib
import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
from torch.distributed.checkpoint.planner import LoadPlan, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_ext.checkpoint.integrity import require_verified
from megatron_ext.checkpoint.safe_metadata import DCP_METADATA, SafeFileSystemReader, unreadable
from megatron_ext.errors import ConversionError
from megatron_ext.config import ParallelConfig, TrainConfig


def build_skeleton(config: TrainConfig, padded_vocab_size: int, dtype: torch.dtype):
    """The full LongContextGPTModel of `config` in `dtype`, parameters allocated but never touched."""
    from megatron_ext.models import LongContextGPTModel, local_layer_spec
    from megatron_ext.models.builder import transformer_config

    config = copy.deepcopy(config)
    config.parallel = ParallelConfig()  # one process holds the whole model
    config.training.precision = "fp32"
    tc = transformer_config(config, torch.device("cpu"))
    tc.perform_initialization = False
    tc.params_dtype = dtype
    model = LongContextGPTModel(
        tc, local_layer_spec(normalization=config.model.normalization), padded_vocab_size,
        config.model.seq_length, pre_process=True, post_process=True,
        share_embeddings_and_output_weights=config.model.tie_embeddings)
    return model.to(dtype)  # only the small norm weights are not made in params_dtype


# --- save: megatron's format, each tensor pulled from a source while it is written --------------

class PullingSaveStrategy(TorchDistSaveShardedStrategy):
    """megatron's torch_dist format, written by torch's single-threaded FileSystemWriter.

    That writer asks the planner for each tensor only when it writes it; our planner answers with
    `source(name)` (the full tensor of a model parameter, by state_dict name) cut to the chunk asked
    for, instead of the skeleton's empty parameter. Peak memory: the tensors one source call needs.
    """

    def __init__(self, source: Callable[[str], torch.Tensor]):
        super().__init__("torch_dist", 1)
        self.source = source

    def save(self, sharded_state_dict, checkpoint_dir):
        chunks = _ChunkIndex(sharded_state_dict)
        sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, True)
        planner = _PullingPlanner(chunks, self.source, dedup_replicated_tensors=False, flatten_state_dict=False)
        writer = FileSystemWriter(str(checkpoint_dir), single_file_per_rank=True, thread_count=1)
        with _original_errors():
            dcp.save(mcore_to_pyt_state_dict(sharded_state_dict, False), storage_writer=writer, planner=planner)


@contextlib.contextmanager
def _original_errors():
    """torch.distributed.checkpoint wraps any error in a CheckpointException (a BaseException, which
    `except Exception` misses); raise the error itself (a missing file, a ConversionError, ...)."""
    try:
        yield
    except CheckpointException as wrapped:
        error, _ = next(iter(wrapped.failures.values()))
        raise error from None


class _ChunkIndex:
    """Which parameter (state_dict name) a saved chunk belongs to, and where in it.

    megatron saves all layers of one parameter under one key with a leading layer axis
    (`prepend_axis_num` axes); the chunk's offset on those axes names the layer.
    """

    def __init__(self, tree):
        self.names: dict[tuple, str] = {}
        self.prepended: dict[str, int] = {}
        self._visit(tree, None)

    def _visit(self, node, name):
        if isinstance(node, dict):
            for key, value in node.items():
                self._visit(value, key if isinstance(key, str) else name)
        elif isinstance(node, (list, tuple)):
            for value in node:
                self._visit(value, name)
        elif isinstance(node, ShardedTensor):
            axes = node.prepend_axis_num
            self.prepended[node.key] = axes
            self.names[(node.key, tuple(node.global_offset[:axes]))] = name

    def locate(self, key: str, offsets, sizes) -> tuple[str, tuple[slice, ...]]:
        """(state_dict name, the chunk's slices within that full parameter)."""
        axes = self.prepended[key]
        name = self.names[(key, tuple(offsets[:axes]))]
        return name, tuple(slice(o, o + s) for o, s in zip(offsets[axes:], sizes[axes:]))


class _PullingPlanner(MCoreSavePlanner):
    """Answers the writer's request for a chunk with that piece of `source(name)`.

    torch's writer asks for the next chunk only after writing the previous one, but keeps the
    last tensor of every key in a dict (read only by its safetensors format): the previous
    chunk's memory is released here, so at most one chunk stays alive.
    """

    def __init__(self, chunks: _ChunkIndex, source, **kwargs):
        super().__init__(**kwargs)
        self.chunks, self.source = chunks, source
        self.written: torch.Tensor | None = None

    def resolve_data(self, write_item):
        if write_item.type == WriteItemType.BYTE_IO:  # megatron's small ShardedObjects
            return super().resolve_data(write_item)
        if self.written is not None:
            self.written.untyped_storage().resize_(0)
        chunk = write_item.tensor_data.chunk
        name, slices = self.chunks.locate(write_item.index.fqn, chunk.offsets, chunk.sizes)
        data = self.source(name)[slices].reshape(chunk.sizes)
        if data.untyped_storage().nbytes() != data.nbytes:  # part of a larger tensor: give it its own memory
            data = data.clone()
        self.written = data
        return data


# --- load: a few parameters at a time --------------------------------------------------------------

class ParameterReader:
    """Reads whole parameters of a megatron_ext checkpoint, a few at a time, into fresh tensors.

    Works from the skeleton's sharded_state_dict: parameter name -> (checkpoint key, the chunk of
    that key which is this parameter). torch.distributed.checkpoint then reads only the stored
    chunks overlapping it, whatever TP/PP they were saved with. (megatron's own load cannot take
    a part of a key in a one-process world: it would place the other layers on this rank too.)
    The files are checked against the checkpoint's manifest first; one SafeFileSystemReader
    (megatron_ext/checkpoint/safe_metadata.py) reads `.metadata` once through the allow-list unpickler and every
    read goes through it, so a `.metadata` swapped after the vetting is never read; a file that does not read back
    is named in a CheckpointUnreadable.
    """

    def __init__(self, checkpoint: Path, sharded: dict, *, setting: str = "--ckpt", verify: bool = True):
        if verify:
            require_verified(Path(checkpoint), setting)
        self.reader_path = str(checkpoint)
        self.reader = SafeFileSystemReader(self.reader_path)
        try:
            self.metadata = self.reader.read_metadata()
        except OSError as error:  # no .metadata: not a torch_dist checkpoint, or damaged
            raise unreadable(Path(checkpoint) / DCP_METADATA, error) from None
        entries = {name: entry for name, entry in sharded.items() if not isinstance(entry, ShardedObject)}
        self.chunks = {name: _parameter_chunk(entry) for name, entry in entries.items()}
        self.shapes = {name: tuple(entry.data.shape) for name, entry in entries.items()}

    def dtype(self, name: str) -> torch.dtype:
        """The dtype the parameter was saved in."""
        return self.metadata.state_dict_metadata[self.chunks[name][0]].properties.dtype

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """{name: the whole parameter} for these state_dict names, in their saved dtype."""
        wanted = {}
        for name in names:
            key, _, sizes = self.chunks[name]
            if key not in self.metadata.state_dict_metadata:
                raise ConversionError(f"{self.reader_path} has no tensor {key!r} (for {name}): "
                                      f"was it saved from another model?")
            wanted[name] = torch.empty(sizes, dtype=self.dtype(name))  # [1 per layer axis, *shape]
        planner = _ChunkLoadPlanner({name: self.chunks[name] for name in wanted})
        with _original_errors():
            dcp.load(wanted, storage_reader=self.reader, planner=planner)
        return {name: tensor.reshape(self.shapes[name]) for name, tensor in wanted.items()}


def _parameter_chunk(entry) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
    """(checkpoint key, offsets, sizes) of one whole parameter of a one-process (TP=1) model.

    Layers share a key along leading `prepend_axis_num` axes; in one process every parameter is
    whole, so its chunk starts at 0 on the other axes and spans its full shape.
    """
    if isinstance(entry, ShardedTensorFactory):  # e.g. SwiGLU's fc1, saved as two halves of one key
        built = [t for t in nested_values(entry.build()) if isinstance(t, ShardedTensor)]
        tensor = built[0]
    elif isinstance(entry, ShardedTensor):
        tensor = entry
    else:
        raise ConversionError(f"unexpected {type(entry).__name__} in the model's sharded state dict")
    axes = tensor.prepend_axis_num
    shape = tuple(entry.data.shape)
    return tensor.key, tuple(tensor.global_offset[:axes]) + (0,) * len(shape), (1,) * axes + shape


class _ChunkLoadPlanner(DefaultLoadPlanner):
    """Reads each requested chunk into the plain tensor stored under its parameter name."""

    def __init__(self, chunks: dict):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.requests = chunks

    def create_local_plan(self) -> LoadPlan:
        items = []
        for name, (key, offsets, sizes) in self.requests.items():
            local = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
            for item in create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [local]):
                items.append(dataclasses.replace(item, dest_index=MetadataIndex(name)))
        return LoadPlan(items)
