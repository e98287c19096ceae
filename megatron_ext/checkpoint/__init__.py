"""Checkpoints: where they live and which exist (layout), what they record (state), how they are written
and read with megatron-core's dist_checkpointing (store), which older ones keep_last removes (retention), whether
their files are intact (integrity), one writer per directory (lock), `.metadata` read without running code
(safe_metadata). Imports nothing heavy until a name is used.
"""

from typing import TYPE_CHECKING

from megatron_ext.lazy import lazy_getattr

_LOADED_ON_FIRST_USE = {
    "CheckpointError": "megatron_ext.checkpoint.layout",
    "find_checkpoint": "megatron_ext.checkpoint.layout",
    "resolve_checkpoint": "megatron_ext.checkpoint.layout",
    "list_checkpoints": "megatron_ext.checkpoint.layout",
    "CheckpointCorrupt": "megatron_ext.checkpoint.integrity",
    "verify_checkpoint": "megatron_ext.checkpoint.integrity",
    "lock_checkpoint_dir": "megatron_ext.checkpoint.lock",
    "CheckpointState": "megatron_ext.checkpoint.state",
    "SavedCheckpoint": "megatron_ext.checkpoint.state",
    "read_checkpoint": "megatron_ext.checkpoint.state",
    "load_checkpoint": "megatron_ext.checkpoint.store",
    "save_checkpoint": "megatron_ext.checkpoint.store",
}

if TYPE_CHECKING:
    from megatron_ext.checkpoint.integrity import CheckpointCorrupt, verify_checkpoint
    from megatron_ext.checkpoint.layout import CheckpointError, find_checkpoint, list_checkpoints, resolve_checkpoint
    from megatron_ext.checkpoint.lock import lock_checkpoint_dir
    from megatron_ext.checkpoint.state import CheckpointState, SavedCheckpoint, read_checkpoint
    from megatron_ext.checkpoint.store import load_checkpoint, save_checkpoint

__all__ = sorted(_LOADED_ON_FIRST_USE)
__getattr__ = lazy_getattr(__name__, _LOADED_ON_FIRST_USE)
