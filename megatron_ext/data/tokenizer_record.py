"""Which tokenizer made an indexed dataset, and the check run when data is opened.

`preprocess` writes `{prefix}.tokenizer.json` next to `{prefix}.bin/.idx`: the tokenizer's path, kind, the class it
was read with, the fingerprint of its files (megatron_ext.data.tokenizer_files), its vocabulary size, EOD and BOS
ids, the ids of a probe text, and the largest id written. Training and evaluation call `check_data_tokenizer`
when they open a prefix: data made with another tokenizer is refused in one line (which prefix, which two
tokenizers, what differs, the fix), and an id beyond the tokenizer's vocabulary is refused before any step.
Data written before the sidecar existed is read with one warning and its ids checked (a memory-mapped scan:
none negative, none beyond the vocabulary). The files themselves are checked first (data/indexed_file.py).
`checkpoint_tokenizer_files` is the tokenizer a checkpoint carries in its own `tokenizer/`.
Imports no torch; megatron-core only to read a `.idx` dtype code, inside a function.
"""

import json
import logging
import os
from pathlib import Path

import numpy as np

from megatron_ext.data.indexed_file import REPREPROCESS, check_indexed_dataset, check_loss_tokens, token_dtype
from megatron_ext.data.tokenizer_files import TokenizerFiles
from megatron_ext.errors import InputError

log = logging.getLogger("megatron_ext")

SIDECAR_SUFFIX = ".tokenizer.json"
SIDECAR_FORMAT = 1
# Text whose ids tell tokenizers apart when their files differ (a re-saved tokenizer.json, Llama-3's tiktoken file
# and its Hugging Face directory): words, spaces, digits, code, other scripts.
PROBE_TEXT = ("The quick brown fox, it's 2024: 1234567 items.\n  def f(x):\n\treturn x**2  # ok\n"
              "Grüße, naïve café; Привет мир; 你好，世界; مرحبا 🌍")
_WARNED: set[str] = set()  # prefixes already warned about (once per process)
_SCANNED: dict[tuple, tuple[int, int]] = {}  # (.bin path, size, mtime) -> its (smallest, largest) id


def sidecar_path(prefix) -> Path:
    return Path(f"{prefix}{SIDECAR_SUFFIX}")


def tokenizer_record(encoder: TokenizerFiles) -> dict:
    """What identifies `encoder` (JSON-able)."""
    return dict(path=str(Path(encoder.path).absolute()), kind=encoder.kind, resolved_class=encoder.resolved_class,
                fingerprint=encoder.fingerprint(), vocab_size=encoder.vocab_size, eod=encoder.eod, bos=encoder.bos,
                probe_ids=encoder.encode(PROBE_TEXT))


def sidecar_contents(encoder: TokenizerFiles, *, max_id: int, bin_bytes: int, prepend_bos: bool | None = None,
                     append_eod: bool | None = None) -> str:
    """The sidecar of data written with `encoder` (`max_id`: its largest id, -1 if empty; `bin_bytes`: the .bin's size)."""
    record = dict(format=SIDECAR_FORMAT, tokenizer=tokenizer_record(encoder), max_id=int(max_id),
                  bin_bytes=int(bin_bytes), prepend_bos=prepend_bos, append_eod=append_eod)
    return json.dumps(record, indent=2) + "\n"


def read_sidecar(prefix) -> dict | None:
    """The sidecar of `prefix`, None if it has none; an unreadable one is refused."""
    path = sidecar_path(prefix)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        record["tokenizer"]["fingerprint"], record["tokenizer"]["vocab_size"]  # noqa: B018 (its keys must be there)
    except (ValueError, KeyError, TypeError) as error:
        raise InputError(f"'{path}' (the tokenizer record of data prefix '{prefix}') is not readable ({error!r}): "
                         "re-run `megatron-ext preprocess` to write the data and its record again") from None
    return record


# ----------------------------------------------------------------------------- the check when data is opened


