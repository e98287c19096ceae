"""The two files of a megatron indexed dataset (`{prefix}.idx`, `{prefix}.bin`) checked before anything reads
them: a damaged, hostile or foreign pair is refused in one line naming the file, never read by megatron-core.

Imports numpy and megatron-core's dtype table (inside a function) only: the `train` command runs these checks
before any process starts, and `build_gpt_dataset` again on every rank.
"""

import struct
from pathlib import Path

import numpy as np

from megatron_ext.errors import InputError

# The `.idx` megatron-core's IndexedDatasetBuilder writes: magic, version (8), dtype code (1), sequence count (8),
# document count (8, boundaries incl. the leading 0); then int32 lengths, int64 byte pointers and int64 document
# boundaries (+ int8 modes per sequence in a multimodal index).
IDX_MAGIC = b"MMIDIDX\x00\x00"
IDX_HEADER = struct.Struct("<9sQBQQ")
REPREPROCESS = "re-run `megatron-ext preprocess` to write both files again"
# Entries of the index (or tokens of the .bin) checked per numpy call: bounded memory whatever the data's size.
_CHUNK = 1 << 22


def check_indexed_dataset(prefix: str | Path) -> None:
    """`{prefix}.idx` is whole and consistent and `{prefix}.bin` holds exactly the tokens it lists, else an
    `InputError` naming the file, what is wrong and the fix.

    Checked: magic and version; an integer token dtype (megatron's code table knows float32/float64 too, which
    no tokenizer writes and the dataset cannot cast to ids); the file size the header's counts imply; no negative
    length; the sequences back to back from byte 0, the last one ending where the .bin ends; document boundaries
    that start at 0, never decrease and end at the sequence count; at least one token. Reads the index in chunks
    (12 bytes per sequence, as megatron itself reads it when it builds its sample index), never the tokens."""
    idx_path, bin_path = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    idx_bytes, bin_bytes = idx_path.stat().st_size, bin_path.stat().st_size
    with idx_path.open("rb") as idx:
        header = idx.read(IDX_HEADER.size)
    if len(header) < IDX_HEADER.size:
        raise InputError(f"index file '{idx_path}' is truncated: expected at least {IDX_HEADER.size} header "
                         f"bytes, found {idx_bytes}: {REPREPROCESS}")
    magic, version, dtype_code, sequences, boundaries = IDX_HEADER.unpack(header)
    if magic != IDX_MAGIC or version != 1:
        raise InputError(f"'{idx_path}' is not a megatron indexed dataset index (version 1): {REPREPROCESS}")
    token_bytes = token_dtype(idx_path, dtype_code).itemsize
    pointers_start = IDX_HEADER.size + 4 * sequences
    boundaries_start = pointers_start + 8 * sequences
    expected_idx = boundaries_start + 8 * boundaries
    if idx_bytes not in (expected_idx, expected_idx + sequences) or boundaries < 1:  # the second: multimodal
        raise InputError(
            f"index file '{idx_path}' is truncated or damaged: its header lists {sequences} sequences and "
            f"{max(boundaries - 1, 0)} documents ({expected_idx} bytes), found {idx_bytes} bytes: {REPREPROCESS}")
    _check_sequences(idx_path, bin_path, sequences, boundaries - 1, token_bytes, bin_bytes)
    _check_document_boundaries(idx_path, boundaries_start, boundaries, sequences)
    if bin_bytes == 0:  # whole, but nothing to read (megatron cannot even map an empty .bin)
        raise InputError(f"data file '{bin_path}' holds no tokens (its index lists {boundaries - 1} documents, all "
                         "empty): preprocess documents that are not empty, or leave this prefix out")


def token_dtype(idx_path: Path, dtype_code: int | None = None) -> np.dtype:
    """The integer dtype of the token ids `idx_path` declares (its header's code when not given), else an
    `InputError` naming the file."""
    from megatron.core.datasets.indexed_dataset import DType

    if dtype_code is None:
        with idx_path.open("rb") as idx:
            header = idx.read(IDX_HEADER.size)
        dtype_code = header[17] if len(header) > 17 else None  # magic (9), version (8), then the code
    try:
        dtype = np.dtype(DType.dtype_from_code(dtype_code))
    except (TypeError, ValueError, KeyError):
        raise InputError(f"index file '{idx_path}' names an unknown token dtype (code {dtype_code}): "
                         f"{REPREPROCESS}") from None
    if not np.issubdtype(dtype, np.integer):
        raise InputError(f"index file '{idx_path}' declares {dtype.name} token ids: ids are integers (preprocess "
                         f"writes uint16 or int32), so this is no tokenized data: {REPREPROCESS}")
    return dtype


