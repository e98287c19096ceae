"""Checkpoints: where they live and which exist (layout), what they record (state), how they are written
and read with megatron-core's dist_checkpointing (store). Imports nothing heavy until a name is used.
"""

from typing import TYPE_CHECKING

from megatron_ext.lazy import lazy_getattr

_LOADED_ON_FIRST_USE = {
    "CheckpointError": "megatron_ext.checkpoint.layout",
    "find_checkpoint": "megatron_ext.checkpoint.layout",
    "resolve_checkpoint": "megatron_ext.checkpoint.layout",
    "list_checkpoints": "megatron_ext.checkpoint.layout",
    "CheckpointState": "megatron_ext.checkpoint.state",
    "SavedCheckpoint": "megatron_ext.checkpoint.state",
    "read_checkpoint": "megatron_ext.checkpoint.state",
    "load_checkpoint": "megatron_ext.checkpoint.store",
    "save_checkpoint": "megatron_ext.checkpoint.store",
}

if TYPE_CHECKING:
    from megatron_ext.checkpoint.layout import CheckpointError, find_checkpoint, list_checkpoints, resolve_checkpoint
    from megatron_ext.checkpoint.state import CheckpointState, SavedCheckpoint, read_checkpoint
    from megatron_ext.checkpoint.store import load_checkpoint, save_checkpoint

__all__ = sorted(_LOADED_ON_FIRST_USE)
__getattr__ = lazy_getattr(__name__, _LOADED_ON_FIRST_USE)
