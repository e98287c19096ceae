"""Property-based fuzz of the data inputs users hand us (issue 30): `.idx` headers and `.bin` sizes as `train`
opens them, JSONL lines and tokenizer directories as `preprocess` reads them. Every generated case ends in
success or a one-line error with exit 2 (`megatron-ext <command>: ...`) within SECONDS and MEMORY_MB
(tests/fuzz_harness.py: a forked child under RLIMIT_AS and a wall-clock kill), never a traceback, a hang or a
memory blow-up. Success is checked too: data `train` accepts is read sample by sample by the dataset the ranks
build; a JSONL `preprocess` accepts held only valid records, and its output has one document per record.
Hypothesis runs derandomized (a fixed seed), so CI runs the same cases every time."""

import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_harness import assert_clean_ending, run_cli_bounded

pytestmark = pytest.mark.slow

SECONDS = 20  # per case; a case takes 0.2-0.5 s on the 2-core machine
MEMORY_MB = 1024  # address space a case may add to the harness's zygote
HEADER = 34  # .idx: magic (9), version (8), dtype code (1), sequence count (8), boundary count (8)
STOP_AT_TRAINING = ["megatron_ext.training.train:train"]  # `train` checks everything, then stops where work begins
# `preprocess --tokenizer DIR` reads the directory with transformers: imported once, in the parent
PRELOAD_WITH_TRANSFORMERS = ("megatron_ext.cli", "megatron_ext.data.cli", "megatron_ext.data.tokenizer_files",
                             "transformers", "transformers.models.auto.tokenization_auto")


def fuzz_settings(examples: int):
    return settings(max_examples=examples, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large, HealthCheck.large_base_example])