def _check_sequences(idx_path: Path, bin_path: Path, sequences: int, documents: int, token_bytes: int,
                     bin_bytes: int) -> None:
    """Every length >= 0, the sequences back to back from byte 0 (as megatron's writer lays them out), the
    last one ending where the .bin ends."""
    end = 0  # where the sequences before the chunk end
    lengths = _index_array(idx_path, np.int32, IDX_HEADER.size, sequences)
    pointers = _index_array(idx_path, np.int64, IDX_HEADER.size + 4 * sequences, sequences)
    for first in range(0, sequences, _CHUNK):
        sizes = lengths[first:first + _CHUNK].astype(np.int64) * token_bytes
        if (sizes < 0).any():
            at = first + int(np.argmax(sizes < 0))
            raise InputError(f"index file '{idx_path}' is damaged: sequence {at} has length {lengths[at]}: "
                             f"{REPREPROCESS}")
        ends = end + np.cumsum(sizes)
        misplaced = pointers[first:first + _CHUNK] != ends - sizes
        if misplaced.any():
            at = first + int(np.argmax(misplaced))
            raise InputError(
                f"index file '{idx_path}' is damaged: sequence {at} starts at byte {pointers[at]} of '{bin_path}', "
                f"but the sequences before it end at byte {int(ends[at - first] - sizes[at - first])}: {REPREPROCESS}")
        end = int(ends[-1])
    if bin_bytes != end:
        raise InputError(
            f"data file '{bin_path}' has {bin_bytes} bytes, but its index '{idx_path}' ({documents} documents) "
            f"lists {end} bytes ({end // token_bytes} tokens of {token_bytes} bytes): the .bin is truncated or the "
            f"two files come from different runs: {REPREPROCESS}")


def _check_document_boundaries(idx_path: Path, start: int, boundaries: int, sequences: int) -> None:
    """The boundaries start at 0, never decrease and end at the sequence count (megatron's document_indices)."""
    values = _index_array(idx_path, np.int64, start, boundaries)
    previous = 0
    for first in range(0, boundaries, _CHUNK):
        chunk = values[first:first + _CHUNK]
        if (first == 0 and int(chunk[0]) != 0) or (np.diff(chunk, prepend=previous) < 0).any():
            raise InputError(f"index file '{idx_path}' is damaged: its document boundaries do not rise from 0 to "
                             f"its sequence count {sequences}: {REPREPROCESS}")
        previous = int(chunk[-1])
    if previous != sequences:
        raise InputError(f"index file '{idx_path}' is damaged: its last document ends at sequence {previous}, not "
                         f"at its sequence count {sequences}: {REPREPROCESS}")


def _index_array(idx_path: Path, dtype, offset: int, count: int) -> np.ndarray:
    """`count` numbers of `dtype` at byte `offset` of the index, memory-mapped (read lazily, chunk by chunk)."""
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(idx_path, dtype=dtype, mode="r", offset=offset, shape=(count,))


def check_loss_tokens(prefix: str | Path, eod: int, *, setting: str, sequences: tuple[int, int] | None = None,
                      part: str = "") -> None:
    """With data.mask_eod_loss, the data (its sequences [first, end) when given; `part` names them) must hold a
    token other than EOD: else no sample has a token the loss counts, and its loss is 0 / 0."""
    if every_token_is(prefix, eod, sequences):
        raise InputError(
            f"{setting}: every token of {part}data prefix '{prefix}' is EOD (id {eod}) and data.mask_eod_loss: true "
            "takes the loss off EOD tokens, so no sample has a token to learn from: preprocess documents that are not "
            "empty (check --text-key names the field holding the text), or set data.mask_eod_loss: false")


def every_token_is(prefix: str | Path, token_id: int, sequences: tuple[int, int] | None = None) -> bool:
    """Whether every token of `{prefix}` (of its sequences [first, end) when given) is `token_id`; True when
    there are none. Reads the .bin in bounded chunks and stops at the first other token. The files must have
    passed `check_indexed_dataset` (sequences back to back)."""
    idx_path, bin_path = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    dtype = token_dtype(idx_path)
    count, first_byte = bin_path.stat().st_size // dtype.itemsize, 0
    if sequences is not None:
        with idx_path.open("rb") as idx:
            total = IDX_HEADER.unpack(idx.read(IDX_HEADER.size))[3]
        pointers = _index_array(idx_path, np.int64, IDX_HEADER.size + 4 * total, total)
        first, end = sequences
        first_byte = int(pointers[first]) if first < total else count * dtype.itemsize
        end_byte = int(pointers[end]) if end < total else count * dtype.itemsize
        count = (end_byte - first_byte) // dtype.itemsize
    if count <= 0:
        return True
    tokens = np.memmap(bin_path, dtype=dtype, mode="r", offset=first_byte, shape=(count,))
    return all((tokens[at:at + _CHUNK] == token_id).all() for at in range(0, count, _CHUNK))
