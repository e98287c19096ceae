"""Hostile and broken training configs (issue 30, cases 2, 3, 6 and 15): each is refused in one line naming the
setting (or the file) and the fix, fast and before any work, where it used to exhaust memory, hang, or end in a
traceback after start-up."""

import time

import pytest
import yaml

from megatron_ext.config import ConfigError, load_config
from megatron_ext.config.reader import MAX_CONFIG_VALUES, load_yaml

TINY = "data: {tiny_corpus: true}\n"


def write(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def load(tmp_path, text: str, overrides=()):
    return load_config(write(tmp_path, text), list(overrides), check_files=False)


def refused(tmp_path, text: str, match: str, overrides=()) -> str:
    with pytest.raises(ConfigError, match=match) as caught:
        load(tmp_path, text, overrides)
    message = str(caught.value)
    assert "\n" not in message and len(message) < 600, message
    return message


def laughs(anchor_value: str, levels: int = 9) -> str:
    """A "billion laughs" document: each level a list of ten aliases of the one before, 10^levels values."""
    lines = [f"l0: &l0 {anchor_value}"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


# --- case 2: YAML aliases bounded; wrong shapes refused by name --------------------------------------------------


@pytest.mark.parametrize("setting", [
    "data:\n  tiny_corpus: true\n  train_data_weights: *l9\n",
    "rope:\n  head_base_strategy: uniform\n  head_base_params: {b_min: *l9, b_max: 2}\n" + TINY,
    "parallel:\n  hierarchical_context_parallel_sizes: *l9\n" + TINY,
])
def test_billion_laughs_are_refused_at_once_naming_the_file(tmp_path, setting):
    """These three expanded for minutes into a MemoryError; the document's expanded size is now counted
    without expanding it."""
    text = laughs("[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]").replace("l", "x") + setting.replace("*l", "*x")
    started = time.monotonic()
    message = refused(tmp_path, text, rf"c\.yaml: the document stands for more than {MAX_CONFIG_VALUES} values "
                                      r"once its YAML aliases \(\*name\) are expanded")
    assert time.monotonic() - started < 2, "counted, not expanded"
    assert "alias less" in message


def test_an_alias_inside_itself_is_refused(tmp_path):
    refused(tmp_path, "rope:\n  head_base_params: &a {b_min: *a}\n" + TINY, r"c\.yaml: a YAML alias refers to a "
                                                                            r"value that contains it")


def test_a_modest_alias_still_works(tmp_path):
    """Aliases that share a value are fine: the bound is on the expanded document, not on aliases."""
    text = "optimizer: {lr: &lr 1.0e-3, min_lr: *lr}\nmodel: {seq_length: &n 256}\npose: {target_length: *n}\n"
    config = load(tmp_path, text + TINY)
    assert config.optimizer.min_lr == config.optimizer.lr == 1e-3 and config.pose.target_length == 256


def test_deep_nesting_and_broken_yaml_are_one_line(tmp_path):
    refused(tmp_path, "rope: {scaling_params: {x: " + "[" * 5000 + "]" * 5000 + "}}\n" + TINY,
            r"c\.yaml: values nested more than 32 levels deep")
    refused(tmp_path, TINY + "model: [\n", r"c\.yaml: not valid YAML \(expected the node content, but found "
                                          r"'<stream end>' at line 3, column 1\): fix the syntax")
    (tmp_path / "c.yaml").write_bytes(b"data: {tiny_corpus: true}\n# \xff\xfe\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: not UTF-8 text"):
        load_config(tmp_path / "c.yaml", check_files=False)
    with pytest.raises(ConfigError, match=r"override 'model.num_layers=\[': not valid YAML"):
        load(tmp_path, TINY, ["model.num_layers=["])


def test_a_file_too_large_for_a_config_is_refused_unread(tmp_path):
    path = tmp_path / "c.yaml"
    with open(path, "w") as f:
        f.write(TINY + "# " + "x" * (17 * 2**20) + "\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: \d+ bytes is more than a config holds \(at most 16 MiB\)"):
        load_config(path, check_files=False)


@pytest.mark.parametrize("path", ["/dev/zero", "/"])
def test_a_config_that_is_not_a_regular_file_is_refused_unread(path):
    with pytest.raises(ConfigError, match=rf"--config {path}: not a regular file; give a YAML file"):
        load_config(path, check_files=False)


def test_a_huge_unknown_key_is_named_short_and_fast(tmp_path):
    started = time.monotonic()
    text = TINY + "model:\n  ? " + "k" * 200_000 + "\n  : 1\n"  # YAML's explicit key: plain ones stop at 1024
    message = refused(tmp_path, text, r"unknown key 'model\.kkkk")
    assert time.monotonic() - started < 2 and "..." in message


def test_load_yaml_counts_without_expanding():
    document = load_yaml(laughs("[1, 2]", levels=3))  # 2000 values: under the bound, read as written
    assert len(document["l3"]) == 10 and document["l3"][0][0][0] == [1, 2]


def test_train_data_as_a_list_of_lists_is_refused_by_name(tmp_path):
    """It reached the data code as `can only concatenate list (not "str") to list`."""
    message = refused(tmp_path, "data: {train_data: [[a, b], c], tokenizer: t.model}\n",
                      r"data\.train_data\[0\]: \['a', 'b'\] \(a list\) is not a path")
    assert "data.train_data takes a list of paths" in message


@pytest.mark.parametrize("upsample, match", [
    ("{web: [1, 2]}", r"data\.upsample\.web: \[1, 2\] \(a list\) is not a mapping of strings to integers"),
    ("[[web, 1]]", r"data\.upsample: \[\['web', 1\]\] \(a list\) is not a mapping"),
    ("{web: {min_tokens: 1}}", r"data\.upsample\.web has keys \['min_tokens'\]: give exactly min_tokens and factor"),
    ("{web: {min_tokens: x, factor: 2}}", r"data\.upsample\.web\.min_tokens: 'x' \(a string\) is not an integer"),
    ("{web: {min_tokens: 1, factor: 1000000000000}}", r"data\.upsample\.web\.factor \(1e\+12\) must be in \[1, 1000\]"),
    ("{web: {min_tokens: -1, factor: 2}}", r"data\.upsample\.web\.min_tokens \(-1\) must be >= 0"),
])
def test_upsample_of_the_wrong_shape_is_refused_by_name(tmp_path, upsample, match):
    """A list where a rule belongs reached the tiny corpus as `list indices must be integers`."""
    refused(tmp_path, f"data: {{tiny_corpus: true, upsample: {upsample}}}\n", match)


# --- case 3: every value checked against its declared type, nested ones included ---------------------------------


@pytest.mark.parametrize("text, match", [
    ("data: {tiny_corpus: true, train_data_weights: [1.0, heavy]}",
     r"data\.train_data_weights\[1\]: 'heavy' \(a string\) is not a number; data\.train_data_weights takes a list "
     r"of numbers or null"),
    ("data: {tiny_corpus: true, valid_data: [a, {b: 1}]}", r"data\.valid_data\[1\]: \{'b': 1\} \(a mapping\) is not "
                                                           r"a path"),
    ("data: {tiny_corpus: true, valid_data: a}", r"data\.valid_data: 'a' \(a string\) is not a list of paths"),
    ("parallel: {hierarchical_context_parallel_sizes: [2, 1.5]}\n" + TINY,
     r"parallel\.hierarchical_context_parallel_sizes\[1\]: 1\.5 \(a number\) is not an integer"),
    ("training: {rampup_batch_size: [4, 4, '1000']}\n" + TINY, r"training\.rampup_batch_size\[2\]: '1000' \(a string\) "
                                                               r"is not an integer"),
    ("rope: {head_base_params: [1, 2]}\n" + TINY, r"rope\.head_base_params: \[1, 2\] \(a list\) is not a mapping"),
    ("rope: {scaling_params: 4}\n" + TINY, r"rope\.scaling_params: 4 \(an integer\) is not a mapping"),
    ("logging: {profile: [5, 7]}\n" + TINY, r"logging\.profile: \[5, 7\] \(a list\) is not a mapping or null"),
    ("training: {fp8: 3}\n" + TINY, r"training\.fp8: 3 \(an integer\) is not a string or true or false"),
    ("data: {tiny_corpus: true, split: 98}", r"data\.split: 98 \(an integer\) is not a string or null"),
    ("model: {num_query_groups: '2'}\n" + TINY, r"model\.num_query_groups: '2' \(a string\) is not an integer or null"),
    ("model: {swiglu: 1}\n" + TINY, r"model\.swiglu: 1 \(an integer\) is not true or false"),
    ("model: {num_layers: true}\n" + TINY, r"model\.num_layers: True \(a boolean\) is not an integer"),
    ("model: {num_layers: null}\n" + TINY, r"model\.num_layers: null is not allowed; give an integer"),
    ("model: 4\n" + TINY, r"model: expected a mapping of settings, got 4 \(an integer\)"),
    ("data: {tiny_corpus: true, cache_dir: 2020-01-01}", r"data\.cache_dir: datetime\.date\(2020, 1, 1\) \(a date\) "
                                                         r"is not a path"),
    ("data: {tiny_corpus: true, upsample: {7: {min_tokens: 1, factor: 2}}}",
     r"data\.upsample key 7: 7 \(an integer\) is not a string"),
])
def test_nested_values_of_the_wrong_type_are_refused_by_name(tmp_path, text, match):
    refused(tmp_path, text + "\n", match)


def test_declared_types_are_read_generically():
    """megatron_ext/config/types.py reads any hint: tuples, Literal, dicts of numbers, unions."""
    from typing import Literal

    from megatron_ext.config.types import ConfigTypeError, check_value

    assert check_value([1, 2], list[float], "k") == [1.0, 2.0]
    assert check_value([1, "a"], tuple[int, str], "k") == (1, "a")
    assert check_value([1, 2, 3], tuple[int, ...], "k") == (1, 2, 3)
    assert check_value({"a": 1}, dict[str, float], "k") == {"a": 1.0}
    assert check_value("max", Literal["most_recent", "max"], "k") == "max"
    assert check_value(None, int | None, "k") is None
    assert check_value(3, int | list[int], "k") == 3 and check_value([3], int | list[int], "k") == [3]
    for value, hint, match in [
        ([1, 2, 3], tuple[int, str], r"k: \[1, 2, 3\] \(a list\) is not a list of 2 items \(an integer, a string\)"),
        ({"a": "x"}, dict[str, float], r"k\.a: 'x' \(a string\) is not a number; k takes a mapping of strings to "
                                       r"numbers"),
        ("min", Literal["most_recent", "max"], r"k: 'min' \(a string\) is not one of most_recent, max"),
        (True, Literal[1, 2], r"k: True \(a boolean\) is not one of 1, 2"),
        ("x" * 1000, int, r"k: 'xxxx.*\.\.\. \(a string\) is not an integer"),
    ]:
        with pytest.raises(ConfigTypeError, match=match) as caught:
            check_value(value, hint, "k")
        assert len(str(caught.value)) < 200


@pytest.mark.parametrize("setting", ["checkpoint.dir", "checkpoint.pretrained", "checkpoint.resume", "data.cache_dir",
                                     "data.tokenizer", "logging.metrics_file", "logging.tensorboard_dir"])
def test_paths_no_file_system_takes_are_refused_when_read(tmp_path, setting):
    """A NUL in checkpoint.dir or a path over the system's limits ended in a ValueError / OSError traceback from the
    checkpoint code; path settings (config/types.py FilePath) are checked when the config is read."""
    for value, match in [('"a\\0b"', r"'a\\x00b' \(a string\) contains a NUL character"),
                         ('"' + "x" * 5000 + '"', r"a path of 5000 bytes is longer than the system's limit \(4096\)"),
                         ('"runs/' + "n" * 300 + '/x"', r"'runs/nnn.*\.\.\. \(a string\) has a component of 300 bytes, longer than a file name can be "
                                                       r"\(255\)")]:
        refused(tmp_path, TINY, rf"{setting}: {match}", [f"{setting}={value}"])
    refused(tmp_path, 'data: {train_data: [ok, "a\\0b"], tokenizer: t.model}\n',
            r"data\.train_data\[1\]: 'a\\x00b' \(a string\) contains a NUL character")


# --- case 6: non-finite and absurd numbers -----------------------------------------------------------------------


@pytest.mark.parametrize("lr, match", [
    ("1e39", r"optimizer\.lr: 1e\+39 \(a number\) is not a finite number within float32's range"),
    (".inf", r"optimizer\.lr: inf \(a number\) is not a finite number"),
    (".nan", r"optimizer\.lr: nan \(a number\) is not a finite number"),
    ("1e300", r"optimizer\.lr: 1e\+300 \(a number\) is not a finite number within float32's range"),
    ("5.0", r"optimizer\.lr \(5\.0\) must be at most 1\.0: Adam moves every weight by about lr per step"),
])
def test_an_absurd_learning_rate_is_refused_at_validation(tmp_path, lr, match):
    """lr 1e39 is inf in fp32: it trained into an exit 1, not even the non-finite stop's exit 2."""
    refused(tmp_path, f"optimizer: {{lr: {lr}}}\n" + TINY, match)


@pytest.mark.parametrize("text, match", [
    ("optimizer: {weight_decay: 1e30}", r"optimizer\.weight_decay \(1e\+30\) must be >= 0 with lr x weight_decay < 1"),
    ("optimizer: {weight_decay: -0.1}", r"optimizer\.weight_decay \(-0\.1\) must be >= 0"),
    ("model: {init_method_std: -.inf}", r"model\.init_method_std: -inf \(a number\) is not a finite number"),
    ("rope: {base: 1e40}", r"rope\.base: 1e\+40 \(a number\) is not a finite number"),
    ("data: {train_data_weights: [1.0, .nan], tiny_corpus: true}",
     r"data\.train_data_weights\[1\]: nan \(a number\) is not a finite number"),
    ("rope: {head_base_params: {b_min: .inf}}", r"rope\.head_base_params\.b_min: inf \(a number\) is not a finite "
                                                r"number"),
    ("logging: {profile: {start_iter: 1, end_iter: [.nan]}}", r"logging\.profile\.end_iter\[0\]: nan \(a number\) "
                                                              r"is not a finite number"),
])
def test_non_finite_numbers_are_refused_wherever_numbers_are_declared(tmp_path, text, match):
    refused(tmp_path, text + "\n" + ("" if "tiny_corpus" in text else TINY), match)


# --- case 15: huge values and zero or negative sizes ------------------------------------------------------------


@pytest.mark.parametrize("text, match", [
    ("training: {train_iters: 1000000000000}", r"training\.train_iters \(1e\+12\) must be <= 2\.15e\+09: far beyond"),
    ("training: {train_iters: 100000000000000000000000000000}",
     r"training\.train_iters: 100000000000000000000000000000 \(an integer\) does not fit in a 64-bit integer"),
    ("training: {global_batch_size: 4000000000000}", r"training\.global_batch_size \(4e\+12\) must be <= 1048576"),
    ("training: {train_iters: 1000000, global_batch_size: 1000000}",
     r"training\.train_iters x training\.global_batch_size = 1000000 x 1000000 = 1e\+12 samples, more than 8\.59e\+09"),
    ("model: {seq_length: 1000000000}", r"model\.seq_length \(1e\+09\) must be <= 1\.68e\+07"),
    ("model: {ffn_hidden_size: 0}", r"model\.ffn_hidden_size \(0\) must be >= 1"),
    ("model: {ffn_hidden_size: -8}", r"model\.ffn_hidden_size \(-8\) must be >= 1"),
    ("model: {num_query_groups: 0}", r"model\.num_query_groups \(0\) must be >= 1"),
    ("model: {vocab_size: -5}", r"model\.vocab_size \(-5\) must be >= 2"),
    ("model: {num_layers: 100000, hidden_size: 65536, num_attention_heads: 64}",
     r"model\.num_layers \(100000\) must be <= 1024"),
    ("model: {num_layers: 1024, hidden_size: 131072, num_attention_heads: 64, ffn_hidden_size: 1048576}",
     r"the model has 4\.93e\+14 parameters"),
    ("pose: {enabled: true, target_length: 1024, num_chunks: 0, variant: paper}", r"pose\.num_chunks \(0\) must be >= 1"),
    ("pose: {enabled: true, target_length: 1024, num_chunks: 300, variant: paper}",
     r"pose\.num_chunks \(300\) must be at most model\.seq_length \(256\)"),
    ("model: {num_query_groups: 1}\nparallel: {tensor_model_parallel_size: 2}",
     r"parallel\.tensor_model_parallel_size \(2\) must divide the 1 KV groups"),
    ("training: {seed: -1}", r"training\.seed \(-1\) must be >= 0"),
    ("training: {seed: 4294967296}", r"training\.seed \(4\.29e\+09\) must be <= 4\.29e\+09"),
    ("data: {tiny_corpus: true, tiny_corpus_documents: 1000000000000}",
     r"data\.tiny_corpus_documents \(1e\+12\) must be <= 1000000"),
    ("training: {eval_iters: 0}", r"training\.eval_iters \(0\) must be >= 1"),
    ("checkpoint: {keep_last: 0}", r"checkpoint\.keep_last \(0\) must be >= 1"),
    ("optimizer: {warmup_iters: -1}", r"optimizer\.warmup_iters \(-1\) must be >= 0"),
    ("logging: {gpu_peak_tflops: 0}", r"logging\.gpu_peak_tflops \(0\.0\) must be > 0"),
])
def test_huge_and_non_positive_sizes_are_refused_at_validation(tmp_path, text, match):
    refused(tmp_path, text + "\n" + ("" if "tiny_corpus" in text else TINY), match)


def test_a_vocabulary_smaller_than_the_tiny_tokenizer_is_refused(tmp_path):
    """vocab_size 10 trained into an IndexError in the first step; `plan` (check_files=False) plans the shape."""
    path = write(tmp_path, "model: {vocab_size: 10}\n" + TINY)
    with pytest.raises(ConfigError, match=r"model\.vocab_size \(10\) is smaller than the tiny corpus' tokenizer "
                                          r"\(data\.tokenizer_vocab_size 2000\)"):
        load_config(path)
    assert load_config(path, check_files=False).model.vocab_size == 10


def test_the_bounds_leave_real_runs_alone(tmp_path):
    """A 405B-class shape at 1M tokens, a long run at a large batch: inside every bound."""
    text = ("model: {num_layers: 126, hidden_size: 16384, num_attention_heads: 128, num_query_groups: 8, "
            "ffn_hidden_size: 53248, vocab_size: 128256, seq_length: 1048576}\n"
            "training: {train_iters: 1000000, global_batch_size: 2048, micro_batch_size: 1}\n"
            "parallel: {tensor_model_parallel_size: 8, pipeline_model_parallel_size: 2, context_parallel_size: 16}\n"
            "checkpoint: {from_scratch: true}\n" + TINY.replace("tiny_corpus: true", "tiny_corpus: true, "
                                                                                   "tokenizer_vocab_size: 2000"))
    config = load(tmp_path, text)
    assert config.model.seq_length == 2**20 and config.training.train_iters == 10**6


# --- the command: one line, exit 2, fast, small ------------------------------------------------------------------


@pytest.mark.slow  # the first case imports megatron-core and the trainer once (the harness forks from them)
@pytest.mark.parametrize("text", [
    laughs("[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]") + "data: {tiny_corpus: true, train_data_weights: *l9}\n",
    "optimizer: {lr: 1e39}\n" + TINY,
    "model: {ffn_hidden_size: 0}\n" + TINY,
    "data: {train_data: [[a, b], c], tokenizer: t.model}\n",
])
def test_train_refuses_in_one_line_within_bounds(tmp_path, text):
    from fuzz_harness import assert_clean_ending, run_cli_bounded

    path = write(tmp_path, text.replace("tiny_corpus: true", "tiny_corpus: true, cache_dir: cache")
                 + "checkpoint: {dir: ckpt}\n")
    outcome = run_cli_bounded(["train", "--config", str(path)], cwd=tmp_path, seconds=20, memory_mb=512,
                              stop_before=["megatron_ext.training.train:train"])
    assert_clean_ending(outcome, "train")
    assert outcome.exit_code == 2 and outcome.reached is None and outcome.seconds < 10


def test_yaml_dump_of_a_config_round_trips(tmp_path):
    """What the dataclasses hold passes their own types again (checkpoints re-read recorded configs)."""
    import dataclasses

    from megatron_ext.config import TrainConfig, from_dict

    config = load(tmp_path, "training: {rampup_batch_size: [4, 4, 100]}\ndata: {tiny_corpus: true, upsample: "
                            "{web: {min_tokens: 8, factor: 2}}}\n")
    again = from_dict(TrainConfig, yaml.safe_load(yaml.safe_dump(dataclasses.asdict(config))), prefix="")
    assert again == config


def test_a_resumed_run_refuses_optimizer_numbers_before_it_reads_the_checkpoint(tmp_path, monkeypatch, capsys):
    """No checkpoint supplies the optimizer's numbers, so an lr out of range is refused before `train` looks for
    (and verifies) the checkpoint it would resume from; it used to read it and print the start block first."""
    import megatron_ext.training.start as start
    from megatron_ext.cli import main

    def no_reading(*args, **kwargs):
        raise AssertionError("the checkpoint was read before the optimizer's numbers were checked")

    monkeypatch.setattr(start, "find_checkpoint", no_reading)
    config = write(tmp_path, TINY + f"checkpoint: {{dir: {tmp_path / 'ckpt'}}}\n")
    assert main(["train", "--config", str(config), "--resume", "auto", "--set", "optimizer.lr=2"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("megatron-ext train: optimizer.lr (2.0) must be at most 1.0") and "\n" not in error
