"""Text (JSONL or plain) → megatron-core indexed dataset (`.bin`/`.idx`): tokenized by worker processes, with
per-source length upsampling for long-context mixes.
megatron-core is imported inside the functions that write, not at module level: spawned workers import this
package, and megatron-core would cost each of them ~4 s and ~300 MB."""

import contextlib
import multiprocessing
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from megatron_ext.data.documents import Document, check_input_files, read_documents
from megatron_ext.data.encode_worker import encode_document, start_worker
from megatron_ext.errors import InputError, MissingFile

if TYPE_CHECKING:
    from megatron_ext.data.tokenizer import TextTokenizer

DEFAULT_WORKERS = 2
_POOL_BLOCK = 1024  # documents handed to the pool at a time, so a large input is never all in memory
_POOL_CHUNKSIZE = 16


@dataclass(frozen=True)
class UpsampleRule:
    """A document of the rule's source with at least `min_tokens` tokens is written `factor` times.

    Tokens are counted on the text alone (no BOS or EOD). The copies are consecutive documents of the
    output; megatron's GPTDataset shuffles documents, so they do not end up side by side in training.
    """

    min_tokens: int
    factor: int


@dataclass
class SourceStats:
    documents: int = 0  # in the input
    upsampled: int = 0  # of them, written more than once by the source's upsample rule
    tokens: int = 0  # of the input texts, no BOS/EOD
    documents_out: int = 0  # written, copies included
    tokens_out: int = 0  # written, copies, BOS and EOD included


@dataclass
class PreprocessResult:
    bin_path: Path
    idx_path: Path
    sources: dict[str, SourceStats] = field(default_factory=dict)

    def table(self) -> str:
        """Per-source documents and tokens, before and after upsampling, as a text table."""
        names = [column.name for column in fields(SourceStats)]
        total = SourceStats(**{name: sum(getattr(stats, name) for stats in self.sources.values()) for name in names})
        header = ["source", *(name.replace("_", " ") for name in names)]
        body = [[source, *(f"{getattr(stats, name):,}" for name in names)]
                for source, stats in sorted(self.sources.items())]
        footer = ["total", *(f"{getattr(total, name):,}" for name in names)]
        widths = [max(len(row[column]) for row in [header, *body, footer]) for column in range(len(header))]

        def line(row: list[str]) -> str:
            cells = [row[0].ljust(widths[0]), *(cell.rjust(width) for cell, width in zip(row[1:], widths[1:]))]
            return "  ".join(cells)

        rule = "-" * len(line(header))
        note = "tokens: of the texts alone; tokens out: as written (copies, BOS and EOD included)"
        return "\n".join([line(header), rule, *map(line, body), rule, line(footer), note])


