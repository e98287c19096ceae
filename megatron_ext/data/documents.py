"""Reading documents from JSONL or plain-text files, with errors that name the file and line.
Standard library only: spawned worker processes and the tokenizer trainer import it cheaply."""

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from megatron_ext.errors import InputError, MissingFile

JSONL_SUFFIXES = (".jsonl", ".json")


@dataclass(frozen=True)
class Document:
    text: str
    source: str


def check_input_files(paths: Sequence[str | Path], setting: str) -> list[Path]:
    """The paths as `Path`s; a missing one (or a directory) is an error naming `setting`."""
    if not paths:
        raise InputError(f"{setting} is empty: pass at least one JSONL or text file")
    checked = [Path(path) for path in paths]
    for path in checked:
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "does not exist"
            raise MissingFile(f"input file '{path}' {what}: pass existing JSONL or text files to {setting}")
    return checked


def read_documents(path: str | Path, *, json_key: str = "text", source_key: str = "source") -> Iterator[Document]:
    """The documents of one file, in file order.

    JSONL (`.jsonl`/`.json`, one object per line, blank lines skipped): the text is the `json_key` field,
    the source the `source_key` field, or the file's stem when a record has none. Any other file is plain
    text and one document whose source is the file's stem.
    """
    path = Path(path)
    if path.suffix not in JSONL_SUFFIXES:
        yield Document(text=path.read_text(encoding="utf-8"), source=path.stem)
        return
    with path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if line.strip():
                yield _parse_record(line, f"{path} line {line_number}", json_key, source_key, path.stem)


def _parse_record(line: str, where: str, json_key: str, source_key: str, default_source: str) -> Document:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise InputError(f"{where}: not valid JSON ({error}); each line of a JSONL file must be one object") from None
    if not isinstance(record, dict):
        raise InputError(f"{where}: a JSON {type(record).__name__}, not an object; each line must be one object")
    if json_key not in record:
        raise InputError(
            f"{where}: no '{json_key}' key (keys: {sorted(record)}); set json_key (--json-key) to the text field"
        )
    text, source = record[json_key], record.get(source_key, default_source)
    if not isinstance(text, str):
        raise InputError(f"{where}: '{json_key}' is a {type(text).__name__}, not a string")
    if not isinstance(source, str):
        raise InputError(f"{where}: '{source_key}' is a {type(source).__name__}, not a string")
    return Document(text=text, source=source)
