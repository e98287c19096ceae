"""Reading documents from JSONL or plain-text files and from local Hugging Face datasets (a `save_to_disk`
directory, `.arrow` or `.parquet` files), streamed, with errors that name the file and the line or row.
Standard library at import (pyarrow is imported when an Arrow/Parquet input is read): spawned worker
processes and the tokenizer trainer import it cheaply."""

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from megatron_ext.errors import InputError, MissingFile

JSONL_SUFFIXES = (".jsonl", ".json")
ARROW_SUFFIX, PARQUET_SUFFIX = ".arrow", ".parquet"
HF_DATASET_STATE = "state.json"  # what `datasets.Dataset.save_to_disk` writes beside its .arrow shards
HF_DATASET_DICT = "dataset_dict.json"  # a DatasetDict: one directory per split
ROWS_PER_BATCH = 1024  # rows read at a time from Arrow/Parquet: memory stays at a batch, whatever the set's size


@dataclass(frozen=True)
class Document:
    text: str
    source: str


def check_input_files(paths: Sequence[str | Path], setting: str) -> list[Path]:
    """The paths as `Path`s; a missing one, or a directory that is no saved dataset, is an error naming `setting`."""
    if not paths:
        raise InputError(f"{setting} is empty: pass at least one JSONL or text file")
    checked = [Path(path) for path in paths]
    for path in checked:
        if (path / HF_DATASET_DICT).is_file():
            splits = sorted(p.name for p in path.iterdir() if (p / HF_DATASET_STATE).is_file())
            raise InputError(f"input '{path}' is a Hugging Face DatasetDict: pass one split's directory to {setting}, "
                             f"e.g. {path / ('train' if 'train' in splits or not splits else splits[0])} (splits: {splits})")
        if not (path.is_file() or (path / HF_DATASET_STATE).is_file()):
            what = "is a directory without a saved dataset" if path.is_dir() else "does not exist"
            raise MissingFile(f"input file '{path}' {what}: pass existing JSONL, text, .arrow or .parquet files, or a "
                              f"`save_to_disk` dataset directory, to {setting}")
    return checked


def read_documents(path: str | Path, *, json_key: str = "text", source_key: str = "source") -> Iterator[Document]:
    """The documents of one input, in its order.

    JSONL (`.jsonl`/`.json`, one object per line, blank lines skipped): the text is the `json_key` field,
    the source the `source_key` field, or the file's stem when a record has none. A Hugging Face dataset
    (a `save_to_disk` directory, `.arrow`, `.parquet`): the same two columns, read ROWS_PER_BATCH rows at a
    time. Any other file is plain text and one document whose source is the file's stem.
    """
    path = Path(path)
    if path.is_dir() or path.suffix in (ARROW_SUFFIX, PARQUET_SUFFIX):
        yield from _read_table(path, json_key, source_key)
        return
    try:
        if path.suffix not in JSONL_SUFFIXES:
            yield Document(text=path.read_text(encoding="utf-8"), source=path.stem)
            return
        with path.open(encoding="utf-8") as lines:
            for line_number, line in enumerate(lines, start=1):
                if line.strip():
                    yield _parse_record(line, f"{path} line {line_number}", json_key, source_key, path.stem)
    except UnicodeDecodeError:
        raise InputError(f"{_first_undecodable(path)} is not UTF-8 text: re-encode the file as UTF-8 "
                         "(e.g. iconv -f <its encoding> -t UTF-8) or fix that line") from None


def _first_undecodable(path: Path) -> str:
    """Where `path` first fails to decode as UTF-8: 'FILE line N' (lines as the JSONL reader counts them) and
    the byte offset in the file. Read again on error only, so valid files are read once."""
    offset = 0
    with path.open("rb") as raw_lines:
        for line_number, raw_line in enumerate(raw_lines, start=1):
            try:
                raw_line.decode("utf-8")
            except UnicodeDecodeError as error:
                return f"{path} line {line_number} (byte {offset + error.start})"
            offset += len(raw_line)
    return f"{path}"  # only reached if the file changed while being read


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


def _read_table(path: Path, text_key: str, source_key: str) -> Iterator[Document]:
    """Rows of a saved dataset directory (its shards in order), an Arrow file or a Parquet file."""
    if path.is_dir():
        shards = [path / shard["filename"] for shard in json.loads((path / HF_DATASET_STATE).read_text())["_data_files"]]
    else:
        shards = [path]
    row = 0
    for shard in shards:
        for batch in _record_batches(shard):
            names = batch.schema.names
            if text_key not in names:
                raise InputError(f"{shard}: no '{text_key}' column (columns: {names}); set --text-key to the text column")
            texts = batch.column(text_key).to_pylist()
            sources = batch.column(source_key).to_pylist() if source_key in names else [path.stem] * len(texts)
            for text, source in zip(texts, sources):
                if not isinstance(text, str):
                    raise InputError(f"{shard} row {row}: '{text_key}' is {type(text).__name__}, not a string")
                yield Document(text=text, source=source if isinstance(source, str) else path.stem)
                row += 1


def _record_batches(shard: Path):
    """The shard's record batches, ROWS_PER_BATCH rows each, never the whole table in memory."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"{shard}: reading Arrow/Parquet needs pyarrow: pip install pyarrow") from None
    if shard.suffix == PARQUET_SUFFIX:
        yield from pq.ParquetFile(shard).iter_batches(batch_size=ROWS_PER_BATCH)
        return
    with pa.memory_map(str(shard)) as source:  # `datasets` writes the Arrow IPC stream format; others the file format
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            source.seek(0)
            reader = pa.ipc.open_file(source)
            for index in range(reader.num_record_batches):
                yield from _split(reader.get_batch(index))
            return
        for batch in reader:
            yield from _split(batch)


def _split(batch):
    for start in range(0, batch.num_rows, ROWS_PER_BATCH):
        yield batch.slice(start, ROWS_PER_BATCH)
