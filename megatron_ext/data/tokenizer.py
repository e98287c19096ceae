"""A sentencepiece tokenizer behind megatron-core's tokenizer interface, and training a small one.
Imports megatron-core (for the base class), so `megatron_ext.data` loads this module only on first use."""

import io
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece
from megatron.core.tokenizers import MegatronTokenizerBase

from megatron_ext.data.documents import check_input_files, read_documents
from megatron_ext.errors import InputError, MissingFile

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


class SentencePieceTokenizer(MegatronTokenizerBase):
    """Wraps a sentencepiece `.model` (e.g. Llama's `tokenizer.model`) for megatron-core datasets.

    `tokenize` adds no BOS/EOS; the end of a document (`eod`) is the EOS piece, as in megatron's
    Llama tokenizers. `pad` is sentencepiece's pad id, -1 when the model has none (Llama).
    """

    def __init__(self, model_path: str | Path) -> None:
        model_path = Path(model_path)
        if not model_path.is_file():
            raise MissingFile(
                f"tokenizer model '{model_path}' does not exist: pass the path of a sentencepiece .model file "
                "(e.g. Llama's tokenizer.model, or one made by train_sentencepiece)"
            )
        try:
            processor = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
        except (OSError, RuntimeError) as error:
            raise InputError(f"tokenizer model '{model_path}' is not a sentencepiece model: {error}") from error
        if processor.eos_id() < 0:
            raise InputError(
                f"tokenizer model '{model_path}' has no EOS piece, which marks document ends (eod): "
                "train it with an eos_id"
            )
        super().__init__(str(model_path), config={})
        self.model_path = model_path
        self._processor = processor
        self._vocab = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}
        self._inv_vocab = {i: piece for piece, i in self._vocab.items()}

    def __reduce__(self):
        # Rebuilt from the file in DataLoader workers and spawned processes.
        return (type(self), (self.model_path,))

    def tokenize(self, text: str) -> list[int]:
        return self._processor.encode(text)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._processor.decode([int(i) for i in ids])

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("SentencePieceTokenizer tokenizes plain pretraining text; it has no chat template")

    @property
    def vocab_size(self) -> int:
        return self._processor.get_piece_size()

    @property
    def vocab(self) -> dict[str, int]:
        return self._vocab

    @property
    def inv_vocab(self) -> dict[int, str]:
        return self._inv_vocab

    @property
    def bos(self) -> int:
        return self._processor.bos_id()

    @property
    def eos(self) -> int:
        return self._processor.eos_id()

    @property
    def eod(self) -> int:
        return self._processor.eos_id()

    @property
    def pad(self) -> int:
        return self._processor.pad_id()

    @property
    def unique_identifiers(self) -> OrderedDict:
        """What megatron-core's dataset cache keys use to tell tokenizers apart."""
        return OrderedDict(class_name=type(self).__name__, tokenizer_path=str(self.model_path))


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
