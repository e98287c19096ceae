"""The fuzz harness itself (tests/fuzz_harness.py): it tells a clean ending from a traceback, a hang and a memory
blow-up, each in well under the time its bound allows."""

import time

import pytest

from fuzz_harness import assert_clean_ending, run_cli_bounded

pytestmark = pytest.mark.slow  # the first case imports megatron-core and the trainer (~6 s), to fork from them


def test_a_refusal_is_a_clean_ending(tmp_path):
    outcome = run_cli_bounded(["train", "--config", str(tmp_path / "missing.yaml")], cwd=tmp_path, seconds=20)
    assert outcome.exit_code == 2 and not outcome.timed_out and not outcome.over_memory
    assert outcome.stderr.strip().startswith("megatron-ext train: --config")
    assert_clean_ending(outcome, "train")


def test_an_argparse_error_is_a_clean_ending(tmp_path):
    outcome = run_cli_bounded(["train"], cwd=tmp_path, seconds=20)
    assert outcome.exit_code == 2
    assert_clean_ending(outcome, "train")


def test_stop_before_ends_the_run_where_the_work_begins(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text("data: {tiny_corpus: true}\ncheckpoint: {dir: ckpt}\n")
    outcome = run_cli_bounded(["train", "--config", str(config)], cwd=tmp_path, seconds=20,
                              stop_before=["megatron_ext.training.train:train"])
    assert outcome.exit_code == 0 and outcome.reached == "megatron_ext.training.train:train", outcome.describe()
    assert_clean_ending(outcome, "train")


def _replace_train_command(monkeypatch, behaviour):
    import megatron_ext.training.cli

    monkeypatch.setattr(megatron_ext.training.cli, "run_train", behaviour)  # the fork inherits it


def test_a_traceback_is_caught(tmp_path, monkeypatch):
    def broken(args):
        return [] + "str"  # a TypeError, as a list-of-lists train_data once gave

    _replace_train_command(monkeypatch, broken)
    outcome = run_cli_bounded(["train", "--config", "x.yaml"], cwd=tmp_path, seconds=20)
    assert outcome.exit_code == 1 and "Traceback (most recent call last)" in outcome.stderr
    assert "can only concatenate list" in outcome.stderr
    with pytest.raises(AssertionError, match="traceback"):
        assert_clean_ending(outcome, "train")


def test_a_hang_is_killed_at_the_time_bound(tmp_path, monkeypatch):
    def hangs(args):
        while True:
            time.sleep(1)

    _replace_train_command(monkeypatch, hangs)
    started = time.monotonic()
    outcome = run_cli_bounded(["train", "--config", "x.yaml"], cwd=tmp_path, seconds=1.5)
    assert outcome.timed_out and outcome.exit_code is None
    assert 1.5 <= time.monotonic() - started < 10
    with pytest.raises(AssertionError, match="timed out"):
        assert_clean_ending(outcome, "train")


def test_a_memory_blow_up_stops_at_the_memory_bound(tmp_path, monkeypatch):
    def grows(args):
        chunks = []
        while True:
            chunks.append(bytearray(64 * 2**20))  # 64 MiB at a time, touched

    _replace_train_command(monkeypatch, grows)
    outcome = run_cli_bounded(["train", "--config", "x.yaml"], cwd=tmp_path, seconds=30, memory_mb=256)
    assert outcome.over_memory and not outcome.timed_out, outcome.describe()
    with pytest.raises(AssertionError, match="memory"):
        assert_clean_ending(outcome, "train")


def test_a_second_error_line_or_a_silent_exit_2_is_not_clean(tmp_path, monkeypatch):
    import sys

    def two_lines(args):
        print("megatron-ext train: first", file=sys.stderr)
        return 2

    _replace_train_command(monkeypatch, two_lines)
    outcome = run_cli_bounded(["train", "--config", "x.yaml"], cwd=tmp_path, seconds=20)
    with pytest.raises(AssertionError):
        assert_clean_ending(outcome, "train")

    _replace_train_command(monkeypatch, lambda args: 2)
    outcome = run_cli_bounded(["train", "--config", "x.yaml"], cwd=tmp_path, seconds=20)
    with pytest.raises(AssertionError, match="one-line"):
        assert_clean_ending(outcome, "train")