@pytest.fixture(scope="module")
def seed(tmp_path_factory) -> dict:
    """A sentencepiece tokenizer, an indexed dataset preprocess made with it, and a Hugging Face tokenizer
    directory (a word-level tokenizer.json): what the cases mutate."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from megatron_ext.data import SentencePieceTokenizer, preprocess, train_sentencepiece

    work = tmp_path_factory.mktemp("fuzz_data")
    corpus = work / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i} says hello world " * (1 + i % 4)}) + "\n"
                              for i in range(24)))
    model = train_sentencepiece([corpus], work / "tok", 320, seed=0)
    preprocess([corpus], work / "data", SentencePieceTokenizer(model), workers=1, progress=False)
    hf = work / "hf_tokenizer"
    hf.mkdir()
    words = ["<unk>", "<s>", "</s>", "document", "says", "hello", "world"] + [str(i) for i in range(24)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(hf / "tokenizer.json"))
    (hf / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    encoder = SentencePieceTokenizer(model)
    return dict(work=work, model=model, data=work / "data", hf=hf, corpus=corpus, vocab_size=encoder.vocab_size,
                eod=encoder.eod)


def case_dir(seed) -> Path:
    return Path(tempfile.mkdtemp(prefix="case_", dir=seed["work"]))


# ----------------------------------------------------------------------------- .idx and .bin, opened by `train`


def train_config(case: Path, seed, prefix: Path, mask_eod_loss: bool) -> Path:
    config = case / "train.yaml"
    config.write_text(yaml.safe_dump(dict(
        model=dict(num_layers=1, hidden_size=32, num_attention_heads=2, seq_length=16),
        data=dict(train_data=[str(prefix)], tokenizer_model=str(seed["model"]), mask_eod_loss=mask_eod_loss,
                  cache_dir=str(case / "cache")),
        training=dict(train_iters=2, micro_batch_size=1, global_batch_size=2, precision="fp32"),
        optimizer=dict(warmup_iters=0),
        checkpoint=dict(dir=str(case / "checkpoints")),
    )))
    return config


def open_with_train(seed, idx: bytes, bin_: bytes, *, sidecar: bool, mask_eod_loss: bool):
    """`train` on the data (idx, bin): must end cleanly; data it accepts must also build and read in full."""
    case = case_dir(seed)
    prefix = case / "data"
    Path(f"{prefix}.idx").write_bytes(idx)
    Path(f"{prefix}.bin").write_bytes(bin_)
    if sidecar:  # the record preprocess wrote for the original files
        Path(f"{prefix}.tokenizer.json").write_text(Path(f"{seed['data']}.tokenizer.json").read_text())
    outcome = run_cli_bounded(["train", "--config", train_config(case, seed, prefix, mask_eod_loss)], cwd=case,
                              seconds=SECONDS, memory_mb=MEMORY_MB, stop_before=STOP_AT_TRAINING)
    assert_clean_ending(outcome, "train")
    if outcome.exit_code == 0:  # accepted: what every rank then builds reads without an error
        read_every_sample(seed, prefix, mask_eod_loss)
    return outcome


def read_every_sample(seed, prefix: Path, mask_eod_loss: bool) -> None:
    from megatron_ext.data import SentencePieceTokenizer, build_gpt_dataset

    tokenizer = SentencePieceTokenizer(seed["model"])
    dataset = build_gpt_dataset([str(prefix)], 16, tokenizer, num_samples=8, seed=0, mask_eod_loss=mask_eod_loss)
    for index in range(len(dataset)):
        sample = dataset[index]
        assert int(sample["tokens"].max()) < tokenizer.vocab_size and int(sample["tokens"].min()) >= 0


def field_values(sequences: int):
    """Values worth writing over a number of the index: off by one, zero, negative, huge."""
    return st.sampled_from([0, 1, 2, sequences - 1, sequences, sequences + 1, 2**31 - 1, 2**32, 2**62, 2**63 - 1,
                            -1, -(2**31)]) | st.integers(min_value=-(2**63), max_value=2**63 - 1)


@st.composite
def mutated_index(draw, original: bytes):
    """The original .idx with 1-3 changes: a byte anywhere, a number of the header or of the arrays overwritten,
    the file cut short or extended."""
    index = bytearray(original)
    sequences = struct.unpack_from("<Q", index, 18)[0]
    arrays = {"length": (HEADER, 4, "<i"), "pointer": (HEADER + 4 * sequences, 8, "<q"),
              "boundary": (HEADER + 12 * sequences, 8, "<q")}
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["byte", "dtype", "count", "array", "cut", "extend"]))
        if kind == "byte" and index:
            index[draw(st.integers(0, len(index) - 1))] = draw(st.integers(0, 255))
        elif kind == "dtype" and len(index) > 17:
            index[17] = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 255]))
        elif kind == "count" and len(index) >= HEADER:
            struct.pack_into("<Q", index, draw(st.sampled_from([9, 18, 26])),
                             draw(field_values(sequences)) % 2**64)
        elif kind == "array":
            start, size, form = arrays[draw(st.sampled_from(sorted(arrays)))]
            at = start + size * draw(st.integers(0, sequences))
            value = draw(field_values(sequences))
            if at + size <= len(index):
                bits = 8 * size
                struct.pack_into(form, index, at, (value + 2**(bits - 1)) % 2**bits - 2**(bits - 1))
        elif kind == "cut":
            del index[draw(st.integers(0, len(index))):]
        elif kind == "extend":
            index += draw(st.binary(min_size=1, max_size=64))
    return bytes(index)


@st.composite
def regrouped_index(draw, original: bytes):
    """The original .idx with its sequences grouped into other documents: still a valid index."""
    index = bytearray(original)
    sequences, boundaries = struct.unpack_from("<QQ", index, 18)
    inner = draw(st.lists(st.integers(1, sequences - 1), min_size=boundaries - 2, max_size=boundaries - 2))
    for at, value in enumerate([0, *sorted(inner), sequences]):
        struct.pack_into("<q", index, HEADER + 12 * sequences + 8 * at, value)
    return bytes(index)


@st.composite
def overwritten_tokens(draw, original: bytes) -> bytes:
    """The original .bin with a few bytes overwritten: ids beyond the vocabulary among them."""
    tokens = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        tokens[draw(st.integers(0, len(tokens) - 1))] = draw(st.integers(0, 255))
    return bytes(tokens)


@st.composite
def written_dataset(draw, vocab_size: int, eod: int) -> tuple[bytes, bytes]:
    """(idx, bin) of documents megatron's own builder writes: empty ones, single tokens, EOD runs, long ones."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    token = st.integers(0, vocab_size - 1) | st.just(eod)
    documents = draw(st.lists(st.lists(token, max_size=40) | st.lists(st.just(eod), max_size=5), min_size=1,
                              max_size=12))
    scratch = Path(tempfile.mkdtemp(prefix="written_"))
    builder = IndexedDatasetBuilder(str(scratch / "d.bin"), dtype=DType.optimal_dtype(vocab_size))
    for document in documents:
        builder.add_document(np.asarray(document, dtype=np.int64), [len(document)])
    builder.finalize(str(scratch / "d.idx"))
    return (scratch / "d.idx").read_bytes(), (scratch / "d.bin").read_bytes()


