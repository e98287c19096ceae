"""The rules for the files of a Hugging Face directory, one place for the tokenizer layer and conversion
(megatron_ext/data/model_directory.py), and what the tokenizer layer makes of transformers' failures: one line
naming the directory when transformers fails on the files, a traceback when megatron_ext's own code fails."""

import json
import os

import pytest

from megatron_ext.data import model_directory
from megatron_ext.errors import ConversionError, InputError
from test_data_hostile import hf_tokenizer  # noqa: F401 - the fixture: a loadable word-level tokenizer directory


# ----------------------------------------------------------------------------- the shared rules


def test_files_must_lie_inside_the_directory_hub_cache_blobs_excepted(tmp_path):
    repo = tmp_path / "models--org--name"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    (blobs / "f00d").write_text("{}")
    (snapshot / "config.json").symlink_to(blobs / "f00d")
    assert model_directory.require_inside(snapshot, snapshot / "config.json") == snapshot / "config.json"
    (tmp_path / "secret").write_text("{}")
    (snapshot / "tokenizer.json").symlink_to(tmp_path / "secret")
    with pytest.raises(ConversionError, match=rf"{snapshot}/tokenizer.json is a symlink to {tmp_path}/secret, "
                                              rf"outside the model directory {snapshot}: refusing to copy it"):
        model_directory.require_inside(snapshot, snapshot / "tokenizer.json", error=ConversionError,
                                       what="model directory", action="copy it")
    with pytest.raises(InputError, match=r"resolves to .*secret, outside the directory"):
        model_directory.require_inside(snapshot, snapshot / ".." / ".." / ".." / "secret")


def test_present_files_must_be_regular_and_absent_ones_are_skipped(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "vocab.json").mkdir()
    model_directory.check_present_files(tmp_path, ["config.json", "merges.txt"])
    with pytest.raises(InputError, match=rf"{tmp_path}/vocab.json is not a regular file"):
        model_directory.check_present_files(tmp_path, ["config.json", "vocab.json"])
    os.mkfifo(tmp_path / "merges.txt")  # never opened: a FIFO would block the reader
    with pytest.raises(InputError, match=rf"{tmp_path}/merges.txt is not a regular file"):
        model_directory.check_present_files(tmp_path, ["merges.txt"])


def test_custom_code_is_refused_by_the_keys_a_reader_loads(tmp_path):
    """A tokenizer reader loads no model class: config.json's AutoModel code concerns it not, AutoTokenizer's does;
    a model reader refuses any auto_map."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama",
                                                      "auto_map": {"AutoModelForCausalLM": "modeling_x.X"}}))
    tokenizer_reader = {"tokenizer_config.json": None, "config.json": "AutoTokenizer"}
    model_directory.refuse_custom_code(tmp_path, tokenizer_reader)
    with pytest.raises(ConversionError, match=r"config.json asks for custom code \(auto_map AutoModelForCausalLM: "
                                              r"modeling_x.X\), which megatron_ext never runs .*\(model_type\)"):
        model_directory.refuse_custom_code(tmp_path, {"config.json": None}, error=ConversionError)
    (tmp_path / "config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["tokenization_x.X", None]}}))
    with pytest.raises(InputError, match=r"config.json asks for custom code \(auto_map AutoTokenizer: "):
        model_directory.refuse_custom_code(tmp_path, tokenizer_reader)
    (tmp_path / "config.json").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"auto_map": "tokenization_x.X"}))
    with pytest.raises(InputError, match=r"tokenizer_config.json asks for custom code .*\(tokenizer_class\)"):
        model_directory.refuse_custom_code(tmp_path, tokenizer_reader)


def test_settings_files_are_bounded_json_objects(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    for text, says in (("{bad", "is not valid JSON"), ("[1]", "holds a JSON list, not an object"),
                       ("[" * 100_000, "is not valid JSON")):
        path.write_text(text)
        with pytest.raises(ConversionError, match=says):
            model_directory.read_json_object(path, error=ConversionError)
    monkeypatch.setattr(model_directory, "MAX_JSON_BYTES", 4)
    path.write_text('{"a": 1}')
    with pytest.raises(InputError, match=r"config.json is 8 bytes, more than any model's config.json \(4 at most\)"):
        model_directory.read_json_object(path)


def test_an_exception_is_ours_when_megatron_ext_raised_it():
    def ours():
        model_directory.in_hub_cache(None, None)  # AttributeError raised in megatron_ext's own frame

    with pytest.raises(AttributeError) as caught:
        ours()
    assert model_directory.raised_in_megatron_ext(caught.value)
    with pytest.raises(json.JSONDecodeError) as caught:
        json.loads("{")  # raised in the standard library, as a library reading a file raises
    assert not model_directory.raised_in_megatron_ext(caught.value)


# ----------------------------------------------------------------------------- the tokenizer layer uses them


def test_a_tokenizer_file_that_is_no_regular_file_is_refused_before_transformers_reads_it(hf_tokenizer):
    """Before the shared rules the tokenizer layer checked links only: a directory under a file's name reached
    transformers (IsADirectoryError), a FIFO there blocked preprocess forever."""
    from megatron_ext.data.tokenizer_files import HuggingFaceFiles, TokenizerError

    (hf_tokenizer / "special_tokens_map.json").mkdir()
    with pytest.raises(TokenizerError, match=rf"{hf_tokenizer}/special_tokens_map.json is not a regular file"):
        HuggingFaceFiles(hf_tokenizer)


def test_preprocess_names_a_tokenizer_whose_config_json_transformers_refuses(hf_tokenizer, tmp_path, capsys):
    """A config.json field of the wrong type fails in huggingface_hub's strict dataclass validation (a
    StrictDataclassFieldValidationError, no OSError or ValueError) while AutoTokenizer picks the class: one line
    naming the directory, for every command that reads a tokenizer (here preprocess; train checks its data with the
    same encoder before any process)."""
    from megatron_ext.cli import main

    (hf_tokenizer / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": "many"}))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"text": "hello world"}) + "\n")
    code = main(["preprocess", "--input", str(corpus), "--output-prefix", str(tmp_path / "out"),
                 "--tokenizer", str(hf_tokenizer), "--workers", "1"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err, err
    assert lines[-1].startswith(f"megatron-ext preprocess: tokenizer directory '{hf_tokenizer}' does not load in "
                                "transformers (StrictDataclassFieldValidationError: Validation error for field "
                                "'vocab_size'"), err
    assert not (tmp_path / "out.bin").exists()


def test_a_failure_in_megatron_ext_code_while_reading_a_tokenizer_keeps_its_traceback(hf_tokenizer, monkeypatch):
    """Any failure raised inside transformers is the files' fault and becomes one line; one raised by our own
    code is a bug and is not disguised as a refusal of the user's directory."""
    import transformers

    from megatron_ext.data.tokenizer_files import HuggingFaceFiles, TokenizerError

    def from_pretrained(*args, **kwargs):
        return model_directory.in_hub_cache(None, None)  # AttributeError in a megatron_ext frame

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", from_pretrained)
    with pytest.raises(AttributeError):
        HuggingFaceFiles(hf_tokenizer)

    def transformers_fails(*args, **kwargs):
        raise KeyError("model_type")  # raised outside megatron_ext, as transformers raises on a file's content

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", transformers_fails)
    with pytest.raises(TokenizerError, match=r"does not load in transformers \(KeyError: 'model_type'\)"):
        HuggingFaceFiles(hf_tokenizer)