def check_training_data(prefixes, tokenizer_setting: str, tokenizer_path, tokenizer_kind: str | None = None, *,
                        model_vocab_size: int | None = None, mask_eod_loss: bool = False,
                        setting: str = "data.train_data") -> None:
    """`check_data_tokenizer` for every prefix of a run, with the tokenizer its config names, and with
    `mask_eod_loss` (data.mask_eod_loss) a token the loss counts in each (what `train` runs before any process
    starts)."""
    from megatron_ext.data.tokenizer_files import open_encoder, require_eod

    encoder = require_eod(open_encoder(tokenizer_path, tokenizer_kind, setting=tokenizer_setting), tokenizer_setting)
    for prefix in prefixes:
        if Path(f"{prefix}.bin").is_file() and Path(f"{prefix}.idx").is_file():  # else the dataset names it
            check_data_tokenizer(prefix, encoder, setting=setting, model_vocab_size=model_vocab_size)
            if mask_eod_loss:
                check_loss_tokens(prefix, encoder.eod, setting=setting)


def check_data_tokenizer(prefix, tokenizer, *, setting: str = "data.train_data",
                         model_vocab_size: int | None = None) -> None:
    """Refuse data `prefix` unless it was made with `tokenizer` (an encoder of tokenizer_files, or megatron_ext's
    TextTokenizer) and all its ids are inside the tokenizer's vocabulary (and the model's, `model_vocab_size`, when
    that is smaller). `setting` names where the prefix came from. A tokenizer object that is neither (a user's own
    megatron tokenizer) gets the id check only. The two files are checked first (`check_indexed_dataset`)."""
    try:
        check_indexed_dataset(prefix)
    except InputError as error:
        raise InputError(f"{setting}: {error}") from None
    encoder = getattr(tokenizer, "encoder", tokenizer)
    record = read_sidecar(prefix)
    if isinstance(encoder, TokenizerFiles):
        if record is None:
            _warn_unrecorded(prefix, encoder)
        else:
            _check_same_tokenizer(prefix, record["tokenizer"], encoder, setting)
    min_id, max_id = _id_range(prefix, record)
    path = getattr(encoder, "path", None)
    if min_id < 0:
        raise InputError(f"{setting}: data prefix '{prefix}' holds token id {min_id}: ids are never negative, so the "
                         f"data is damaged or no tokenized text: {REPREPROCESS}")
    limit, named = tokenizer.vocab_size, f"tokenizer '{path}'" if path is not None else "the tokenizer"
    if model_vocab_size is not None and model_vocab_size < limit:
        limit, named = model_vocab_size, "the model (model.vocab_size)"
    if max_id >= limit:
        raise InputError(
            f"{setting}: data prefix '{prefix}' holds token id {max_id}, beyond the {limit} ids of {named} (ids 0 .. "
            f"{limit - 1}): the data was tokenized with another tokenizer; re-run `megatron-ext preprocess "
            f"--tokenizer {path or '<the model tokenizer>'}` on its text")


def _check_same_tokenizer(prefix, recorded: dict, encoder: TokenizerFiles, setting: str) -> None:
    if recorded["fingerprint"] == encoder.fingerprint():
        return
    differences = _differences(recorded, encoder)
    if not differences:  # other files, same ids (e.g. Llama-3's tiktoken file and its Hugging Face directory)
        if str(prefix) not in _WARNED:
            _WARNED.add(str(prefix))
            log.info(f"megatron_ext: data prefix '{prefix}' was tokenized with '{recorded['path']}'; its files differ "
                     f"from '{encoder.path}', but the vocabulary, EOD/BOS ids and the ids of a probe text agree")
        return
    raise InputError(
        f"{setting}: data prefix '{prefix}' was tokenized with {_described(recorded)}, but the model's tokenizer is "
        f"{encoder.describe()} ({'; '.join(differences)}): re-run `megatron-ext preprocess --tokenizer "
        f"{encoder.path}` on the data's text, or train/evaluate with the tokenizer the data was made with")


