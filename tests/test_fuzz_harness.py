"""The fuzz harness itself (tests/fuzz_harness.py): it tells a clean ending from a traceback, a hang and a memory
blow-up, each in well under the time its bound allows; its cases are forks of a one-thread zygote, so what the test
process ran before (a gloo world) does not reach them."""

import os
import sys
import time

import pytest
import yaml

from fuzz_harness import assert_clean_ending, run_cli_bounded, zygote_threads

TRAIN = "megatron_ext.training.cli:run_train"  # the command the stand-ins below replace in the child

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


def broken(args):
    return [] + "str"  # a TypeError, as a list-of-lists train_data once gave


def hangs(args):
    while True:
        time.sleep(1)


def grows(args):
    chunks = []
    while True:
        chunks.append(bytearray(64 * 2**20))  # 64 MiB at a time, touched


def two_lines(args):
    print("megatron-ext train: first", file=sys.stderr)
    return 2


def silent_exit_2(args):
    return 2


def prints_its_environment(args):
    print(f"FUZZ_HARNESS_PROBE={os.environ.get('FUZZ_HARNESS_PROBE')} ASKED={os.environ.get('ASKED')}")
    return 0


def test_a_traceback_is_caught(tmp_path):
    outcome = run_cli_bounded(["train", "--config", "x.yaml"], cwd=tmp_path, seconds=20,
                              patch={TRAIN: "test_fuzz_harness:broken"})
    assert outcome.exit_code == 1 and "Traceback (most recent call last)" in outcome.stderr
    assert "can only concatenate list" in outcome.stderr
    with pytest.raises(AssertionError, match="traceback"):
        assert_clean_ending(outcome, "train")


def test_a_hang_is_killed_at_the_time_bound(tmp_path):
    started = time.monotonic()
    outcome = run_cli_bounded(["train", "--config", "x.yaml"], cwd=tmp_path, seconds=1.5,
                              patch={TRAIN: "test_fuzz_harness:hangs"})
    assert outcome.timed_out and outcome.exit_code is None
    assert 1.5 <= time.monotonic() - started < 10
    with pytest.raises(AssertionError, match="timed out"):
        assert_clean_ending(outcome, "train")


def test_a_memory_blow_up_stops_at_the_memory_bound(tmp_path):
    outcome = run_cli_bounded(["train", "--config", "x.yaml"], cwd=tmp_path, seconds=30, memory_mb=256,
                              patch={TRAIN: "test_fuzz_harness:grows"})
    assert outcome.over_memory and not outcome.timed_out, outcome.describe()
    with pytest.raises(AssertionError, match="memory"):
        assert_clean_ending(outcome, "train")


def test_a_second_error_line_or_a_silent_exit_2_is_not_clean(tmp_path):
    outcome = run_cli_bounded(["train", "--config", "x.yaml"], cwd=tmp_path, seconds=20,
                              patch={TRAIN: "test_fuzz_harness:two_lines"})
    with pytest.raises(AssertionError):
        assert_clean_ending(outcome, "train")

    outcome = run_cli_bounded(["train", "--config", "x.yaml"], cwd=tmp_path, seconds=20,
                              patch={TRAIN: "test_fuzz_harness:silent_exit_2"})
    with pytest.raises(AssertionError, match="one-line"):
        assert_clean_ending(outcome, "train")


def test_a_case_has_the_test_process_environment_at_the_call_and_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FUZZ_HARNESS_PROBE", "set-after-the-zygote-started")
    outcome = run_cli_bounded(["train", "--config", "x.yaml"], cwd=tmp_path, seconds=20, env={"ASKED": "yes"},
                              patch={TRAIN: "test_fuzz_harness:prints_its_environment"})
    assert outcome.exit_code == 0, outcome.describe()
    assert "FUZZ_HARNESS_PROBE=set-after-the-zygote-started ASKED=yes" in outcome.stdout


def test_cases_are_forked_from_a_process_with_one_thread():
    run_cli_bounded(["--help"], seconds=20)  # the zygote has done its imports
    assert zygote_threads() == 1


def test_a_training_case_runs_during_and_after_a_gloo_world_in_the_test_process(tmp_path):
    """Cases forked from the test process itself failed once it had run a gloo world as the single_rank fixture does:
    while it lived, with "data parallel group is already initialized" (the fork's copy of megatron's state); after
    its teardown, with a segfault (exit -11, in megatron's gloo group creation, after test_checkpoint.py) or a hang
    until the time bound (here): the world's threads are not in the fork. A fork of the zygote trains whatever the
    test process did."""
    import torch
    from megatron.core import parallel_state as ps

    from megatron_ext.compat import prepare_megatron

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(dict(
        model=dict(num_layers=1, hidden_size=32, num_attention_heads=2, seq_length=32),
        data=dict(tiny_corpus=True, cache_dir=str(tmp_path / "cache")),
        training=dict(train_iters=1, micro_batch_size=1, global_batch_size=1, precision="fp32"),
        optimizer=dict(warmup_iters=0), checkpoint=dict(dir="ckpt", save_interval=1))))

    def trains(when: str) -> None:
        work = tmp_path / when
        work.mkdir()
        outcome = run_cli_bounded(["train", "--config", config], cwd=work, seconds=300, memory_mb=4096)
        assert outcome.exit_code == 0, f"{when}: {outcome.describe()}"
        assert (work / "ckpt" / "latest").read_text().strip() == "iter_0000001"

    assert not torch.distributed.is_initialized()
    prepare_megatron()
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        ps.initialize_model_parallel()
        trains("during")
    finally:
        ps.destroy_model_parallel()
        torch.distributed.destroy_process_group()
    trains("after")
