"""The one tokenizer resolution of megatron_ext: which kind a path is (`detect_tokenizer`) and one encoder per kind
(sentencepiece `.model`, Hugging Face tokenizer directory, tiktoken BPE file), each read by its own library.
`preprocess`, training (through data/tokenizer.py's megatron interface), evaluation and conversion all open a
tokenizer here, so the same path gives the same ids everywhere.
Imports no megatron and no torch at module level: `preprocess`'s spawned workers and the config check use it.
"""

import base64
import hashlib
import json
import re
from pathlib import Path

from megatron_ext.data.model_directory import (
    CONFIG_FILE,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILES,
    TOKENIZER_READ_FILES,
    check_present_files,
    failure_text,
    raised_in_megatron_ext,
    refuse_custom_code,
)
from megatron_ext.errors import InputError, MissingFile

KINDS = ("sentencepiece", "huggingface", "tiktoken")
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# The files of a Hugging Face tokenizer directory that decide its ids (the fingerprint hashes them; a copy takes them)
HF_DEFINING_FILES = TOKENIZER_FILES
# What transformers' AutoTokenizer reads from a model directory's config.json to pick the tokenizer class: with
# model_type "qwen2" a directory whose tokenizer_config.json says PreTrainedTokenizerFast loads as Qwen2Tokenizer,
# which rebuilds the pre-tokenizer (other ids). A copy of the tokenizer carries these keys in its own config.json.
AUTO_TOKENIZER_CONFIG_KEYS = ("model_type", "model_name", "tokenizer_class")
# Before `convert mcore-to-hf` wrote tokenizer.json it exported a sentencepiece model as tokenizer.model with a
# LlamaTokenizer config; transformers 5 rebuilds that as a Metaspace tokenizer, which drops the word-start piece of
# text that begins with a space: such a directory is read with sentencepiece, as training read it.
_SENTENCEPIECE_CONFIG_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")

# Llama-3's tiktoken layout (meta-llama's tokenizer.py): the special tokens are the 256 ids right after the
# BPE ranks, <|begin_of_text|> (BOS) first, <|end_of_text|> (end of a document) second.
LLAMA3_NUM_SPECIAL_TOKENS = 256
LLAMA3_NAMED_SPECIAL_TOKENS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
    "<|eot_id|>", "<|python_tag|>",
)
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+=*\s+\d+$")


class TokenizerError(InputError):
    """A tokenizer path or file this project cannot use: it names the path, the reason and the fix."""


def llama3_special_tokens(num_ranks: int) -> dict[str, int]:
    """Llama-3's special-token names and ids for a BPE of `num_ranks` ranks (ids num_ranks .. num_ranks+255)."""
    names = list(LLAMA3_NAMED_SPECIAL_TOKENS) + [
        f"<|reserved_special_token_{2 + i}|>" for i in range(LLAMA3_NUM_SPECIAL_TOKENS - len(LLAMA3_NAMED_SPECIAL_TOKENS))]
    return {name: num_ranks + i for i, name in enumerate(names)}


# ----------------------------------------------------------------------------- which kind


def detect_tokenizer(path, kind: str | None = None, *, setting: str = "data.tokenizer") -> tuple[str, Path]:
    """(kind, what to load: a file or a Hugging Face directory) of `path`; `kind` names it instead of guessing.

    A directory with tokenizer.json or tokenizer_config.json is huggingface (unless `kind` says otherwise), a
    directory with only tokenizer.model is what that file is; a file is sniffed: lines of `base64 rank` are a
    tiktoken BPE, a protobuf is a sentencepiece model. Errors name `setting`, where the path came from.
    """
    path = Path(path)
    if kind is not None and kind not in KINDS:
        raise TokenizerError(f"{setting}: tokenizer type {kind!r} is not one of {', '.join(KINDS)}")
    if not path.exists():
        raise MissingFile(f"{setting}: tokenizer '{path}' does not exist: pass a sentencepiece .model, a Hugging Face "
                          "tokenizer directory (tokenizer.json) or a tiktoken BPE file")
    if path.is_dir():
        return _detect_in_directory(path, kind, setting)
    if path.name in HF_TOKENIZER_FILES and kind in (None, "huggingface"):
        return "huggingface", path.parent
    found = sniff_tokenizer_file(path)
    if found is None:
        raise TokenizerError(f"{setting}: '{path}' is neither a sentencepiece model (protobuf) nor a tiktoken BPE "
                             "file (lines of 'base64 rank'): pass one of those or a Hugging Face tokenizer directory")
    if kind is not None and kind != found:
        raise TokenizerError(f"{setting}: '{path}' is a {found} file, but the tokenizer type says {kind}: "
                             f"set the type to {found} or leave it out")
    return found, path


