"""Local Hugging Face datasets as preprocessing input: a `save_to_disk` directory, Arrow and Parquet files, written by
the `datasets` library itself, read streamed into the same documents (and the same .bin/.idx bytes) as their JSONL."""
import json

import pytest

from megatron_ext.data import documents as documents_module
from megatron_ext.data.documents import check_input_files, read_documents
from megatron_ext.errors import InputError

datasets = pytest.importorskip("datasets")
pyarrow = pytest.importorskip("pyarrow")

TEXTS = [f"Document {i}: the pass key is {1000 + 37 * i}. " + ("def f(x):\n    return x ** 2  # ü, 日本語, ελληνικά\n" * (i % 4))
         for i in range(57)]
SOURCES = ["code" if i % 3 == 0 else "prose" for i in range(57)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The same rows as JSONL, a save_to_disk directory (2 shards), one Parquet file and one Arrow IPC file."""
    root = tmp_path_factory.mktemp("hf")
    table = datasets.Dataset.from_dict({"text": TEXTS, "source": SOURCES, "id": list(range(len(TEXTS)))})
    jsonl = root / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "source": s}) + "\n" for t, s in zip(TEXTS, SOURCES)))
    table.save_to_disk(str(root / "saved"), num_shards=2)
    table.to_parquet(str(root / "docs.parquet"))
    with pyarrow.OSFile(str(root / "docs.arrow"), "wb") as sink:  # the IPC file format (datasets writes streams)
        with pyarrow.ipc.new_file(sink, table.data.table.schema) as writer:
            writer.write_table(table.data.table)
    return dict(jsonl=jsonl, saved=root / "saved", parquet=root / "docs.parquet", arrow=root / "docs.arrow")


@pytest.mark.parametrize("kind", ["saved", "parquet", "arrow"])
def test_each_form_reads_the_rows_of_its_jsonl(inputs, kind):
    expected = [(d.text, d.source) for d in read_documents(inputs["jsonl"])]
    assert [(d.text, d.source) for d in read_documents(inputs[kind])] == expected
    assert len(expected) == len(TEXTS)


@pytest.mark.parametrize("kind", ["saved", "parquet", "arrow"])
def test_rows_are_read_a_batch_at_a_time(inputs, kind, monkeypatch):
    monkeypatch.setattr(documents_module, "ROWS_PER_BATCH", 5)
    shards = sorted(inputs["saved"].glob("*.arrow")) if kind == "saved" else [inputs[kind]]
    sizes = [batch.num_rows for shard in shards for batch in documents_module._record_batches(shard)]
    assert max(sizes) <= 5 and sum(sizes) == len(TEXTS)


def test_preprocess_writes_the_same_bytes_from_a_saved_dataset_with_1_and_4_workers(inputs, tmp_path):
    from megatron_ext.data import preprocess, train_sentencepiece
    from megatron_ext.data.tokenizer import SentencePieceTokenizer

    model = train_sentencepiece([inputs["jsonl"]], tmp_path / "tok", 400, seed=0)
    tokenizer = SentencePieceTokenizer(model)
    written = {}
    for name, source, workers in [("jsonl", inputs["jsonl"], 1), ("saved1", inputs["saved"], 1),
                                  ("saved4", inputs["saved"], 4)]:
        result = preprocess([source], tmp_path / name, tokenizer, workers=workers, progress=False)
        written[name] = (result.bin_path.read_bytes(), result.idx_path.read_bytes())
    assert written["saved1"] == written["saved4"] == written["jsonl"]


def test_a_dataset_dict_asks_for_one_split(tmp_path):
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]}),
                                   "test": datasets.Dataset.from_dict({"text": ["b"]})})
    splits.save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(InputError, match=r"DatasetDict: pass one split's directory to --input, e\.g\. .*/dict/train "
                                        r"\(splits: \['test', 'train'\]\)"):
        check_input_files([tmp_path / "dict"], setting="--input")


def test_a_missing_text_column_names_the_setting(inputs):
    with pytest.raises(InputError, match=r"no 'body' column \(columns: \['text', 'source', 'id'\]\); set --text-key"):
        list(read_documents(inputs["parquet"], json_key="body"))


def test_the_command_reads_a_saved_dataset_by_its_text_column(inputs, tmp_path, capsys):
    from megatron_ext.cli import main
    from megatron_ext.data import train_sentencepiece

    model = train_sentencepiece([inputs["jsonl"]], tmp_path / "tok", 400, seed=0)
    assert main(["preprocess", "--input", str(inputs["saved"]), "--output-prefix", str(tmp_path / "out"),
                 "--tokenizer", str(model), "--text-key", "text", "--workers", "1"]) == 0
    assert (tmp_path / "out.bin").stat().st_size > 0
    assert main(["preprocess", "--input", str(inputs["parquet"]), "--output-prefix", str(tmp_path / "bad"),
                 "--tokenizer", str(model), "--text-key", "body"]) == 2
    assert "no 'body' column" in capsys.readouterr().err
