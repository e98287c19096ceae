"""Loss-mask sidecars: which tokens of an indexed dataset the loss counts.

Next to `{prefix}.bin/.idx` a sidecar `{prefix}_loss_mask.bin/.idx` lists the same documents with one uint8 per
token: 1 where the token is a target the loss counts (an answer), 0 elsewhere. `data.answer_only_loss: true`
reads it (megatron_ext.data.dataset). `megatron_ext.data.passkey_data` writes passkey prompts this way.
"""

from pathlib import Path

import numpy as np

LOSS_MASK_SUFFIX = "_loss_mask"  # the sidecar's prefix: f"{prefix}{LOSS_MASK_SUFFIX}"


def loss_mask_prefix(prefix) -> str:
    return f"{prefix}{LOSS_MASK_SUFFIX}"


def write_with_loss_mask(prefix, documents: list[list[int]], targets: list[list[int]], vocab_size: int,
                         tokenizer=None) -> None:
    """Write `{prefix}.bin/.idx` and its sidecar; each file under a temporary name, renamed into place. `tokenizer`
    (the encoder that made `documents`) is recorded in `{prefix}.tokenizer.json`, as preprocess records it."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    _write_indexed(prefix, documents, vocab_size, tokenizer)
    _write_indexed(Path(loss_mask_prefix(prefix)), targets, 2)


def _write_indexed(prefix: Path, documents: list[list[int]], vocab_size: int, tokenizer=None) -> None:
    from megatron_ext.data.preprocess import _write_atomically

    _write_atomically((np.asarray(ids, dtype=np.int64) for ids in documents), Path(f"{prefix}.bin"),
                      Path(f"{prefix}.idx"), vocab_size, tokenizer)
