"""Hostile Hugging Face model directories (issue 30, case 10): each is refused in one line (exit 2) by
`convert hf-to-mcore` and by `eval` before anything of it is read, and nothing in it runs (a marker file that its
code or its pickle would write stays absent).

The directory is made by hand in milliseconds (a 1-layer Llama config.json, safetensors from safetensors.torch, a
word-level tokenizer.json); `write_tiny_hf_dir` is also the seed of tests/test_fuzz_hf.py.
"""

import json
import os
import shutil
from pathlib import Path

import pytest

VOCAB = 64
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB, "hidden_size": 16,
          "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
          "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
          "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1, "dtype": "float32"}


def llama_tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """The tensors of a LlamaForCausalLM with `config`, by Hugging Face name."""
    hidden, ffn, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for layer in range(config["num_hidden_layers"]):
        layer_shapes = {"input_layernorm": (hidden,), "post_attention_layernorm": (hidden,),
                        "self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv, hidden),
                        "self_attn.v_proj": (kv, hidden), "self_attn.o_proj": (hidden, hidden),
                        "mlp.gate_proj": (ffn, hidden), "mlp.up_proj": (ffn, hidden), "mlp.down_proj": (hidden, ffn)}
        shapes.update({f"model.layers.{layer}.{name}.weight": shape for name, shape in layer_shapes.items()})
    return shapes


def write_tiny_hf_dir(directory: Path) -> Path:
    """A complete, loadable Hugging Face Llama directory (config, safetensors weights, tokenizer) in `directory`."""
    import torch
    from safetensors.torch import save_file
    from word_tokenizer import write_word_tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(CONFIG, indent=2))
    seed = torch.Generator().manual_seed(0)
    tensors = {name: torch.ones(shape) if name.endswith("norm.weight") else 0.1 * torch.randn(shape, generator=seed)
               for name, shape in llama_tensor_shapes(CONFIG).items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return write_word_tokenizer(directory, ["<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 3)])


@pytest.fixture
def hf_dir(tmp_path):
    return write_tiny_hf_dir(tmp_path / "model")


def run_cli(argv, capsys) -> tuple[int, str]:
    from megatron_ext.cli import main

    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def command_argv(command: str, hf_dir: Path) -> list:
    """`convert hf-to-mcore` or `eval perplexity` on `hf_dir`, writing next to it (out/, eval/, doc.txt)."""
    if command == "convert":
        return ["convert", "hf-to-mcore", "--hf", hf_dir, "--out", hf_dir.parent / "out", "--no-progress"]
    document = hf_dir.parent / "doc.txt"
    document.write_text(" ".join(f"w{i % 50}" for i in range(40)))
    return ["eval", "perplexity", "--model", hf_dir, "--data", document, "--lengths", "8",
            "--output-dir", hf_dir.parent / "eval"]


def convert(hf_dir: Path, capsys) -> tuple[int, str]:
    return run_cli(command_argv("convert", hf_dir), capsys)


def evaluate(hf_dir: Path, capsys) -> tuple[int, str]:
    return run_cli(command_argv("eval", hf_dir), capsys)


COMMANDS = {"convert": convert, "eval": evaluate}


def assert_refused(code: int, err: str, command: str, *phrases: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert lines[-1].startswith(f"megatron-ext {command.split()[0]}: "), err
    for phrase in phrases:
        assert phrase in lines[-1], lines[-1]


def header_of(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def write_with_header(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


# --- an index whose shard lies outside the directory ----------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("shard", ["../elsewhere/model.safetensors", "ABSOLUTE"])
def test_index_shard_outside_the_directory_is_refused(hf_dir, capsys, command, shard):
    elsewhere = hf_dir.parent / "elsewhere"
    elsewhere.mkdir()
    os.replace(hf_dir / "model.safetensors", elsewhere / "model.safetensors")
    shard = str(elsewhere / "model.safetensors") if shard == "ABSOLUTE" else shard
    names, _ = header_of(elsewhere / "model.safetensors")
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {name: shard for name in names if name != "__metadata__"}}))
    code, err = COMMANDS[command](hf_dir, capsys)
    assert_refused(code, err, command, "model.safetensors.index.json", shard, "outside", "inside the model directory")
    assert not (hf_dir.parent / "out").exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_index_shard_symlinked_out_of_the_directory_is_refused(hf_dir, capsys, command):
    elsewhere = hf_dir.parent / "elsewhere.safetensors"
    os.replace(hf_dir / "model.safetensors", elsewhere)
    os.symlink(elsewhere, hf_dir / "model-00001-of-00001.safetensors")
    names, _ = header_of(elsewhere)
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {name: "model-00001-of-00001.safetensors" for name in names if name != "__metadata__"}}))
    code, err = COMMANDS[command](hf_dir, capsys)
    assert_refused(code, err, command, "model-00001-of-00001.safetensors is a symlink to", "refusing to read it")