def preprocess(
    inputs: Sequence[str | Path],
    output_prefix: str | Path,
    tokenizer: "TextTokenizer",
    *,
    workers: int = DEFAULT_WORKERS,
    json_key: str = "text",
    source_key: str = "source",
    append_eod: bool = True,
    prepend_bos: bool = False,
    upsample: Mapping[str, UpsampleRule | Mapping[str, int]] | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> PreprocessResult:
    """Tokenize every document of `inputs` (see `read_documents`) into `{output_prefix}.bin/.idx`, and record the
    tokenizer in `{output_prefix}.tokenizer.json` (megatron_ext.data.tokenizer_record), which training and
    evaluation check against the model's tokenizer.

    Each document becomes one megatron document: [BOS if prepend_bos] + tokens + [EOD if append_eod]. The
    output order is the input order whatever `workers` is (1: tokenize in this process; more: a spawn
    pool). `upsample` maps a source to an `UpsampleRule` (or `{"min_tokens": .., "factor": ..}`).
    Every input is checked (files, JSON, keys, rule names) before anything is tokenized; the outputs
    appear only once complete. An existing `{output_prefix}.bin`/`.idx` is replaced only with `overwrite=True`. Scripts calling it with workers > 1 need `if __name__ == "__main__":` (spawn).
    """
    paths = check_input_files(inputs, setting="inputs (--input)")
    bin_path, idx_path = _output_paths(output_prefix)
    if not overwrite:
        _check_not_written(bin_path, idx_path, output_prefix)
    rules = _checked_rules(upsample)
    if not isinstance(workers, int) or workers < 1:
        raise InputError(f"workers ({workers!r}) must be an integer >= 1: set --workers to 1 or more")
    if prepend_bos and tokenizer.bos < 0:
        raise InputError(f"prepend_bos is set but tokenizer '{tokenizer.model_path}' has no BOS piece")
    documents_per_source = _count_documents(paths, json_key, source_key)
    _check_rules_name_sources(rules, documents_per_source)

    result = PreprocessResult(bin_path, idx_path, {source: SourceStats() for source in documents_per_source})
    documents = _documents(paths, json_key, source_key)
    bos_ids = np.array([tokenizer.bos] if prepend_bos else [], dtype=np.int64)
    eod_ids = np.array([tokenizer.eod] if append_eod else [], dtype=np.int64)
    total = sum(documents_per_source.values())
    with _encoded(documents, tokenizer, workers) as encoded, tqdm(
        total=total, unit="doc", desc="preprocess", disable=not progress
    ) as bar:
        output = _output_documents(encoded, rules, bos_ids, eod_ids, result.sources, bar)
        _write_atomically(output, bin_path, idx_path, tokenizer.vocab_size, tokenizer.encoder,
                          prepend_bos=prepend_bos, append_eod=append_eod)
    return result


def _documents(paths: list[Path], json_key: str, source_key: str) -> Iterator[Document]:
    for path in paths:
        yield from read_documents(path, json_key=json_key, source_key=source_key)


def _output_documents(encoded, rules, bos_ids, eod_ids, stats, bar) -> Iterator[np.ndarray]:
    """Each document as written: [BOS] + text + [EOD], repeated when its source's upsample rule says so."""
    for source, text_ids in encoded:
        document_ids = np.concatenate([bos_ids, text_ids, eod_ids])
        copies = _copies(rules.get(source), len(text_ids))
        yield from [document_ids] * copies
        _count(stats[source], len(text_ids), len(document_ids), copies)
        bar.update()


def _write_atomically(documents: Iterable[np.ndarray], bin_path: Path, idx_path: Path, vocab_size: int,
                      tokenizer=None, **settings) -> None:
    """Write `.partial` files, then rename them: an interrupted run leaves no dataset that looks complete.

    `tokenizer` (an encoder of megatron_ext.data.tokenizer_files): the sidecar `{prefix}.tokenizer.json` records it
    (and `settings`, e.g. prepend_bos); it is written last, and an older one is removed before the data files are
    replaced, so a sidecar never describes other data (without `tokenizer` the dataset has none)."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from megatron_ext.data.tokenizer_record import sidecar_contents, sidecar_path, write_sidecar

    prefix = str(bin_path)[: -len(".bin")]
    partial_bin, partial_idx = Path(f"{bin_path}.partial"), Path(f"{idx_path}.partial")
    builder = IndexedDatasetBuilder(str(partial_bin), dtype=DType.optimal_dtype(vocab_size))
    max_id = -1
    try:
        for document_ids in documents:
            builder.add_document(document_ids, [len(document_ids)])
            if len(document_ids):
                max_id = max(max_id, int(np.max(document_ids)))
        builder.finalize(str(partial_idx))
        sidecar = None if tokenizer is None else sidecar_contents(
            tokenizer, max_id=max_id, bin_bytes=partial_bin.stat().st_size, **settings)
        sidecar_path(prefix).unlink(missing_ok=True)
        os.replace(partial_bin, bin_path)
        os.replace(partial_idx, idx_path)
        if sidecar is not None:
            write_sidecar(prefix, sidecar)
    finally:
        builder.data_file.close()
        partial_bin.unlink(missing_ok=True)
        partial_idx.unlink(missing_ok=True)


def _copies(rule: UpsampleRule | None, num_tokens: int) -> int:
    return rule.factor if rule is not None and num_tokens >= rule.min_tokens else 1


def _count(stats: SourceStats, text_tokens: int, document_tokens: int, copies: int) -> None:
    stats.documents += 1
    stats.upsampled += copies > 1
    stats.tokens += text_tokens
    stats.documents_out += copies
    stats.tokens_out += copies * document_tokens


@contextlib.contextmanager
def _encoded(documents: Iterable[Document], tokenizer: "TextTokenizer", workers: int):
    """(source, token ids) per document, in document order."""
    if workers == 1:
        yield ((doc.source, np.asarray(tokenizer.tokenize(doc.text), dtype=np.int32)) for doc in documents)
        return
    # spawn, not fork: the same on every platform, and safe in a parent that runs threads (torch, tqdm).
    pool = multiprocessing.get_context("spawn").Pool(
        workers, initializer=start_worker, initargs=(tokenizer.encoder,)
    )
    with pool:
        yield _pool_map_in_blocks(pool, iter(documents))


def _pool_map_in_blocks(pool, documents: Iterator[Document]) -> Iterator[tuple[str, np.ndarray]]:
    # Pool.imap would read the whole input ahead of the workers; blocks keep memory bounded.
    while block := list(islice(documents, _POOL_BLOCK)):
        yield from pool.imap(encode_document, block, chunksize=_POOL_CHUNKSIZE)


# ----------------------------------------------------------------------------- checks before any work


def _output_paths(output_prefix: str | Path) -> tuple[Path, Path]:
    """`{prefix}.bin`, `{prefix}.idx`; their directory is created and must be writable."""
    if str(output_prefix).endswith(("/", os.sep)) or Path(output_prefix).name in ("", ".", ".."):
        raise InputError(
            f"output_prefix (--output-prefix) '{output_prefix}' names a directory: add a file name, e.g. out/data"
        )
    directory = Path(output_prefix).parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise NotADirectoryError(
            f"output directory '{directory}' of output_prefix (--output-prefix) '{output_prefix}' is not a directory "
            "(a file is in the way): choose another output prefix"
        ) from None
    except PermissionError:
        raise PermissionError(
            f"cannot create output directory '{directory}' of output_prefix (--output-prefix) '{output_prefix}': "
            "choose a writable location"
        ) from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(
            f"output directory '{directory}' of output_prefix (--output-prefix) '{output_prefix}' is not writable: "
            "choose a writable location or fix its permissions"
        )
    return Path(f"{output_prefix}.bin"), Path(f"{output_prefix}.idx")


def _check_not_written(bin_path: Path, idx_path: Path, output_prefix: str | Path) -> None:
    existing = [str(path) for path in (bin_path, idx_path) if path.exists()]
    if existing:
        raise InputError(
            f"output_prefix (--output-prefix) '{output_prefix}' already has {' and '.join(existing)}: pass "
            "--overwrite (overwrite=True) to replace the dataset, or choose another output prefix"
        )


def _checked_rules(upsample: Mapping[str, UpsampleRule | Mapping[str, int]] | None) -> dict[str, UpsampleRule]:
    rules = {}
    for source, rule in (upsample or {}).items():
        setting = f"upsample[{source!r}]"
        if isinstance(rule, Mapping):
            if set(rule) != {"min_tokens", "factor"}:
                raise InputError(f"{setting} has keys {sorted(rule)}: it needs exactly 'min_tokens' and 'factor'")
            rule = UpsampleRule(**rule)
        if not isinstance(rule.min_tokens, int) or rule.min_tokens < 0:
            raise InputError(f"{setting}.min_tokens ({rule.min_tokens!r}) must be an integer >= 0")
        if not isinstance(rule.factor, int) or rule.factor < 1:
            raise InputError(f"{setting}.factor ({rule.factor!r}) must be an integer >= 1 (1: write once)")
        rules[source] = rule
    return rules


def _count_documents(paths: list[Path], json_key: str, source_key: str) -> Counter:
    """Documents per source; reading everything once surfaces any bad record before tokenizing starts."""
    counts = Counter(document.source for document in _documents(paths, json_key, source_key))
    if not counts:
        raise InputError(f"the inputs (--input) {[str(path) for path in paths]} hold no documents")
    return counts


def _check_rules_name_sources(rules: dict[str, UpsampleRule], documents_per_source: Counter) -> None:
    unknown = sorted(set(rules) - set(documents_per_source))
    if unknown:
        raise InputError(
            f"upsample names source(s) {unknown} that no input document has "
            f"(sources: {sorted(documents_per_source)}): fix the source name or drop the rule"
        )
