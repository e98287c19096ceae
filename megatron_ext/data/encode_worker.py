"""Tokenizing inside `preprocess`'s worker processes.
Imports only the tokenizer libraries and numpy: a spawned worker starts in a fraction of a second, where
importing megatron.core would cost it ~4 s (a Hugging Face tokenizer arrives as its fast tokenizer's JSON,
so a worker needs neither transformers nor torch)."""

import numpy as np

from megatron_ext.data.documents import Document

_encoder = None


def start_worker(encoder) -> None:
    """Pool initializer: the parent's encoder (megatron_ext.data.tokenizer_files), unpickled once per worker."""
    global _encoder
    _encoder = encoder


def encode_document(document: Document) -> tuple[str, np.ndarray]:
    """(source, token ids of the text) with no BOS/EOS, exactly as the tokenizer's `tokenize`."""
    return document.source, np.asarray(_encoder.encode(document.text), dtype=np.int32)