def _detect_in_directory(directory: Path, kind: str | None, setting: str) -> tuple[str, Path]:
    has_hf = any((directory / name).is_file() for name in HF_TOKENIZER_FILES)
    model = directory / "tokenizer.model"
    if kind is None and _is_bare_sentencepiece_export(directory):
        return detect_tokenizer(model, setting=setting)
    if has_hf and kind in (None, "huggingface"):
        return "huggingface", directory
    if model.is_file() and kind != "huggingface":
        return detect_tokenizer(model, kind, setting=setting)
    wanted = "tokenizer.json or tokenizer_config.json" if kind == "huggingface" else \
        "tokenizer.json, tokenizer_config.json or tokenizer.model"
    raise TokenizerError(f"{setting}: tokenizer directory '{directory}' has no {wanted}: pass the directory a "
                         "model's tokenizer files are in, or the tokenizer file itself")


def _is_bare_sentencepiece_export(directory: Path) -> bool:
    if not (directory / "tokenizer.model").is_file() or (directory / "tokenizer.json").is_file():
        return False
    config = _json_or_empty(directory / "tokenizer_config.json")
    return config.get("tokenizer_class") in _SENTENCEPIECE_CONFIG_CLASSES


def _json_or_empty(path: Path) -> dict:
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def sniff_tokenizer_file(path: Path) -> str | None:
    """'tiktoken' | 'sentencepiece' | None (neither), from the first bytes of the file."""
    with open(path, "rb") as file:
        head = file.read(4096)
    lines = head.split(b"\n")[:-1] if len(head) == 4096 else head.split(b"\n")  # the last may be cut short
    lines = [line.strip() for line in lines if line.strip()]
    if lines and all(_TIKTOKEN_LINE.match(line) for line in lines):
        return "tiktoken"
    if head[:1] == b"\x0a":  # ModelProto field 1 (the pieces), length-delimited: a sentencepiece model
        return "sentencepiece"
    return None


# ----------------------------------------------------------------------------- one encoder per kind


class TokenizerFiles:
    """What every encoder offers, whoever uses it (preprocess, training's megatron interface, evaluation):
    encode(text) -> ids (no BOS/EOS added), decode(ids), vocab_size, bos/eos/pad (-1: none) and bos_id/eos_id
    (None: none), `path`, `kind`, `resolved_class` (how it was read) and `fingerprint()` (of the files that decide
    its ids). It pickles as its file path, so a worker process rebuilds it."""

    kind: str
    path: Path
    vocab_size: int
    bos: int
    eos: int
    pad: int

    @property
    def bos_id(self) -> int | None:
        return self.bos if self.bos >= 0 else None

    @property
    def eos_id(self) -> int | None:
        return self.eos if self.eos >= 0 else None

    @property
    def eod(self) -> int:
        """The end of a document: the EOS token, as in megatron's Llama tokenizers."""
        return self.eos

    @property
    def resolved_class(self) -> str:
        return self.kind

    def decode(self, ids) -> str:
        """Text of `ids`; ids beyond the vocabulary (a model's padding rows) are left out."""
        return self._decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

    def _decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def defining_files(self) -> dict[str, Path]:
        """{name: file} of the files that decide the ids (a file kind: the file itself, as tokenizer.model)."""
        return {"tokenizer.model": self.path}

    def fingerprint(self) -> str:
        """sha256 over the kind, how it was read and the bytes of its defining files (not their paths): a copy
        of the files has the fingerprint of the original."""
        if getattr(self, "_fingerprint", None) is None:
            digest = hashlib.sha256(f"{self.kind}\n{self.resolved_class}\n".encode())
            for name, file in sorted(self.defining_files().items()):
                digest.update(f"{name}\n{hashlib.sha256(file.read_bytes()).hexdigest()}\n".encode())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def describe(self) -> str:
        """One phrase for messages: path, kind, vocabulary and special ids."""
        bos = self.bos if self.bos >= 0 else "none"
        how = f"{self.kind}, {self.resolved_class}" if self.resolved_class != self.kind else self.kind
        return f"'{self.path}' ({how}; {self.vocab_size} tokens, EOD {self.eos}, BOS {bos})"


