"""`megatron-ext eval`: flags come from the settings dataclasses, bad settings stop before any model loads with
one line on stderr and exit code 2, and `eval suite` writes one report with every table and picture."""

import argparse
import dataclasses
import json
import subprocess
import sys

import pytest
import yaml

from megatron_ext.cli import main
from megatron_ext.eval.cli import add_eval_args, settings_from_args
from megatron_ext.eval.registry import TASKS
from megatron_ext.eval.settings import PasskeySettings

pytest_plugins = ["test_eval_support"]


def eval_main(*argv) -> int:
    """`megatron-ext eval ...` in this process."""
    return main(["eval", *argv])


def parse(argv):
    parser = argparse.ArgumentParser(prog="megatron-ext")
    add_eval_args(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["eval", *argv])


@pytest.mark.parametrize("task", list(TASKS))
def test_every_setting_has_a_flag_and_unset_flags_keep_the_defaults(task):
    settings_class = TASKS[task].settings
    args = parse([task, "--model", "m", *(["--reference", "r"] if TASKS[task].needs_reference else [])])
    assert settings_from_args(args, settings_class) == settings_class()
    assert all(hasattr(args, f"setting_{f.name}") for f in dataclasses.fields(settings_class))


def test_flags_set_their_settings():
    args = parse(["passkey", "--model", "m", "--lengths", "512", "1024", "--trials", "3", "--filler", " x y."])
    assert settings_from_args(args, PasskeySettings) == PasskeySettings(lengths=[512, 1024], trials=3, filler=" x y.")
    assert parse(["perplexity", "--model", "m", "--truncate"]).setting_truncate is True


def test_a_bad_setting_stops_before_the_model_loads(capsys):
    assert eval_main("passkey", "--model", "/nonexistent", "--trials", "0") == 2
    assert "trials (0)" in capsys.readouterr().err


@pytest.mark.slow
def test_a_bad_setting_is_one_line_on_stderr_and_exit_code_2():
    run = subprocess.run([sys.executable, "-m", "megatron_ext.cli", "eval", "passkey", "--model", "/nonexistent",
                          "--trials", "0"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.startswith("megatron-ext eval: passkey: ") and "trials (0)" in run.stderr
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr


def test_a_missing_suite_config_is_a_one_line_error(tmp_path, capsys):
    assert eval_main("suite", "--config", str(tmp_path / "absent.yaml")) == 2
    assert capsys.readouterr().err == f"megatron-ext eval: --config {tmp_path / 'absent.yaml'}: no such file; " \
                                      "see examples/configs/eval_*.yaml\n"


def write_suite(path, **changes):
    config = dict(models=[{"path": "unused", "name": "a"}], tasks=["passkey"])
    path.write_text(yaml.safe_dump({**config, **changes}))
    return path


@pytest.mark.parametrize("changes, message", [
    (dict(pasky={"trials": 3}), "unknown key 'pasky': did you mean 'passkey'"),
    (dict(passkey={"trails": 3}), "unknown key 'passkey.trails'"),
    (dict(tasks=["passkey", "hellaswag"]), r"tasks: unknown \['hellaswag'\]"),
    (dict(attention_reference="b"), "attention_reference \\('b'\\) is not one of the models"),
    (dict(models=[]), "models is empty"),
])
def test_bad_suite_configs_name_the_key(tmp_path, capsys, changes, message):
    import re

    assert eval_main("suite", "--config", str(write_suite(tmp_path / "suite.yaml", **changes))) == 2
    assert re.search(message, capsys.readouterr().err)


def test_suite_writes_one_report_with_every_table_and_picture(llama_dir, tmp_path, capsys):
    """Two names for the same tiny Llama: the JS divergence of its attention to itself is 0."""
    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"text": "The grass is green. The sky is blue. " * 40}) + "\n")
    config = dict(
        title="tiny suite", attention_reference="before",
        models=[{"path": str(llama_dir), "name": "after"}, {"path": str(llama_dir), "name": "before"}],
        output_dir=str(tmp_path / "out"), report="eval_tiny.md",
        perplexity=dict(data=[str(data)], lengths=[64, 128], stride=32),
        passkey=dict(lengths=[200, 240], trials=2),
        needle=dict(lengths=[200, 240], depths=[0.0, 1.0], trials=1),
        ruler=dict(lengths=[300], trials=1, num_keys=2, num_values=2, num_hops=2),
        attention=dict(lengths=[200], trials=1),
    )
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(config))
    assert eval_main("suite", "--config", str(tmp_path / "suite.yaml"), "--set", "passkey.trials=3") == 0
    report = (tmp_path / "out" / "eval_tiny.md").read_text()
    for heading in ["# tiny suite", "## Summary", "## Sliding-window perplexity", "## Passkey retrieval",
                    "## Needle in a haystack", "## RULER-style tasks", "## Attention entropy and JS divergence",
                    "--set passkey.trials=3", "| length | after PPL | after passkey |"]:
        assert heading in report
    assets = tmp_path / "out" / "eval_tiny"
    for name in ["after/needle_heatmap.png", "after/needle.csv", "before/needle_heatmap.png",
                 "after/attention_layer0.png", "after/attention_layer1.png", "after/attention.json"]:
        assert (assets / name).is_file(), name
    assert "![needle heatmap after](eval_tiny/after/needle_heatmap.png)" in report
    assert not (assets / "before" / "attention.json").exists()  # the reference is not compared with itself
    passkey = json.loads((assets / "after" / "passkey.json").read_text())
    assert [r["trials"] for r in passkey["rows"]] == [3, 3]
    attention = json.loads((assets / "after" / "attention.json").read_text())
    assert max(max(layer["js_divergence"]) for layer in attention["layers"]) < 1e-9
    assert "report:" in capsys.readouterr().out