# --- safetensors headers that lie -----------------------------------------------------------------


def _first_tensor(header: dict) -> str:
    return sorted(name for name in header if name != "__metadata__")[0]


def _absurd_end(header, data):
    header[_first_tensor(header)]["data_offsets"] = [0, 10**12]


def _overlap(header, data):
    names = sorted((entry["data_offsets"], name) for name, entry in header.items() if name != "__metadata__")
    second = header[names[1][1]]
    second["data_offsets"] = [o - 4 for o in second["data_offsets"]]


def _shape_disagrees(header, data):
    header[_first_tensor(header)]["shape"] = [10**6, 10**6]


def _negative(header, data):
    header[_first_tensor(header)]["data_offsets"] = [-8, 0]


HEADER_LIES = {  # how the header lies -> what the refusal says
    "absurd offsets (1 TB)": (_absurd_end, "not a byte range inside the file"),
    "overlapping tensors": (_overlap, "overlaps the tensor before it"),
    "shape disagrees with its bytes": (_shape_disagrees, "but its data_offsets span"),
    "negative offset": (_negative, "not a byte range inside the file"),
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("lie", HEADER_LIES)
def test_safetensors_header_that_lies_is_refused_before_allocating(hf_dir, capsys, command, lie):
    mutate, phrase = HEADER_LIES[lie]
    path = hf_dir / "model.safetensors"
    header, data = header_of(path)
    mutate(header, data)
    write_with_header(path, header, data)
    code, err = COMMANDS[command](hf_dir, capsys)
    assert_refused(code, err, command, str(path.name), "tensor ", phrase)


@pytest.mark.parametrize("command", COMMANDS)
def test_safetensors_header_length_beyond_the_file_is_refused(hf_dir, capsys, command):
    path = hf_dir / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes((2**62).to_bytes(8, "little") + raw[8:])
    code, err = COMMANDS[command](hf_dir, capsys)
    assert_refused(code, err, command, "model.safetensors is not a safetensors file", "header length")


def test_safetensors_reader_reads_a_sound_file_and_refuses_a_truncated_one(hf_dir):
    import torch
    from safetensors.torch import load_file

    from megatron_ext.convert.hf_io import SafetensorsCheckpoint
    from megatron_ext.errors import ConversionError

    source = SafetensorsCheckpoint(hf_dir)
    expected = load_file(str(hf_dir / "model.safetensors"))
    assert set(source.shapes) == set(expected)
    assert all(torch.equal(source.read(name), tensor) for name, tensor in expected.items())
    path = hf_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(ConversionError, match="cut short"):
        SafetensorsCheckpoint(hf_dir)


# --- a tokenizer or model that asks for custom code -----------------------------------------------


CODE = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\n"


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("where", ["tokenizer_config.json", "config.json"])
def test_custom_code_is_refused_and_never_runs(hf_dir, capsys, command, where):
    marker = hf_dir.parent / "EXECUTED"
    (hf_dir / "tokenization_evil.py").write_text(
        CODE.format(marker=str(marker)) + "from transformers import PreTrainedTokenizerFast\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    (hf_dir / "modeling_evil.py").write_text(CODE.format(marker=str(marker)))
    settings = json.loads((hf_dir / where).read_text())
    if where == "tokenizer_config.json":
        settings.update(tokenizer_class="EvilTokenizer",
                        auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]})
    else:
        settings["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (hf_dir / where).write_text(json.dumps(settings))
    code, err = COMMANDS[command](hf_dir, capsys)
    assert_refused(code, err, command, where, "asks for custom code", "auto_map", "never runs")
    assert not marker.exists()


# --- pickle-only weights ----------------------------------------------------------------------------


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("command", COMMANDS)
def test_pickle_only_weights_are_refused_and_never_unpickled(hf_dir, capsys, command):
    import torch

    marker = hf_dir.parent / "EXECUTED"
    (hf_dir / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": _RunsCode(marker)}, hf_dir / "pytorch_model.bin")
    code, err = COMMANDS[command](hf_dir, capsys)
    assert_refused(code, err, command, "pytorch_model.bin holds pickle weights", "never loads",
                   "safe_serialization=True")
    assert not marker.exists()


def test_load_harpe_model_never_falls_back_to_pickles(hf_dir):
    from megatron_ext.hf import load_harpe_model

    with pytest.raises(ValueError, match="safetensors weights only"):
        load_harpe_model(hf_dir, use_safetensors=False)


# --- a tokenizer file symlinked out of the directory --------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "config.json"])
def test_file_symlinked_out_of_the_directory_is_refused(hf_dir, capsys, command, name):
    outside = hf_dir.parent / f"secret-{name}"
    shutil.copy(hf_dir / name, outside)
    (hf_dir / name).unlink()
    os.symlink(outside, hf_dir / name)
    code, err = COMMANDS[command](hf_dir, capsys)
    assert_refused(code, err, command, f"{name} is a symlink to {outside}", "refusing to read it",
                   "Replace the link with the file itself")


@pytest.mark.parametrize("command", COMMANDS)
def test_a_directory_under_a_weight_file_name_is_refused(hf_dir, capsys, command):
    os.replace(hf_dir / "model.safetensors", hf_dir / "weights")
    (hf_dir / "model.safetensors").mkdir()
    code, err = COMMANDS[command](hf_dir, capsys)
    assert_refused(code, err, command, "model.safetensors is not a regular file")


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_a_fifo_under_a_tokenizer_file_name_is_refused_not_waited_on(tmp_path, command):
    """Reading a FIFO waits for a writer forever: run in a bounded child (tests/fuzz_harness.py)."""
    from fuzz_harness import assert_clean_ending, run_cli_bounded

    model = write_tiny_hf_dir(tmp_path / "model")
    (model / "tokenizer.json").unlink()
    os.mkfifo(model / "tokenizer.json")
    outcome = run_cli_bounded(command_argv(command, model), seconds=30, memory_mb=2048)
    assert_clean_ending(outcome, command)
    assert outcome.exit_code == 2 and "tokenizer.json is not a regular file" in outcome.stderr, outcome.describe()


def test_hub_cache_links_and_a_sound_directory_pass(tmp_path):
    """The hub cache's snapshots/<rev>/ -> blobs/ links are no escape; a plain sound directory passes every check."""
    from megatron_ext.convert.hf_directory import check_hf_directory

    plain = write_tiny_hf_dir(tmp_path / "plain")
    assert check_hf_directory(plain) == [plain / "model.safetensors"]
    repo = tmp_path / "models--tiny"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for index, file in enumerate(sorted(plain.iterdir())):
        shutil.copy(file, blobs / f"blob{index}")
        os.symlink(Path("..") / ".." / "blobs" / f"blob{index}", snapshot / file.name)
    assert check_hf_directory(snapshot) == [snapshot / "model.safetensors"]


# --- config.json values of the wrong kind, and sizes its weights cannot fill ------------------------------


WRONG_KINDS = {  # field -> (value, what the refusal says it must be)
    "attention_dropout": (None, "not a number from 0 to 1"),
    "attention_bias": ("yes", "not true or false"),
    "hidden_size": ("64", "not an integer from 1 to"),
    "num_key_value_heads": (-1, "not null or an integer from 1 to"),
    "rms_norm_eps": (float("nan"), "not a number between 0 and 1"),
    "rope_scaling": ([1, 2], "not null or an object of RoPE settings"),
    "architectures": ("LlamaForCausalLM", "not a list of class names"),
}
ROPE_WRONG_KINDS = {  # RoPE setting -> (value, what the refusal says it must be)
    "long_factor": ("a", "not null or a list of finite numbers"),  # was a TypeError in transformers' forward
    "factor": ("x", "not null or a finite number"),
    "rope_type": (3, "not a string"),
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("field", WRONG_KINDS)
def test_config_value_of_the_wrong_kind_is_refused_by_name(hf_dir, capsys, command, field):
    value, phrase = WRONG_KINDS[field]
    settings = json.loads((hf_dir / "config.json").read_text())
    settings[field] = value
    (hf_dir / "config.json").write_text(json.dumps(settings))
    code, err = COMMANDS[command](hf_dir, capsys)
    assert_refused(code, err, command, "config.json", f"{field} is {value!r}", phrase)


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("key", ROPE_WRONG_KINDS)
def test_rope_setting_of_the_wrong_kind_is_refused_by_name(hf_dir, capsys, command, key):
    value, phrase = ROPE_WRONG_KINDS[key]
    settings = json.loads((hf_dir / "config.json").read_text())
    settings["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 4,
                                   "long_factor": [1.0] * 4, "factor": 2.0, key: value}
    (hf_dir / "config.json").write_text(json.dumps(settings))
    code, err = COMMANDS[command](hf_dir, capsys)
    assert_refused(code, err, command, "config.json", f"rope_parameters.{key} is {value!r}", phrase)


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("field, value", [("hidden_size", 2**20), ("num_hidden_layers", 10**6),
                                          ("vocab_size", 2**31 - 1), ("intermediate_size", 2**30)])
def test_config_claiming_a_model_its_weights_cannot_fill_is_refused_before_allocating(tmp_path, command, field,
                                                                                       value):
    """Run in a forked child with a memory bound (tests/fuzz_harness.py): without the check it asks for gigabytes
    to terabytes (a MemoryError traceback, or a kill for the bound), with it one line within a second."""
    from fuzz_harness import assert_clean_ending, run_cli_bounded

    model = write_tiny_hf_dir(tmp_path / "model")
    settings = json.loads((model / "config.json").read_text())
    settings[field] = value
    (model / "config.json").write_text(json.dumps(settings))
    outcome = run_cli_bounded(command_argv(command, model), seconds=60, memory_mb=2048)
    assert_clean_ending(outcome, command)
    assert outcome.exit_code == 2 and "implies a model of" in outcome.stderr, outcome.describe()
    assert outcome.seconds < 10, outcome.describe()


def test_a_model_transformers_fails_to_build_is_refused_in_one_line(hf_dir, capsys):
    """longrope factors of the wrong length pass the field checks (lists of numbers); transformers' model fails to
    build (a RuntimeError deep in its RoPE init): one line naming the directory and transformers' reason."""
    settings = json.loads((hf_dir / "config.json").read_text())
    settings["rope_parameters"] = {"rope_type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 3,
                                   "rope_theta": 10000.0, "original_max_position_embeddings": 64}
    (hf_dir / "config.json").write_text(json.dumps(settings))
    code, err = evaluate(hf_dir, capsys)
    assert_refused(code, err, "eval", "transformers cannot read its model", "RuntimeError")


def test_a_sound_directory_still_converts_and_evaluates(hf_dir, capsys):
    """The checks refuse nothing of a plain directory: it converts and its perplexity is computed."""
    code, err = convert(hf_dir, capsys)
    assert code == 0 and (hf_dir.parent / "out" / "latest").exists(), err
    code, err = evaluate(hf_dir, capsys)
    assert code == 0 and (hf_dir.parent / "eval" / "perplexity.json").exists(), err
