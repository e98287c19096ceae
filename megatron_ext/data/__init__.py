"""Data: tokenizers (sentencepiece, Hugging Face, tiktoken), a tiny offline corpus, preprocessing into megatron indexed datasets.

Importing this package must not import megatron-core: spawned preprocessing workers import it, and
megatron-core costs each ~4 s and ~300 MB. Names whose module needs megatron-core (or torch, ~1 s) load on
first use."""

from typing import TYPE_CHECKING

from megatron_ext.data.corpus import build_tiny_corpus
from megatron_ext.data.documents import Document, read_documents
from megatron_ext.data.preprocess import PreprocessResult, SourceStats, UpsampleRule, preprocess
from megatron_ext.lazy import lazy_getattr

_LOADED_ON_FIRST_USE = {
    "SentencePieceTokenizer": "megatron_ext.data.tokenizer",
    "TextTokenizer": "megatron_ext.data.tokenizer",
    "load_tokenizer": "megatron_ext.data.tokenizer",
    "train_sentencepiece": "megatron_ext.data.tokenizer",
    "MicroBatchIterator": "megatron_ext.data.dataset",
    "PoseDataset": "megatron_ext.data.dataset",
    "build_gpt_dataset": "megatron_ext.data.dataset",
    "global_sample_indices": "megatron_ext.data.dataset",
}

if TYPE_CHECKING:
    from megatron_ext.data.dataset import (
        MicroBatchIterator,
        PoseDataset,
        build_gpt_dataset,
        global_sample_indices,
    )
    from megatron_ext.data.tokenizer import SentencePieceTokenizer, TextTokenizer, load_tokenizer, train_sentencepiece

__all__ = [
    "Document",
    "MicroBatchIterator",
    "PoseDataset",
    "PreprocessResult",
    "SentencePieceTokenizer",
    "SourceStats",
    "TextTokenizer",
    "UpsampleRule",
    "build_gpt_dataset",
    "build_tiny_corpus",
    "global_sample_indices",
    "load_tokenizer",
    "preprocess",
    "read_documents",
    "train_sentencepiece",
]

__getattr__ = lazy_getattr(__name__, _LOADED_ON_FIRST_USE)