class SentencePieceFile(TokenizerFiles):
    kind = "sentencepiece"

    def __init__(self, path) -> None:
        import sentencepiece

        self.path = Path(path)
        if not self.path.is_file():
            raise MissingFile(
                f"tokenizer model '{self.path}' does not exist: pass the path of a sentencepiece .model file "
                "(e.g. Llama's tokenizer.model, or one made by train_sentencepiece)")
        try:
            self.processor = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as error:
            raise TokenizerError(f"tokenizer model '{self.path}' is not a sentencepiece model: {error}") from error
        if self.processor.eos_id() < 0:
            raise TokenizerError(f"tokenizer model '{self.path}' has no EOS piece, which marks document ends (eod): "
                                 "train it with an eos_id")
        self.vocab_size = self.processor.get_piece_size()
        self.bos, self.eos, self.pad = self.processor.bos_id(), self.processor.eos_id(), self.processor.pad_id()

    def __reduce__(self):
        return (type(self), (self.path,))

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text)

    def _decode(self, ids: list[int]) -> str:
        return self.processor.decode(ids)

    def vocab(self) -> dict[str, int]:
        return {self.processor.id_to_piece(i): i for i in range(self.vocab_size)}


class HuggingFaceFiles(TokenizerFiles):
    """A Hugging Face tokenizer directory, loaded by transformers' AutoTokenizer as that directory gives it (its
    config.json's model_type included: it picks the tokenizer class); ids are AutoTokenizer's with
    add_special_tokens=False. Workers rebuild it from the fast tokenizer's JSON (no transformers, no torch)."""

    kind = "huggingface"

    def __init__(self, path, *, _backend_json: str | None = None, _ids: tuple | None = None) -> None:
        self.path = Path(path)
        if _backend_json is not None:  # in a worker: the very backend the parent loaded
            from tokenizers import Tokenizer

            self._backend, self._auto = Tokenizer.from_str(_backend_json), None
            self.vocab_size, self.bos, self.eos, self.pad, self._class = _ids
            return
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise TokenizerError(f"tokenizer directory '{self.path}' is a Hugging Face tokenizer: reading it needs "
                                 "transformers (pip install 'transformers>=5')") from None
        check_tokenizer_directory(self.path)
        try:
            self._auto = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True, trust_remote_code=False)
            self._backend = getattr(self._auto, "backend_tokenizer", None)
            self._class = type(self._auto).__name__
            self.vocab_size = len(self._auto)
            ids = self._auto.bos_token_id, self._auto.eos_token_id, self._auto.pad_token_id
        except MemoryError:
            raise
        except Exception as error:  # noqa: BLE001 - transformers only parses the directory's files here, so what it
            # raises (a list where an object belongs: AttributeError; a config.json field of the wrong type:
            # huggingface_hub's StrictDataclass*Error) is about them and named in one line; an exception raised in
            # megatron_ext's own code is a bug of ours and keeps its traceback
            if raised_in_megatron_ext(error):
                raise
            raise self.unreadable(error) from None
        self.bos, self.eos, self.pad = (self._token_id(name, value) for name, value in zip(("bos", "eos", "pad"), ids))

    def unreadable(self, error: BaseException) -> "TokenizerError":
        """The one-line refusal of this directory when transformers fails to read it."""
        return TokenizerError(f"tokenizer directory '{self.path}' does not load in transformers "
                              f"({failure_text(error)}): fix the file it names, or pass a directory that "
                              "transformers' AutoTokenizer loads")

    def _token_id(self, name: str, token_id) -> int:
        """A special token's id as transformers gives it (-1: none); anything but one id is the files' fault."""
        if token_id is None:
            return -1
        if isinstance(token_id, int) and not isinstance(token_id, bool) and token_id >= 0:
            return token_id
        raise self.unreadable(TypeError(f"its {name}_token has id {str(token_id)[:80]}, not one token id"))

    def __reduce__(self):
        if self._backend is None:
            return (type(self), (self.path,))
        return (_rebuilt_hf, (self.path, self._backend.to_str(),
                              (self.vocab_size, self.bos, self.eos, self.pad, self._class)))

    @property
    def resolved_class(self) -> str:
        return self._class

    def encode(self, text: str) -> list[int]:
        if self._backend is not None:
            return self._backend.encode(text, add_special_tokens=False).ids
        return self._auto.encode(text, add_special_tokens=False)

    def _decode(self, ids: list[int]) -> str:
        if self._auto is None:
            return self._backend.decode(ids, skip_special_tokens=False)
        return self._auto.decode(ids)

    def vocab(self) -> dict[str, int]:
        return self._auto.get_vocab() if self._auto is not None else self._backend.get_vocab()

    def defining_files(self) -> dict[str, Path]:
        return {name: self.path / name for name in HF_DEFINING_FILES if (self.path / name).is_file()}

    def auto_tokenizer_config(self) -> dict:
        """The keys of the directory's config.json that AutoTokenizer reads to pick the class (empty: none)."""
        config = _json_or_empty(self.path / "config.json")
        return {key: config[key] for key in AUTO_TOKENIZER_CONFIG_KEYS if config.get(key) is not None}


