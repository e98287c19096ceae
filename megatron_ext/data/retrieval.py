"""Loss-mask sidecars: which tokens of an indexed dataset the loss counts.

Next to `{prefix}.bin/.idx` a sidecar `{prefix}_loss_mask.bin/.idx` lists the same documents with one uint8 per
token: 1 where the token is a target the loss counts (an answer), 0 elsewhere. `data.answer_only_loss: true`
reads it (megatron_ext.data.dataset). `megatron_ext.eval.passkey_data` writes passkey prompts this way.
"""

import os
from pathlib import Path

import numpy as np

LOSS_MASK_SUFFIX = "_loss_mask"  # the sidecar's prefix: f"{prefix}{LOSS_MASK_SUFFIX}"


def loss_mask_prefix(prefix) -> str:
    return f"{prefix}{LOSS_MASK_SUFFIX}"


def write_with_loss_mask(prefix, documents: list[list[int]], targets: list[list[int]], vocab_size: int) -> None:
    """Write `{prefix}.bin/.idx` and its sidecar; each file under a temporary name, renamed into place."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    _write_indexed(prefix, documents, vocab_size)
    _write_indexed(Path(loss_mask_prefix(prefix)), targets, 2)


def _write_indexed(prefix: Path, documents: list[list[int]], vocab_size: int) -> None:
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    staging_bin, staging_idx = Path(f"{prefix}.bin.partial"), Path(f"{prefix}.idx.partial")
    builder = IndexedDatasetBuilder(str(staging_bin), dtype=DType.optimal_dtype(vocab_size))
    try:
        for ids in documents:
            builder.add_document(np.asarray(ids, dtype=np.int64), [len(ids)])
        builder.finalize(str(staging_idx))
        os.replace(staging_bin, f"{prefix}.bin")
        os.replace(staging_idx, f"{prefix}.idx")
    finally:
        builder.data_file.close()
        staging_bin.unlink(missing_ok=True)
        staging_idx.unlink(missing_ok=True)
