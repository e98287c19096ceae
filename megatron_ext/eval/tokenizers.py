"""Evaluation's names for the one tokenizer layer (megatron_ext/data/tokenizer_files.py), kept for scripts and
tests that import them from here: every command resolves and reads a tokenizer there, so the ids are the same."""

from typing import Protocol

from megatron_ext.data.tokenizer_files import (
    HuggingFaceFiles as HFEvalTokenizer,
    SentencePieceFile as SentencePieceEvalTokenizer,
    encode_continuation,
    open_encoder,
)


class EvalTokenizer(Protocol):
    """What evaluation uses of a tokenizer (every encoder of megatron_ext.data.tokenizer_files has it)."""

    bos_id: int | None  # prepended to every evaluated sequence when not None
    eos_id: int | None
    vocab_size: int  # ids are 0 .. vocab_size - 1

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added."""

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; ids beyond the vocabulary (a model's padding rows) must not fail."""


def load_eval_tokenizer(path, kind: str | None = None, *, setting: str = "--tokenizer") -> EvalTokenizer:
    """The tokenizer at `path`, resolved as every command resolves it (a sentencepiece .model, a Hugging Face
    tokenizer or model directory, a tiktoken BPE file)."""
    return open_encoder(path, kind, setting=setting)


def hf_directory_tokenizer(local_dir) -> EvalTokenizer:
    """The tokenizer of a Hugging Face model directory (the same resolution as `load_eval_tokenizer`); whatever
    transformers raises reading its files is a one-line refusal naming the directory (data/tokenizer_files.py)."""
    return open_encoder(local_dir, setting=f"the tokenizer of {local_dir}")


__all__ = ["EvalTokenizer", "HFEvalTokenizer", "SentencePieceEvalTokenizer", "encode_continuation",
           "hf_directory_tokenizer", "load_eval_tokenizer"]
