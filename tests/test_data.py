"""megatron_ext.data: sentencepiece tokenizer, the tiny offline corpus, preprocessing into indexed datasets.

References are independent of the code under test: sentencepiece's own processor, UTF-8 bytes, hand counts,
and megatron-core's IndexedDataset reading back what preprocess wrote."""

import argparse
import json
import os
import pickle
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import sentencepiece

from megatron_ext.data import (
    SentencePieceTokenizer,
    UpsampleRule,
    build_tiny_corpus,
    preprocess,
    train_sentencepiece,
)
from megatron_ext.data.cli import add_preprocess_args
from megatron_ext.data.corpus import PASSKEY_INTRO

VOCAB_SIZE = 500
NUM_DOCUMENTS = 40  # 0.3 retrieval -> 12 passkey; the other 28 -> 14 docstring, 14 code


@pytest.fixture(scope="module")
def corpus_path(tmp_path_factory) -> Path:
    return build_tiny_corpus(tmp_path_factory.mktemp("corpus"), seed=0, num_documents=NUM_DOCUMENTS)


@pytest.fixture(scope="module")
def corpus(corpus_path) -> list[dict]:
    return [json.loads(line) for line in corpus_path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def tokenizer_model(corpus_path, tmp_path_factory) -> Path:
    return train_sentencepiece([corpus_path], tmp_path_factory.mktemp("tok") / "tiny", VOCAB_SIZE, seed=0)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_model) -> SentencePieceTokenizer:
    return SentencePieceTokenizer(tokenizer_model)


def read_indexed(prefix) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    return [dataset[i].tolist() for i in range(len(dataset))]


def cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="megatron-ext")
    add_preprocess_args(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- tokenizer

ROUND_TRIP_TEXTS = [
    "The pass key is 48213. Remember it.",
    "  def f(x):\n\treturn {'ü': x ** 2}  # trailing spaces  \r\n",
    "Ünïcödé: 日本語のテキスト, ελληνικά, emoji 🙂🚀, ligature ﬁ, full-width Ａ１",
    "",
    "\n\n   \n",
]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_tokenize_detokenize_round_trips_any_text(tokenizer, text):
    assert tokenizer.detokenize(tokenizer.tokenize(text)) == text


def test_digits_are_single_pieces_and_unknown_characters_fall_back_to_utf8_bytes(tokenizer):
    digit_pieces = [tokenizer.inv_vocab[i] for i in tokenizer.tokenize("48213")]
    assert [piece for piece in digit_pieces if piece != "▁"] == list("48213")
    emoji_pieces = [tokenizer.inv_vocab[i] for i in tokenizer.tokenize("🙂")]
    utf8_bytes = "🙂".encode("utf-8")
    assert [piece for piece in emoji_pieces if piece != "▁"] == [f"<0x{byte:02X}>" for byte in utf8_bytes]


def test_megatron_interface_matches_sentencepiece(tokenizer, tokenizer_model):
    from megatron.core.tokenizers import MegatronTokenizerBase

    reference = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_model))
    assert isinstance(tokenizer, MegatronTokenizerBase)
    assert tokenizer.vocab_size == reference.get_piece_size() == VOCAB_SIZE
    assert (tokenizer.bos, tokenizer.eos) == (reference.bos_id(), reference.eos_id()) == (1, 2)
    assert tokenizer.eod == tokenizer.eos
    assert tokenizer.pad == reference.pad_id() == -1
    assert tokenizer.vocab == {reference.id_to_piece(i): i for i in range(VOCAB_SIZE)}
    assert tokenizer.inv_vocab == {i: reference.id_to_piece(i) for i in range(VOCAB_SIZE)}
    text = ROUND_TRIP_TEXTS[2]
    assert tokenizer.tokenize(text) == reference.encode(text)
    assert pickle.loads(pickle.dumps(tokenizer)).tokenize(text) == reference.encode(text)


def test_training_twice_with_the_same_seed_gives_the_same_model(corpus_path, tokenizer_model, tmp_path):
    again = train_sentencepiece([corpus_path], tmp_path / "again", VOCAB_SIZE, seed=0)
    assert again.read_bytes() == tokenizer_model.read_bytes()


def test_training_takes_an_iterator_of_strings_and_says_when_the_vocab_is_too_large(tmp_path):
    lines = [f"word{i} {'x' * (i % 7)} {i * 37}" for i in range(300)]
    with pytest.raises(ValueError, match=r"Vocabulary size too high \(400\).*: pass more text or a smaller vocab"):
        train_sentencepiece(iter(lines), tmp_path / "it", 400, model_type="unigram")
    model = train_sentencepiece(iter(lines), tmp_path / "it", 280, model_type="unigram")
    assert SentencePieceTokenizer(model).vocab_size == 280


