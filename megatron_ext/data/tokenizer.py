"""megatron-core's tokenizer interface (for its datasets) over the encoders of megatron_ext/data/tokenizer_files.py,
where every tokenizer is resolved and read (`load_tokenizer`), and training a small sentencepiece model. Imports
megatron-core (for the base class), so `megatron_ext.data` loads this module only on first use."""

import io
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece
from megatron.core.tokenizers import MegatronTokenizerBase

from megatron_ext.data.documents import check_input_files, read_documents
from megatron_ext.data.tokenizer_files import (
    HuggingFaceFiles,
    SentencePieceFile,
    TiktokenFile,
    TokenizerFiles,
    open_encoder,
    require_eod,
)

# Llama's layout: <unk>=0, <s>=1, </s>=2, no pad piece. Byte fallback and an identity normalizer make every
# string round-trip exactly (code keeps its indentation, "ﬁ" is not folded to "fi").
_TRAINER_OPTIONS = dict(
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    byte_fallback=True,
    character_coverage=1.0,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    split_digits=True,
)


def load_tokenizer(path, kind: str | None = None, *, setting: str = "data.tokenizer") -> "TextTokenizer":
    """The tokenizer at `path`: a sentencepiece .model, a Hugging Face tokenizer directory or a tiktoken BPE file
    (Llama-3's tokenizer.model); `kind` ('sentencepiece' | 'huggingface' | 'tiktoken') names it instead of
    detecting it. Errors (a megatron_ext UserError) name `setting`, where the path came from."""
    encoder = require_eod(open_encoder(path, kind, setting=setting), setting)
    return _CLASSES[encoder.kind]._of(encoder)


class TextTokenizer(MegatronTokenizerBase):
    """One tokenizer file's encoder for megatron-core datasets and `preprocess`.

    `tokenize` adds no BOS/EOS; the end of a document (`eod`) is the EOS token, as in megatron's Llama
    tokenizers. `bos`/`pad` are -1 when the tokenizer has none (Qwen2 has no BOS; Llama no pad).
    `kind` and `model_path` (the file or directory) say what it is; it pickles as them. `encoder` is the
    tokenizer itself (megatron_ext.data.tokenizer_files), what preprocess workers and evaluation use.
    """

    kind: str

    @classmethod
    def _of(cls, encoder) -> "TextTokenizer":
        tokenizer = cls.__new__(cls)
        TextTokenizer.__init__(tokenizer, encoder)
        return tokenizer

    def __init__(self, encoder: TokenizerFiles) -> None:
        super().__init__(str(encoder.path), config={})
        self.encoder = encoder
        self.kind = encoder.kind
        self.model_path = encoder.path
        self._vocab = None

    def __reduce__(self):
        # Rebuilt from the file in DataLoader workers and spawned processes.
        return (type(self)._of, (self.encoder,))

    def tokenize(self, text: str) -> list[int]:
        return self.encoder.encode(text)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self.encoder.decode(ids)

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} tokenizes plain pretraining text; it has no chat template")

    @property
    def vocab_size(self) -> int:
        return self.encoder.vocab_size

    @property
    def vocab(self) -> dict[str, int]:
        if self._vocab is None:
            self._vocab = self.encoder.vocab()
        return self._vocab

    @property
    def inv_vocab(self) -> dict[int, str]:
        return {i: piece for piece, i in self.vocab.items()}

    @property
    def bos(self) -> int:
        return self.encoder.bos

    @property
    def eos(self) -> int:
        return self.encoder.eos

    @property
    def eod(self) -> int:
        return self.encoder.eos

    @property
    def pad(self) -> int:
        return self.encoder.pad

    @property
    def unique_identifiers(self) -> OrderedDict:
        """What megatron-core's dataset cache keys use to tell tokenizers apart."""
        return OrderedDict(class_name=type(self).__name__, tokenizer_path=str(self.model_path))


class SentencePieceTokenizer(TextTokenizer):
    """A sentencepiece `.model` (e.g. Llama-2's `tokenizer.model`)."""

    def __init__(self, model_path: str | Path) -> None:
        super().__init__(SentencePieceFile(model_path))


class HuggingFaceTokenizer(TextTokenizer):
    """A Hugging Face tokenizer directory (tokenizer.json, tokenizer_config.json: Qwen2, Mistral v0.3, Llama-3)."""

    def __init__(self, directory: str | Path) -> None:
        super().__init__(require_eod(HuggingFaceFiles(directory), f"tokenizer '{directory}'"))


class TiktokenTokenizer(TextTokenizer):
    """A tiktoken BPE file with Llama-3's special tokens after its ranks (Llama-3's original tokenizer.model)."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(TiktokenFile(path))


_CLASSES = {"sentencepiece": SentencePieceTokenizer, "huggingface": HuggingFaceTokenizer,
            "tiktoken": TiktokenTokenizer}


def train_sentencepiece(
    inputs: Iterable[str | Path] | Iterator[str],
    model_prefix: str | Path,
    vocab_size: int,
    *,
    model_type: str = "bpe",
    seed: int = 0,
    json_key: str = "text",
) -> Path:
    """Train a sentencepiece model on `inputs` and write `{model_prefix}.model`; return its path.

    `inputs` is either a list of files (read by `read_documents`: JSONL or plain text) or an iterator of
    strings. Every non-blank line of the text is one training sentence.
    Deterministic: one thread, every sentence used (no sampling), the process-wide sentencepiece seed set
    to `seed`; the same inputs give the same `.model` bytes.
    """
    model_path = Path(f"{model_prefix}.model")
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type ({model_type!r}) must be 'bpe' or 'unigram'")
    sentences = list(_training_sentences(inputs, json_key))  # read fully first: input errors surface as ours
    if not sentences:
        raise ValueError("train_sentencepiece got no text: every input is empty or blank")
    sentencepiece.set_random_generator_seed(seed)
    model_bytes = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model_bytes,
            vocab_size=vocab_size,
            model_type=model_type,
            num_threads=1,
            input_sentence_size=0,
            minloglevel=2,
            **_TRAINER_OPTIONS,
        )
    except RuntimeError as error:
        message = str(error).rstrip(".")
        hint = ": pass more text or a smaller vocab_size" if "Vocabulary size too high" in message else ""
        raise ValueError(f"sentencepiece could not train a {model_type} model: {message}{hint}") from error
    model_path.parent.mkdir(parents=True, exist_ok=True)
    model_path.write_bytes(model_bytes.getvalue())
    return model_path


def _training_sentences(inputs, json_key: str) -> Iterator[str]:
    """The non-blank lines of the input texts, in input order."""
    if isinstance(inputs, (str, Path)):
        raise TypeError("inputs must be a list of files or an iterator of strings, not a single path: wrap it in [ ]")
    if isinstance(inputs, Iterator):
        texts = inputs
    else:
        paths = check_input_files(list(inputs), setting="train_sentencepiece inputs")
        texts = (document.text for path in paths for document in read_documents(path, json_key=json_key))
    return (line for text in texts for line in text.splitlines() if line.strip())