@fuzz_settings(70)
@given(data=st.data())
def test_fuzzed_index_files_end_in_a_clean_refusal_or_train(seed, data):
    original = Path(f"{seed['data']}.idx").read_bytes()
    original_bin = Path(f"{seed['data']}.bin").read_bytes()
    pairs = st.one_of(
        st.one_of(mutated_index(original), regrouped_index(original), st.binary(max_size=200),
                  st.binary(max_size=200).map(lambda tail: original[:HEADER] + tail)).map(lambda idx: (idx, original_bin)),
        written_dataset(seed["vocab_size"], seed["eod"]),
        overwritten_tokens(original_bin).map(lambda bin_: (original, bin_)))
    idx, bin_ = data.draw(pairs, label="idx, bin")
    # the record's largest id is trusted for a .bin of the size it records: only the original .bin may have it
    open_with_train(seed, idx, bin_, sidecar=bin_ is original_bin and data.draw(st.booleans(), label="sidecar"),
                    mask_eod_loss=data.draw(st.booleans(), label="mask_eod_loss"))


@fuzz_settings(20)
@given(change=st.integers(-64, 64).filter(bool), junk=st.binary(min_size=64, max_size=64), sidecar=st.booleans())
def test_a_bin_of_the_wrong_size_is_refused_in_one_line(seed, change, junk, sidecar):
    bin_ = Path(f"{seed['data']}.bin").read_bytes()
    bin_ = bin_[:change] if change < 0 else bin_ + junk[:change]
    outcome = open_with_train(seed, Path(f"{seed['data']}.idx").read_bytes(), bin_, sidecar=sidecar,
                              mask_eod_loss=False)
    assert outcome.exit_code == 2 and "has" in outcome.stderr and "bytes" in outcome.stderr, outcome.describe()


# ----------------------------------------------------------------------------- JSONL lines, read by `preprocess`


def json_values():
    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=30)
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6),
                                                                                            inner, max_size=3),
                        max_leaves=6)


def good_lines():
    """A valid record: text of any characters (escaped or raw UTF-8), with or without a source."""
    text = st.text(max_size=80)
    return st.one_of(st.builds(lambda t: json.dumps({"text": t}).encode(), text),
                     st.builds(lambda t: json.dumps({"text": t}, ensure_ascii=False).encode("utf-8", "surrogatepass"),
                               text),
                     st.builds(lambda t, s: json.dumps({"text": t, "source": s}).encode(), text, st.text(max_size=8)))


