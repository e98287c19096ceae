"""Data: the sentencepiece tokenizer, a tiny offline corpus, preprocessing into megatron indexed datasets.

Importing this package must not import megatron-core: spawned preprocessing workers import it, and
megatron-core costs each ~4 s and ~300 MB. Names whose module needs megatron-core load on first use."""

import importlib
from typing import TYPE_CHECKING

from megatron_ext.data.corpus import build_tiny_corpus
from megatron_ext.data.documents import Document, read_documents
from megatron_ext.data.preprocess import (
    PreprocessResult,
    SourceStats,
    UpsampleRule,
    add_preprocess_args,
    preprocess,
    run_preprocess,
)

_NEEDS_MEGATRON = {
    "SentencePieceTokenizer": "megatron_ext.data.tokenizer",
    "train_sentencepiece": "megatron_ext.data.tokenizer",
}

if TYPE_CHECKING:
    from megatron_ext.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

__all__ = [
    "Document",
    "PreprocessResult",
    "SentencePieceTokenizer",
    "SourceStats",
    "UpsampleRule",
    "add_preprocess_args",
    "build_tiny_corpus",
    "preprocess",
    "read_documents",
    "run_preprocess",
    "train_sentencepiece",
]


def __getattr__(name: str):
    if name not in _NEEDS_MEGATRON:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_NEEDS_MEGATRON[name]), name)