def test_a_task_command_prints_its_table_and_writes_json_png_and_csv(llama_dir, tmp_path, capsys):
    assert eval_main("needle", "--model", str(llama_dir), "--name", "tiny", "--lengths", "200", "240", "--depths", "0",
                     "1", "--trials", "1", "--output-dir", str(tmp_path)) == 0
    assert "| depth \\ length | 200 | 240 |" in capsys.readouterr().out
    result = json.loads((tmp_path / "needle.json").read_text())
    assert (result["task"], result["model"], result["lengths"], result["depths"]) == ("needle", "tiny", [200, 240],
                                                                                      [0.0, 1.0])
    assert (tmp_path / "needle_heatmap.png").is_file() and (tmp_path / "needle.csv").is_file()


def test_attention_with_pipeline_parallelism_stops_before_any_model_loads(capsys, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("megatron_ext.eval.models.load_eval_model", no_loading)
    assert eval_main("attention", "--model", "a", "--reference", "b", "--pipeline-parallel-size", "2") == 2
    err = capsys.readouterr().err
    assert err.startswith("megatron-ext eval: attention holds every layer on one rank") and "size 1" in err


@pytest.mark.parametrize("task", ["passkey", "needle", "ruler", "attention"])
def test_lengths_too_short_for_the_prompt_are_refused_before_the_model_loads(task, llama_dir, capsys, monkeypatch):
    """The prompts are built from the model's tokenizer alone: a length their fixed text does not fit in is one line
    naming --lengths, and neither the model's nor the reference's weights are read."""
    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr("megatron_ext.eval.models.HFCausalLM.__init__", no_loading)
    reference = ["--reference", str(llama_dir)] if task == "attention" else []
    assert eval_main(task, "--model", str(llama_dir), *reference, "--lengths", "300", "20") == 2
    err = capsys.readouterr().err
    assert err.startswith("megatron-ext eval: length 20 is too short for this prompt") and "(--lengths)" in err
    assert err.count("\n") == 1


def test_a_suite_with_lengths_too_short_is_refused_before_any_model_loads(llama_dir, tmp_path, capsys, monkeypatch):
    """Every entry is resolved and its prompts built from its tokenizer before the first model loads."""
    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr("megatron_ext.eval.models.HFCausalLM.__init__", no_loading)
    path = write_suite(tmp_path / "suite.yaml", models=[{"path": str(llama_dir), "name": "a"},
                                                        {"path": str(llama_dir), "name": "b"}],
                       tasks=["needle"], needle={"lengths": [300, 20]})
    assert eval_main("suite", "--config", str(path)) == 2
    assert capsys.readouterr().err.startswith("megatron-ext eval: length 20 is too short for this prompt")


def test_missing_perplexity_data_stops_before_any_model_loads(capsys, tmp_path):
    assert eval_main("perplexity", "--model", "/nonexistent", "--data", str(tmp_path / "absent.jsonl")) == 2
    assert "perplexity.data" in capsys.readouterr().err


def test_a_suite_with_attention_at_pp2_is_refused_before_loading(tmp_path, capsys):
    path = write_suite(tmp_path / "suite.yaml", tasks=["attention"], pipeline_parallel_size=2,
                       models=[{"path": "unused", "name": "a"}, {"path": "unused2", "name": "b"}],
                       attention_reference="b")
    assert eval_main("suite", "--config", str(path)) == 2
    assert "attention holds every layer on one rank" in capsys.readouterr().err