def jsonl_lines():
    """One line each: a good record, or one of the ways a line goes wrong."""
    text = st.text(max_size=80)
    good = good_lines()
    good_with_source = st.builds(lambda t, s: json.dumps({"text": t, "source": s}).encode(), text, json_values())
    wrong_text = st.builds(lambda v: json.dumps({"text": v}).encode(), json_values())
    missing = st.builds(lambda d: json.dumps(d).encode(), st.dictionaries(st.text(max_size=6).filter(
        lambda k: k != "text"), json_values(), max_size=3))
    nested = st.builds(lambda t: json.dumps({"doc": {"text": t}, "text": {"text": t}}).encode(), text)
    not_an_object = st.builds(lambda v: json.dumps(v).encode(), json_values())
    not_json = st.text(max_size=60).map(lambda t: t.encode("utf-8", "surrogatepass"))
    raw = st.binary(max_size=60)  # invalid UTF-8 among them
    huge = st.integers(100_000, 1_000_000).map(lambda n: json.dumps({"text": "word " * (n // 5)}).encode())
    blank = st.sampled_from([b"", b"   ", b"\t"])
    return st.one_of(good, good, good_with_source, wrong_text, missing, nested, not_an_object, not_json, raw, huge,
                     blank)


def valid_records(content: bytes) -> int | None:
    """The number of documents a JSONL file holds if every non-blank line is a valid record, else None (preprocess
    refuses both None and 0): each
    line (as Python's text mode splits them) is a JSON object whose "text" is a string and whose "source",
    if there, is a string."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        return None
    count = 0
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            return None
        if not (isinstance(record, dict) and isinstance(record.get("text"), str)
                and isinstance(record.get("source", ""), str)):
            return None
        count += 1
    return count


@fuzz_settings(60)
@given(lines=st.lists(jsonl_lines(), max_size=6) | st.lists(good_lines(), min_size=1, max_size=6),
       trailing_newline=st.booleans())
def test_fuzzed_jsonl_lines_end_in_a_clean_refusal_or_a_dataset_of_their_records(seed, lines, trailing_newline):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_ext.data.indexed_file import check_indexed_dataset

    case = case_dir(seed)
    content = b"\n".join(lines) + (b"\n" if trailing_newline and lines else b"")
    (case / "input.jsonl").write_bytes(content)
    outcome = run_cli_bounded(["preprocess", "--input", case / "input.jsonl", "--output-prefix", case / "out",
                               "--tokenizer", seed["model"], "--workers", "1"], cwd=case, seconds=SECONDS,
                              memory_mb=MEMORY_MB)
    assert_clean_ending(outcome, "preprocess")
    expected = valid_records(content)
    if not expected:  # an invalid line, or no document at all
        assert outcome.exit_code == 2, f"an invalid line or an empty input was accepted:\n{outcome.describe()}"
        return
    assert outcome.exit_code == 0, outcome.describe()
    check_indexed_dataset(case / "out")
    assert len(IndexedDataset(str(case / "out")).document_indices) - 1 == expected


# ----------------------------------------------------------------------------- tokenizer directories, read by `preprocess`


CUSTOM_CODE = ("import pathlib\npathlib.Path(__file__).with_name('EXECUTED').write_text('ran')\n"
               "from transformers import PreTrainedTokenizerFast\nclass EvilTokenizer(PreTrainedTokenizerFast):\n"
               "    pass\n")


def tokenizer_json_variants(seed):
    good = (seed["hf"] / "tokenizer.json").read_bytes()
    return st.just(("good", good)) | st.sampled_from([
        ("good", good), ("missing", None), ("garbage", b"\x00\xff not json {"), ("truncated", good[: len(good) // 2]),
        ("list", b"[1, 2, 3]"), ("wrong model", json.dumps({"model": {"type": "Nonexistent"}}).encode()),
        ("empty", b""), ("string", b'"tokenizer"'),
    ])


def tokenizer_config_variants():
    base = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
            "unk_token": "<unk>"}
    return st.just(("good", base)) | st.sampled_from([
        ("good", base), ("missing", None), ("garbage", b"{{{ \xfe"), ("list", []),
        ("custom code", dict(base, tokenizer_class="EvilTokenizer",
                             auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]})),
        ("remote code", dict(base, trust_remote_code=True, auto_map={"AutoTokenizer": ["evil.Evil", "evil.Evil"]})),
        ("unknown class", dict(base, tokenizer_class="NoSuchTokenizer")),
        ("eos a number", dict(base, eos_token=7)), ("eos a dict", dict(base, eos_token={"content": 3})),
        ("no eos", {k: v for k, v in base.items() if k != "eos_token"}),
        ("huge max length", dict(base, model_max_length=10**30)),
    ])


def model_config_variants():
    return st.just(("missing", None)) | st.sampled_from([
        ("missing", None), ("llama", {"model_type": "llama"}), ("unknown type", {"model_type": "nonexistent"}),
        ("garbage", b"\x00"), ("custom code", {"model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig"}}),
    ])


def write_variant(path: Path, variant) -> None:
    _, content = variant
    if content is None:
        return
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())


@fuzz_settings(40)
@given(data=st.data())
def test_fuzzed_tokenizer_directories_end_in_a_clean_refusal_or_preprocess_and_never_run_code(seed, data):
    case = case_dir(seed)
    directory = case / "tokenizer"
    directory.mkdir()
    write_variant(directory / "tokenizer.json", data.draw(tokenizer_json_variants(seed), label="tokenizer.json"))
    config_variant = data.draw(tokenizer_config_variants(), label="tokenizer_config.json")
    write_variant(directory / "tokenizer_config.json", config_variant)
    write_variant(directory / "config.json", data.draw(model_config_variants(), label="config.json"))
    (directory / "tokenization_evil.py").write_text(CUSTOM_CODE)
    (directory / "evil.py").write_text(CUSTOM_CODE)
    linked = data.draw(st.sampled_from([None] * 9 + ["tokenizer.json", "tokenizer_config.json",
                                                     "special_tokens_map.json"]), label="symlinked out of the directory")
    if linked is not None:
        outside = case / f"outside_{linked}"
        outside.write_bytes((seed["hf"] / linked).read_bytes() if (seed["hf"] / linked).is_file() else b"{}")
        (directory / linked).unlink(missing_ok=True)
        os.symlink(outside, directory / linked)
    outcome = run_cli_bounded(["preprocess", "--input", seed["corpus"], "--output-prefix", case / "out",
                               "--tokenizer", directory, "--workers", "1"], cwd=case, seconds=SECONDS,
                              memory_mb=MEMORY_MB, preload_modules=PRELOAD_WITH_TRANSFORMERS)
    assert_clean_ending(outcome, "preprocess")
    assert not (directory / "EXECUTED").exists(), f"the directory's code ran:\n{outcome.describe()}"
    if linked is not None or config_variant[0] in ("custom code", "remote code"):
        assert outcome.exit_code == 2, f"a link out of the directory or custom code was accepted:\n{outcome.describe()}"