def check_tokenizer_directory(directory: Path) -> None:
    """What a Hugging Face tokenizer directory must be before transformers reads it (megatron_ext/data/
    model_directory.py, the rules every reader of such a directory applies): the files AutoTokenizer reads (config.json
    included) are regular files inside it, a hub cache's snapshot -> blob links excepted, and nothing asks for the
    directory's own Python (an auto_map for a tokenizer: megatron_ext never runs it, trust_remote_code is off)."""
    check_present_files(directory, TOKENIZER_READ_FILES, error=TokenizerError, what="tokenizer directory")
    refuse_custom_code(directory, {TOKENIZER_CONFIG_FILE: None, CONFIG_FILE: "AutoTokenizer"}, error=TokenizerError)


def _rebuilt_hf(path, backend_json: str, ids: tuple) -> HuggingFaceFiles:
    return HuggingFaceFiles(path, _backend_json=backend_json, _ids=ids)


class TiktokenFile(TokenizerFiles):
    """A tiktoken BPE file (Llama-3's tokenizer.model: lines of `base64(token bytes) rank`) read by tiktoken,
    with Llama-3's pre-tokenizer pattern and special tokens (`llama3_special_tokens`): BOS <|begin_of_text|>,
    end of document <|end_of_text|>. The file must hold the ranks 0 .. n-1 exactly, else where the special
    tokens sit cannot be told and it is refused."""

    kind = "tiktoken"

    def __init__(self, path) -> None:
        import tiktoken

        self.path = Path(path)
        ranks = read_tiktoken_ranks(self.path)
        self.special_tokens = llama3_special_tokens(len(ranks))
        self.encoding = tiktoken.Encoding(name=self.path.stem, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                          special_tokens=self.special_tokens)
        self.vocab_size = len(ranks) + LLAMA3_NUM_SPECIAL_TOKENS
        self.bos = self.special_tokens["<|begin_of_text|>"]
        self.eos = self.special_tokens["<|end_of_text|>"]
        self.pad = -1
        self._ranks = ranks

    def __reduce__(self):
        return (type(self), (self.path,))

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)  # special-token names in a document are plain text

    def _decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)

    def vocab(self) -> dict[str, int]:
        tokens = {token.decode("utf-8", errors="replace"): rank for token, rank in self._ranks.items()}
        return {**tokens, **self.special_tokens}


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """{token bytes: rank} of a tiktoken BPE file, refused unless its ranks are exactly 0 .. n-1."""
    ranks = {}
    for number, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise TokenizerError(f"tiktoken file '{path}' line {number} is not 'base64 rank': is it a tiktoken "
                                 "BPE file?") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(
            f"tiktoken file '{path}': its {len(ranks)} ranks are not exactly 0 .. {len(ranks) - 1}, so where its "
            f"special tokens (BOS, end of document) sit cannot be told; megatron_ext places Llama-3's "
            f"{LLAMA3_NUM_SPECIAL_TOKENS} special tokens right after the ranks: pass a file with contiguous ranks, "
            "or the model's Hugging Face tokenizer directory (tokenizer.json)")
    return ranks


ENCODERS = {"sentencepiece": SentencePieceFile, "huggingface": HuggingFaceFiles, "tiktoken": TiktokenFile}


def open_encoder(path, kind: str | None = None, *, setting: str = "data.tokenizer") -> TokenizerFiles:
    """The encoder of the tokenizer at `path` (kind detected unless named): the one way every command opens one."""
    kind, where = detect_tokenizer(path, kind, setting=setting)
    return ENCODERS[kind](where)


def require_eod(encoder: TokenizerFiles, setting: str) -> TokenizerFiles:
    """Training data needs an end-of-document token: a tokenizer without EOS is refused by name."""
    if encoder.eos < 0:
        raise TokenizerError(f"{setting}: tokenizer '{encoder.path}' names no eos_token, which marks document ends "
                             "(eod): set eos_token in its tokenizer_config.json")
    return encoder


# ----------------------------------------------------------------------------- tokens in running text

_ANCHOR = "x"  # a one-token word that text with a leading separator can follow without merging


def encode_continuation(tokenizer: TokenizerFiles, text: str) -> list[int]:
    """Ids of `text` as it tokenizes after other text (`text` starts with its separator, e.g. " The" or "\\n").

    sentencepiece prefixes a fresh string with a word-start marker and BPE tokenizers do not; encoding
    "x" + text and dropping the ids of "x" gives the in-context form for both.
    """
    anchor = tokenizer.encode(_ANCHOR)
    joined = tokenizer.encode(_ANCHOR + text)
    if joined[: len(anchor)] == anchor:
        return joined[len(anchor):]
    return tokenizer.encode(text)  # the anchor merged with the text: fall back to a plain encoding