def test_missing_or_invalid_tokenizer_model_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer model '.*nowhere\.model' does not exist"):
        SentencePieceTokenizer(tmp_path / "nowhere.model")
    not_a_model = tmp_path / "text.model"
    not_a_model.write_text("hello")
    with pytest.raises(ValueError, match=r"text\.model' is not a sentencepiece model"):
        SentencePieceTokenizer(not_a_model)


# ----------------------------------------------------------------------------- corpus


def test_corpus_is_byte_identical_for_a_seed_and_differs_for_another(corpus_path, tmp_path):
    same = build_tiny_corpus(tmp_path / "same", seed=0, num_documents=NUM_DOCUMENTS)
    other = build_tiny_corpus(tmp_path / "other", seed=1, num_documents=NUM_DOCUMENTS)
    assert same.read_bytes() == corpus_path.read_bytes()
    assert other.read_bytes() != corpus_path.read_bytes()


def test_corpus_sources_come_in_the_requested_proportions(corpus):
    assert Counter(record["source"] for record in corpus) == {
        "synthetic_passkey": 12,  # round(40 * 0.3)
        "stdlib_doc": 14,  # (40 - 12) // 2
        "stdlib_code": 14,
    }
    assert all(len(r["text"]) <= 16_000 for r in corpus if r["source"] != "synthetic_passkey")
    assert all(r["text"].startswith("# file: ") for r in corpus if r["source"] == "stdlib_code")


def test_passkey_documents_hold_the_key_in_the_sentence_and_the_answer(corpus):
    passkey_texts = [r["text"] for r in corpus if r["source"] == "synthetic_passkey"]
    depths = []
    for text in passkey_texts:
        sentence = re.findall(r"The pass key is (\d{5})\. Remember it\. (\d{5}) is the pass key\.", text)
        answer = re.fullmatch(r"(?s).*What is the pass key\? The pass key is (\d{5})\.", text)
        assert len(sentence) == 1 and answer is not None
        (key, repeated), = sentence
        assert key == repeated == answer.group(1)
        assert text.startswith(PASSKEY_INTRO)
        # filler of 2,000..24,000 characters, overshooting by under one paragraph (<= 1,000), plus the frame
        assert 2_000 < len(text) < 24_000 + 1_000 + 500
        depths.append(text.index("Remember it.") / len(text))
    assert min(depths) < 0.5 < max(depths)  # the key is hidden at many depths, not at one place


# ----------------------------------------------------------------------------- preprocess


def test_indexed_dataset_holds_each_document_tokens_plus_eod_in_order(corpus, corpus_path, tokenizer, tmp_path):
    result = preprocess([corpus_path], tmp_path / "data", tokenizer, workers=1, progress=False)
    expected = [tokenizer.tokenize(r["text"]) + [tokenizer.eod] for r in corpus]
    assert read_indexed(tmp_path / "data") == expected
    assert result.sources["stdlib_code"].documents == 14
    assert sum(s.tokens_out for s in result.sources.values()) == sum(map(len, expected))


@pytest.mark.slow
def test_two_workers_write_the_same_files_as_one(corpus_path, tokenizer, tmp_path):
    for workers in (1, 2):
        preprocess([corpus_path], tmp_path / f"w{workers}", tokenizer, workers=workers, progress=False)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"w2{suffix}").read_bytes() == (tmp_path / f"w1{suffix}").read_bytes()


