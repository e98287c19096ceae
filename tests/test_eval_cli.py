"""`megatron-ext eval`: flags come from the settings dataclasses, bad settings stop before any model loads, and
`eval suite` writes one report with every table and picture."""

import argparse
import dataclasses
import json

import pytest
import yaml

from megatron_ext.eval.cli import TASKS, add_eval_args, main, settings_from_args
from megatron_ext.eval.settings import PasskeySettings

pytest_plugins = ["test_eval_support"]


def parse(argv):
    parser = argparse.ArgumentParser(prog="megatron-ext")
    add_eval_args(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["eval", *argv])


@pytest.mark.parametrize("task", list(TASKS))
def test_every_setting_has_a_flag_and_unset_flags_keep_the_defaults(task):
    settings_class = TASKS[task][0]
    args = parse([task, "--model", "m"])
    assert settings_from_args(args, settings_class) == settings_class()
    assert all(hasattr(args, f"setting_{f.name}") for f in dataclasses.fields(settings_class))


def test_flags_set_their_settings():
    args = parse(["passkey", "--model", "m", "--lengths", "512", "1024", "--trials", "3", "--filler", " x y."])
    assert settings_from_args(args, PasskeySettings) == PasskeySettings(lengths=[512, 1024], trials=3, filler=" x y.")
    assert parse(["perplexity", "--model", "m", "--truncate"]).setting_truncate is True


def test_a_bad_setting_stops_before_the_model_loads(capsys):
    assert main(["passkey", "--model", "/nonexistent", "--trials", "0"]) == 2
    assert "trials (0)" in capsys.readouterr().err


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

    assert main(["suite", "--config", str(write_suite(tmp_path / "suite.yaml", **changes))]) == 2
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
    assert main(["suite", "--config", str(tmp_path / "suite.yaml"), "--set", "passkey.trials=3"]) == 0
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
    assert main(["needle", "--model", str(llama_dir), "--name", "tiny", "--lengths", "200", "240", "--depths", "0",
                 "1", "--trials", "1", "--output-dir", str(tmp_path)]) == 0
    assert "| depth \\ length | 200 | 240 |" in capsys.readouterr().out
    result = json.loads((tmp_path / "needle.json").read_text())
    assert (result["task"], result["model"], result["lengths"], result["depths"]) == ("needle", "tiny", [200, 240],
                                                                                      [0.0, 1.0])
    assert (tmp_path / "needle_heatmap.png").is_file() and (tmp_path / "needle.csv").is_file()
