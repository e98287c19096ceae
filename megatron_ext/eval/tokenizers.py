"""One text <-> token-id interface over every tokenizer kind a checkpoint records (sentencepiece, a Hugging Face
tokenizer directory, a tiktoken BPE file) and Hugging Face model directories.

Prompts are assembled in token space from separately encoded pieces, so lengths and needle
positions are exact; `encode_continuation` makes a piece tokenize as it would inside running text.
No torch, no megatron.
"""

import json
from pathlib import Path
from typing import Protocol

_ANCHOR = "x"  # a one-token word that text with a leading separator can follow without merging


class EvalTokenizer(Protocol):
    bos_id: int | None  # prepended to every evaluated sequence when not None
    eos_id: int | None
    vocab_size: int  # ids are 0 .. vocab_size - 1

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added."""

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; ids beyond the vocabulary (a model's padding rows) must not fail."""


def encode_continuation(tokenizer: EvalTokenizer, text: str) -> list[int]:
    """Ids of `text` as it tokenizes after other text (`text` starts with its separator, e.g. " The" or "\\n").

    sentencepiece prefixes a fresh string with a word-start marker and BPE tokenizers do not; encoding
    "x" + text and dropping the ids of "x" gives the in-context form for both.
    """
    anchor = tokenizer.encode(_ANCHOR)
    joined = tokenizer.encode(_ANCHOR + text)
    if joined[: len(anchor)] == anchor:
        return joined[len(anchor):]
    return tokenizer.encode(text)  # the anchor merged with the text: fall back to a plain encoding


class SentencePieceEvalTokenizer:
    """megatron_ext's SentencePieceTokenizer (a checkpoint's tokenizer.model) behind EvalTokenizer."""

    def __init__(self, model_path):
        from megatron_ext.data.tokenizer import SentencePieceTokenizer

        self._tokenizer = SentencePieceTokenizer(model_path)
        self.bos_id = self._tokenizer.bos if self._tokenizer.bos >= 0 else None
        self.eos_id = self._tokenizer.eos
        self.vocab_size = self._tokenizer.vocab_size

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.tokenize(text)

    def decode(self, ids) -> str:
        # ids of a model's padded vocabulary rows are no pieces: they read as <unk> (id 0 in Llama's layout and ours)
        return self._tokenizer.detokenize([i if 0 <= i < self.vocab_size else 0 for i in ids])


class TiktokenEvalTokenizer:
    """A tiktoken BPE file (megatron_ext.data.tokenizer_files.TiktokenFile, Llama-3's layout) behind EvalTokenizer."""

    def __init__(self, encoder):
        self._encoder = encoder
        self.bos_id = encoder.bos
        self.eos_id = encoder.eos
        self.vocab_size = encoder.vocab_size

    def encode(self, text: str) -> list[int]:
        return self._encoder.encode(text)

    def decode(self, ids) -> str:
        return self._encoder.decode([int(i) for i in ids if 0 <= i < self.vocab_size])


def load_eval_tokenizer(path, kind: str | None = None, *, setting: str = "--tokenizer") -> EvalTokenizer:
    """The tokenizer at `path`, of any kind training reads (megatron_ext.data.tokenizer_files.detect_tokenizer):
    a sentencepiece .model, a Hugging Face tokenizer directory, a tiktoken BPE file."""
    from megatron_ext.data.tokenizer_files import TiktokenFile, detect_tokenizer

    kind, where = detect_tokenizer(path, kind, setting=setting)
    if kind == "sentencepiece":
        return SentencePieceEvalTokenizer(where)
    if kind == "tiktoken":
        return TiktokenEvalTokenizer(TiktokenFile(where))
    return HFEvalTokenizer(where)


def hf_directory_tokenizer(local_dir) -> EvalTokenizer:
    """The tokenizer of a Hugging Face model directory.

    A bare sentencepiece model (tokenizer.model, a LlamaTokenizer config, no tokenizer.json: how `megatron-ext
    convert mcore-to-hf` exported a run's tokenizer before it wrote tokenizer.json) is read with sentencepiece, as
    training read it; transformers 5 rebuilds it as a Metaspace tokenizer, which drops the word-start piece of
    text that begins with a space.
    """
    local_dir = Path(local_dir)
    config_file = local_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if ((local_dir / "tokenizer.model").is_file() and not (local_dir / "tokenizer.json").is_file()
            and config.get("tokenizer_class") in ("LlamaTokenizer", "LlamaTokenizerFast")):
        return SentencePieceEvalTokenizer(local_dir / "tokenizer.model")
    return HFEvalTokenizer(local_dir)


class HFEvalTokenizer:
    """A Hugging Face tokenizer from a local directory behind EvalTokenizer."""

    def __init__(self, local_dir):
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(str(local_dir), local_files_only=True,
                                                        trust_remote_code=False)
        self.bos_id = self._tokenizer.bos_token_id
        self.eos_id = self._tokenizer.eos_token_id
        self.vocab_size = len(self._tokenizer)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in ids if 0 <= i < self.vocab_size])