def _differences(recorded: dict, encoder: TokenizerFiles) -> list[str]:
    """What tells the two tokenizers apart, each as 'name: data's vs model's'."""
    pairs = [("vocabulary", recorded["vocab_size"], encoder.vocab_size), ("EOD", recorded["eod"], encoder.eod),
             ("BOS", recorded["bos"], encoder.bos)]
    differences = [f"{name} {_shown(theirs)} vs {_shown(ours)}" for name, theirs, ours in pairs if theirs != ours]
    if recorded.get("probe_ids") != encoder.encode(PROBE_TEXT):
        differences.append("other ids for the same text")
    return differences


def _shown(token_id) -> str:
    return "none" if token_id is None or token_id == -1 else str(token_id)


def _described(recorded: dict) -> str:
    how = recorded["kind"] if recorded.get("resolved_class") in (None, recorded["kind"]) else \
        f"{recorded['kind']}, {recorded['resolved_class']}"
    return (f"'{recorded['path']}' ({how}; {recorded['vocab_size']} tokens, EOD {_shown(recorded['eod'])}, "
            f"BOS {_shown(recorded['bos'])})")


def _warn_unrecorded(prefix, encoder: TokenizerFiles) -> None:
    if str(prefix) in _WARNED:
        return
    _WARNED.add(str(prefix))
    log.warning(f"megatron_ext: data prefix '{prefix}' has no {sidecar_path(prefix).name} (written before "
                f"`megatron-ext preprocess` recorded its tokenizer): only its ids are checked against "
                f"'{encoder.path}' ({encoder.vocab_size} tokens), not its EOD/BOS; re-run preprocess to record them")


def max_token_id(prefix, record: dict | None = None) -> int:
    """The largest id in `{prefix}.bin` (-1: no tokens): the sidecar's when it describes this very .bin (same size),
    else a scan of the memory-mapped file."""
    return _id_range(prefix, record)[1]


def _id_range(prefix, record: dict | None) -> tuple[int, int]:
    """(smallest, largest) id of `{prefix}.bin`; from its sidecar when that describes this very .bin (same size: ids
    preprocess wrote, none negative), else scanned."""
    size = Path(f"{prefix}.bin").stat().st_size
    if record is not None and record.get("bin_bytes") == size and record.get("max_id") is not None:
        return 0, int(record["max_id"])
    return _scanned_id_range(prefix)


def _scanned_id_range(prefix) -> tuple[int, int]:
    """(smallest, largest) id in `{prefix}.bin` ((0, -1): no tokens), scanned once a process per version of the file
    (the launcher and then the ranks' dataset open the same file)."""
    bin_path = Path(f"{prefix}.bin")
    stat = bin_path.stat()
    key = (str(bin_path.absolute()), stat.st_size, stat.st_mtime_ns)
    if key not in _SCANNED:
        tokens = np.memmap(bin_path, dtype=token_dtype(Path(f"{prefix}.idx")), mode="r") if stat.st_size else []
        _SCANNED[key] = (int(tokens.min()), int(tokens.max())) if len(tokens) else (0, -1)
    return _SCANNED[key]


# ----------------------------------------------------------------------------- writing next to the data


def write_sidecar(prefix, contents: str) -> None:
    """Write the sidecar of `prefix` under a temporary name, then rename it into place."""
    path = sidecar_path(prefix)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(contents)
    os.replace(partial, path)


# ----------------------------------------------------------------------------- the tokenizer a checkpoint carries


def checkpoint_tokenizer_files(encoder: TokenizerFiles) -> dict[str, bytes]:
    """{file name: bytes} of the tokenizer as a checkpoint carries it in its own directory: a file kind as
    tokenizer.model; a Hugging Face directory's defining files plus, when AutoTokenizer's choice of class depended
    on the directory's config.json (its model_type), a config.json holding only those keys, so the copy gives
    the same ids to megatron_ext and to AutoTokenizer alike."""
    files = {name: Path(file).read_bytes() for name, file in encoder.defining_files().items()}
    auto_config = getattr(encoder, "auto_tokenizer_config", dict)()
    if auto_config:
        files["config.json"] = (json.dumps(auto_config, indent=2) + "\n").encode()
    return files
