"""Data that does not hold together is refused before any training work: an indexed dataset whose `.bin` and
`.idx` disagree, an index cache left by another dataset at the same prefix, non-UTF-8 input, and a preprocess
that would overwrite a dataset.

References are independent of the checks: file sizes from the filesystem, megatron-core's IndexedDataset
reading back what preprocess wrote, and a fresh in-memory build compared with a cached one."""

import json
import shutil
from pathlib import Path

import pytest

from megatron_ext.cli import main
from megatron_ext.data import SentencePieceTokenizer, build_gpt_dataset, preprocess, train_sentencepiece
from megatron_ext.data.documents import read_documents
from megatron_ext.errors import InputError

SEQ_LENGTH = 16
NUM_SAMPLES = 60


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data_checks")


@pytest.fixture(scope="module")
def tokenizer_model(data_dir) -> Path:
    corpora = [words_corpus(data_dir / "words.jsonl", 100), digits_corpus(data_dir / "digits.jsonl", 30)]
    return train_sentencepiece(corpora, data_dir / "tok", 320, seed=0)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_model) -> SentencePieceTokenizer:
    return SentencePieceTokenizer(tokenizer_model)


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts), encoding="utf-8")
    return path


def words_corpus(path: Path, documents: int) -> Path:
    return write_jsonl(path, [f"document {i} says hello world " * (1 + i % 7) for i in range(documents)])


def digits_corpus(path: Path, documents: int) -> Path:
    return write_jsonl(path, ["0123456789" * (3 + i % 5) for i in range(documents)])


@pytest.fixture(scope="module")
def hundred_docs(data_dir, tokenizer) -> str:
    preprocess([words_corpus(data_dir / "hundred.jsonl", 100)], data_dir / "hundred", tokenizer, workers=1,
               progress=False)
    return str(data_dir / "hundred")


@pytest.fixture(scope="module")
def one_doc(data_dir, tokenizer) -> str:
    preprocess([words_corpus(data_dir / "one.jsonl", 1)], data_dir / "one", tokenizer, workers=1, progress=False)
    return str(data_dir / "one")


def copied(prefix: str, to: Path) -> str:
    for suffix in (".bin", ".idx"):
        shutil.copyfile(f"{prefix}{suffix}", f"{to}{suffix}")
    return str(to)


def build(prefix: str, tokenizer, cache_dir=None):
    return build_gpt_dataset([prefix], SEQ_LENGTH, tokenizer, num_samples=NUM_SAMPLES, seed=1, cache_dir=cache_dir)


# ----------------------------------------------------------------------------- .bin against .idx


def test_index_of_one_document_with_data_of_a_hundred_is_refused(hundred_docs, one_doc, tokenizer, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copyfile(f"{one_doc}.idx", f"{mixed}.idx")
    shutil.copyfile(f"{hundred_docs}.bin", f"{mixed}.bin")
    found = Path(f"{mixed}.bin").stat().st_size
    expected = Path(f"{one_doc}.bin").stat().st_size  # what the one-document index lists
    with pytest.raises(InputError, match=rf"'{mixed}\.bin' has {found} bytes.*'{mixed}\.idx' \(1 documents\) "
                                         rf"lists {expected} bytes.*megatron-ext preprocess"):
        build(str(mixed), tokenizer)


def test_truncated_bin_is_refused_with_expected_and_found_bytes(hundred_docs, tokenizer, tmp_path):
    prefix = copied(hundred_docs, tmp_path / "short")
    expected = Path(f"{prefix}.bin").stat().st_size
    with open(f"{prefix}.bin", "r+b") as data:
        data.truncate(expected - 10)
    with pytest.raises(InputError, match=rf"'{prefix}\.bin' has {expected - 10} bytes.*lists {expected} bytes"
                                         r".*truncated.*megatron-ext preprocess"):
        build(prefix, tokenizer)


@pytest.mark.parametrize("kept_bytes", [20, -8], ids=["inside_the_header", "inside_the_arrays"])
def test_truncated_idx_is_refused_by_name(hundred_docs, tokenizer, tmp_path, kept_bytes):
    prefix = copied(hundred_docs, tmp_path / "short")
    size = Path(f"{prefix}.idx").stat().st_size
    kept = kept_bytes if kept_bytes > 0 else size + kept_bytes
    with open(f"{prefix}.idx", "r+b") as index:
        index.truncate(kept)
    # 100 documents of one sequence each: 34 header bytes + 12 per sequence + 8 per boundary (101 of them)
    assert size == 34 + 12 * 100 + 8 * 101
    what = "34 header bytes" if kept_bytes > 0 else f"100 documents \\({size} bytes\\)"
    with pytest.raises(InputError, match=rf"index file '{prefix}\.idx' is truncated.*{what}.*found {kept}"
                                         r".*megatron-ext preprocess"):
        build(prefix, tokenizer)


# ----------------------------------------------------------------------------- the index cache


def test_dataset_replaced_at_the_same_prefix_rebuilds_the_cached_indices(data_dir, tokenizer, tmp_path):
    prefix = tmp_path / "replaced"
    preprocess([words_corpus(tmp_path / "words.jsonl", 100)], prefix, tokenizer, workers=1, progress=False)
    build(str(prefix), tokenizer, cache_dir=tmp_path / "cache")
    preprocess([digits_corpus(tmp_path / "digits.jsonl", 30)], prefix, tokenizer, workers=1, progress=False,
               overwrite=True)

    cached = build(str(prefix), tokenizer, cache_dir=tmp_path / "cache")
    fresh = build(str(prefix), tokenizer)
    digit_pieces = {tokenizer.tokenize(digit)[-1] for digit in "0123456789"} | {tokenizer.eod}
    assert set(fresh[0]["tokens"].tolist()) <= digit_pieces  # the new corpus, not the old one
    for index in range(NUM_SAMPLES):
        assert cached[index]["tokens"].tolist() == fresh[index]["tokens"].tolist()


# ----------------------------------------------------------------------------- non-UTF-8 input


def test_non_utf8_jsonl_names_file_and_line(tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n\n{"text": "caf\xe9"}\n')
    with pytest.raises(InputError, match=rf"{bad} line 3 \(byte 31\) is not UTF-8.*re-encode"):
        list(read_documents(bad))


def test_non_utf8_text_file_names_the_byte_offset(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"first line\nna\xefve\n")
    with pytest.raises(InputError, match=rf"{bad} line 2 \(byte 13\) is not UTF-8.*re-encode"):
        list(read_documents(bad))


# ----------------------------------------------------------------------------- preprocess keeps what exists


def test_preprocess_refuses_to_overwrite_unless_told(data_dir, tokenizer_model, tmp_path, capsys):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = tmp_path / "data"
    command = ["preprocess", "--input", str(words_corpus(tmp_path / "new.jsonl", 5)), "--output-prefix", str(prefix),
               "--tokenizer", str(tokenizer_model), "--workers", "1"]
    Path(f"{prefix}.bin").write_bytes(b"old")
    Path(f"{prefix}.idx").write_bytes(b"old")
    capsys.readouterr()

    assert main(command) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and f"{prefix}.bin and {prefix}.idx" in error and "--overwrite" in error
    assert Path(f"{prefix}.bin").read_bytes() == Path(f"{prefix}.idx").read_bytes() == b"old"

    assert main([*command, "--overwrite"]) == 0
    assert len(IndexedDataset(str(prefix))) == 5