def test_upsampling_writes_long_documents_of_the_source_factor_times(corpus, corpus_path, tokenizer, tmp_path):
    code_lengths = sorted(len(tokenizer.tokenize(r["text"])) for r in corpus if r["source"] == "stdlib_code")
    min_tokens = code_lengths[len(code_lengths) // 2]  # the upper half of the code documents qualifies
    result = preprocess([corpus_path], tmp_path / "up", tokenizer, workers=1, progress=False,
                        upsample={"stdlib_code": {"min_tokens": min_tokens, "factor": 3}})
    expected = []
    for record in corpus:
        ids = tokenizer.tokenize(record["text"])
        long_code = record["source"] == "stdlib_code" and len(ids) >= min_tokens
        expected += [ids + [tokenizer.eod]] * (3 if long_code else 1)
    assert read_indexed(tmp_path / "up") == expected
    code = result.sources["stdlib_code"]
    assert (code.documents, code.upsampled, code.documents_out) == (14, 7, 14 + 2 * 7)
    assert result.sources["stdlib_doc"].documents_out == 14
    assert len(expected) == NUM_DOCUMENTS + 2 * 7


def test_bos_can_lead_and_eod_can_be_left_out(tokenizer, tmp_path):
    text_file = tmp_path / "book.txt"
    text_file.write_text("Chapter 1.\nIt was 1984.\n", encoding="utf-8")
    result = preprocess([text_file], tmp_path / "book", tokenizer, workers=1, progress=False,
                        prepend_bos=True, append_eod=False)
    assert read_indexed(tmp_path / "book") == [[tokenizer.bos] + tokenizer.tokenize(text_file.read_text())]
    assert list(result.sources) == ["book"]  # a plain-text file is one document named after the file


def test_cli_preprocess_prints_the_statistics_table(corpus_path, tokenizer_model, tmp_path, capsys):
    args = cli(["preprocess", "--input", str(corpus_path), "--output-prefix", str(tmp_path / "out" / "data"),
                "--tokenizer-model", str(tokenizer_model), "--workers", "1", "--upsample", "stdlib_doc:0:2"])
    assert args.func(args) == 0
    assert (tmp_path / "out" / "data.bin").is_file() and (tmp_path / "out" / "data.idx").is_file()
    table = capsys.readouterr().out
    # every docstring document qualifies (min_tokens 0): 14 documents in, 28 out; 40 + 14 in total
    assert re.search(r"^stdlib_doc\s+14\s+14\s+[\d,]+\s+28\s", table, re.MULTILINE)
    assert re.search(r"^total\s+40\s+14\s+[\d,]+\s+54\s", table, re.MULTILINE)


# ----------------------------------------------------------------------------- errors before any work


def test_missing_input_file_is_named(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"input file '.*missing\.jsonl' does not exist.*--input"):
        preprocess([tmp_path / "missing.jsonl"], tmp_path / "data", tokenizer, progress=False)


def test_jsonl_line_without_the_key_names_file_and_line(tokenizer, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"body": "no text here"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl line 3: no 'text' key \(keys: \['body'\]\).*--json-key"):
        preprocess([bad], tmp_path / "data", tokenizer, progress=False)
    assert not list(tmp_path.glob("data*"))  # checked before anything was written

    bad.write_text('{"text": "fine"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl line 2: not valid JSON"):
        preprocess([bad], tmp_path / "data", tokenizer, progress=False)

    bad.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"\(--input\) \['.*bad\.jsonl'\] hold no documents"):
        preprocess([bad], tmp_path / "data", tokenizer, progress=False)


def test_missing_tokenizer_model_names_the_flag(corpus_path, tmp_path):
    args = cli(["preprocess", "--input", str(corpus_path), "--output-prefix", str(tmp_path / "data"),
                "--tokenizer-model", str(tmp_path / "nope.model")])
    with pytest.raises(FileNotFoundError, match=r"--tokenizer-model '.*nope\.model' does not exist"):
        args.func(args)


def test_unwritable_output_location_is_named(corpus_path, tokenizer, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(NotADirectoryError, match=r"output directory '.*a_file' .*--output-prefix"):
        preprocess([corpus_path], blocker / "data", tokenizer, progress=False)
    if os.geteuid() == 0:
        return  # root writes anywhere: only the blocked path above can fail
    read_only = tmp_path / "read_only"
    read_only.mkdir(mode=0o500)
    with pytest.raises(PermissionError, match=r"output directory '.*read_only' .* is not writable"):
        preprocess([corpus_path], read_only / "data", tokenizer, progress=False)


def test_bad_upsample_rules_are_named(corpus_path, tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"upsample names source\(s\) \['stdlib_cod'\].*stdlib_code"):
        preprocess([corpus_path], tmp_path / "d", tokenizer, progress=False,
                   upsample={"stdlib_cod": UpsampleRule(min_tokens=10, factor=2)})
    with pytest.raises(ValueError, match=r"upsample\['stdlib_code'\]\.factor \(0\) must be an integer >= 1"):
        preprocess([corpus_path], tmp_path / "d", tokenizer, progress=False,
                   upsample={"stdlib_code": {"min_tokens": 10, "factor": 0}})


def test_malformed_upsample_flag_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        cli(["preprocess", "--input", "a.jsonl", "--output-prefix", "o", "--tokenizer-model", "t.model",
             "--upsample", "stdlib_code:many:3"])
    assert "'stdlib_code:many:3' is not SOURCE:MIN_TOKENS:FACTOR" in capsys.readouterr().err


@pytest.mark.slow
def test_worker_imports_stay_free_of_megatron_core():
    # Spawned workers import megatron_ext.data; megatron-core there would cost each ~4 s and ~300 MB.
    probe = "import sys, megatron_ext.data.encode_worker; print('megatron.core' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "False"
