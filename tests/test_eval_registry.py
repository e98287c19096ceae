"""The eval task registry: a task declared once (tests/toy_eval_task.py, registered here) is a `megatron-ext eval`
command and a suite section with no other edit, and every built-in task is both. Models are fakes: no weights."""

import argparse
import dataclasses
import json
import weakref
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from megatron_ext.cli import main
from megatron_ext.eval.cli import add_eval_args, run_eval, settings_from_args
from megatron_ext.eval.registry import TASKS, EvalTask, register
from megatron_ext.eval.suite import suite_config_from_dict
from toy_eval_task import TOY, ToySettings

BUILT_IN = ["perplexity", "passkey", "needle", "ruler", "attention"]


@dataclass
class FakeModel:
    """What the CLI and the suite read of a model besides the task's own use of it."""
    name: str
    source: str
    context_window: int = 100


def load_fake_model(path, name=None, **options):
    return FakeModel(name=name or Path(path).name, source=str(path))


@pytest.fixture
def toy_task(monkeypatch):
    monkeypatch.setattr("megatron_ext.eval.models.resolve_eval_model", lambda path, **options: path)  # no files
    monkeypatch.setattr("megatron_ext.eval.models.load_eval_model", load_fake_model)
    register(TOY)
    yield TOY
    del TASKS[TOY.name]


def test_a_registered_task_is_a_command(toy_task, tmp_path, capsys):
    assert main(["eval", "toy", "--model", "ckpt/extended", "--reference", "ckpt/base", "--lengths", "50", "400",
                 "--bonus", "0.5", "--output-dir", str(tmp_path)]) == 0
    assert "| length | score |" in capsys.readouterr().out
    result = json.loads((tmp_path / "toy.json").read_text())
    # window 100: all of 50 tokens inside it, a quarter of 400; plus the bonus
    assert (result["model"], result["reference"]) == ("extended", "base")
    assert [(r["length"], r["score"]) for r in result["rows"]] == [(50, 1.0 + 0.5), (400, 0.25 + 0.5)]
    assert (tmp_path / "toy.txt").read_text() == "extended vs base\n"


def test_a_registered_task_runs_in_the_suite_and_skips_its_reference(toy_task, tmp_path):
    config = dict(models=[{"path": "ckpt/a", "name": "a"}, {"path": "ckpt/b", "name": "b"}], attention_reference="b",
                  tasks=["toy"], toy={"lengths": [50, 400], "bonus": 0.25}, output_dir=str(tmp_path / "out"),
                  report="toy.md")
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(config))
    assert main(["eval", "suite", "--config", str(tmp_path / "suite.yaml"), "--set", "toy.bonus=0.5"]) == 0
    report = (tmp_path / "out" / "toy.md").read_text()
    # both models share the window 100: 400 is beyond it and starred, 50 is not
    assert "| length | a toy |\n|---|---|\n| 50 | 1.5 |\n| 400* | 0.75 |" in report
    assert "`*` marks the lengths beyond the trained window, shown only when all models share one window" in report
    assert "## Toy task" in report and "### a vs b" in report and "[notes](toy/a/toy.txt)" in report
    assert (tmp_path / "out" / "toy" / "a" / "toy.json").is_file()
    assert not (tmp_path / "out" / "toy" / "b").exists()  # the reference is not compared with itself
    settings = yaml.safe_load(report.split("## Settings")[1].split("```yaml")[1].split("```")[0])
    assert settings["toy"] == {"lengths": [50, 400], "bonus": 0.5}
    assert all(settings[task] == dataclasses.asdict(TASKS[task].settings()) for task in BUILT_IN)


def test_a_registered_task_refuses_unknown_keys_in_its_section(toy_task, tmp_path, capsys):
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(dict(models=[{"path": "m"}], tasks=["toy"],
                                                             toy={"bonnus": 1.0})))
    assert main(["eval", "suite", "--config", str(tmp_path / "suite.yaml")]) == 2
    assert "unknown key 'toy.bonnus': did you mean 'toy.bonus'?" in capsys.readouterr().err


def test_task_names_are_unique_and_not_suite():
    for name in ["passkey", "suite"]:
        with pytest.raises(ValueError, match="is taken"):
            register(EvalTask(name, "again", ToySettings, "toy_eval_task"))
    assert "suite" not in TASKS


def test_the_built_in_tasks_are_registered_in_order():
    assert list(TASKS) == [*BUILT_IN, "compare", "lm_eval"]  # these two run only when a suite lists them
    assert [name for name, task in TASKS.items() if not task.in_default_suite] == ["compare", "lm_eval"]
    assert [name for name, task in TASKS.items() if task.uses_reference] == ["attention", "compare"]


@pytest.mark.parametrize("name", list(TASKS))
def test_every_registered_task_has_a_command_and_a_suite_section(name):
    task = TASKS[name]
    parser = argparse.ArgumentParser(prog="megatron-ext")
    add_eval_args(parser.add_subparsers(dest="command", required=True))
    reference = ["--reference", "r"] if task.needs_reference else []
    args = parser.parse_args(["eval", name, "--model", "m", *reference])
    assert args.func is run_eval and settings_from_args(args, task.settings) == task.settings()
    assert hasattr(args, "reference") == task.uses_reference

    count = next(f.name for f in dataclasses.fields(task.settings) if f.type is int)  # trials, num_documents
    changed = {count: getattr(task.settings(), count) + 1}
    config = suite_config_from_dict(dict(models=[{"path": "m"}], tasks=[name], **{name: changed},
                                         attention_reference="m" if task.needs_reference else None))
    assert config.settings[name] == task.settings(**changed)
    assert config.to_dict()[name] == dataclasses.asdict(task.settings(**changed))
    assert task.implementation().__name__ == task.module  # imports it and checks it defines the required hooks


def test_the_suite_holds_one_model_at_a_time_besides_the_reference(toy_task, tmp_path, monkeypatch):
    """Three models and a reference: each model is released before the next one loads (weak references see it
    go), the reference stays for the tasks that compare with it and is loaded once."""
    live, loads, most_alive = [0], [], [0]

    def released():
        live[0] -= 1

    def load_tracked(path, name=None, **options):
        model = FakeModel(name=name or Path(path).name, source=str(path))
        loads.append(model.name)
        weakref.finalize(model, released)
        live[0] += 1
        most_alive[0] = max(most_alive[0], live[0])
        return model

    monkeypatch.setattr("megatron_ext.eval.models.load_eval_model", load_tracked)
    models = [{"path": f"ckpt/{name}", "name": name} for name in ("a", "b", "ref", "c")]
    config = dict(models=models, attention_reference="ref", tasks=["toy"], output_dir=str(tmp_path / "out"),
                  report="toy.md")
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(config))
    assert main(["eval", "suite", "--config", str(tmp_path / "suite.yaml")]) == 0
    assert sorted(loads) == ["a", "b", "c", "ref"] and loads[0] == "ref"  # the reference first, and once
    assert most_alive[0] == 2  # one evaluated model plus the reference
    report = (tmp_path / "out" / "toy.md").read_text()
    assert all(f"| {name} | `ckpt/{name}` | 100 |" in report for name in ("a", "b", "ref", "c"))
