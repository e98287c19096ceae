"""Sentencepiece encoding inside `preprocess`'s worker processes.
Imports only sentencepiece and numpy: a spawned worker starts in a fraction of a second, where importing
megatron.core would cost it ~4 s."""

import numpy as np
import sentencepiece

from megatron_ext.data.documents import Document

_processor: sentencepiece.SentencePieceProcessor | None = None


def start_worker(model_path: str) -> None:
    """Pool initializer: load the tokenizer model once per worker."""
    global _processor
    _processor = sentencepiece.SentencePieceProcessor(model_file=model_path)


def encode_document(document: Document) -> tuple[str, np.ndarray]:
    """(source, token ids of the text) with no BOS/EOS, exactly as `SentencePieceTokenizer.tokenize`."""
    return document.source, np.asarray(_processor.encode(document.text), dtype=np.int32)
