"""Signals and lost processes around a run (issue 30, cases 8 and 9): a hang-up saves and exits 0 like SIGTERM, a
kill -9 of the --nproc-per-node wrapper leaves no rank behind (and no lock), a lock held by an orphaned rank is
named as such, and a rank that stops answering ends the others at parallel.distributed_timeout_minutes with one
line naming it, the last checkpoint intact."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from launched_ranks import alive, ranks_of
from test_faults_training import ENV, LONG_RUN, latest, losses, train_command, write_config

ROWS_BEFORE_FAULT = 2
ORPHAN_ITERS = 2000  # long enough that ranks left behind would still be training when the test looks


def start(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for_rows(process: subprocess.Popen, metrics: Path, rows: int = ROWS_BEFORE_FAULT, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= rows):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            out, err = process.communicate()
            raise AssertionError(f"the run ended or stalled before {rows} rows: {out[-2000:]}{err[-3000:]}")
        time.sleep(0.05)


@pytest.fixture
def work(tmp_path):
    return tmp_path


@pytest.mark.slow
@pytest.mark.distributed
def test_kill_9_of_the_wrapper_leaves_no_process_and_the_next_job_starts(work):
    """Before the fix torchrun and both ranks trained on without a parent, and the next job was refused by
    their lock. Now torchrun gets the parent-death SIGTERM, the ranks save once and exit within seconds."""
    config = write_config(work, "wrapped", train_iters=ORPHAN_ITERS)
    wrapper = start(train_command(config, "--nproc-per-node", "2"))
    wait_for_rows(wrapper, work / "wrapped.jsonl")
    family = psutil.Process(wrapper.pid).children(recursive=True)
    assert len(family) >= 3, family  # torchrun and its two ranks
    os.kill(wrapper.pid, signal.SIGKILL)
    wrapper.wait()
    deadline = time.monotonic() + 30
    while alive(family) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert alive(family) == [], [" ".join(psutil.Process(pid).cmdline()) for pid in alive(family)]
    gone_after = 30 - (deadline - time.monotonic())
    assert gone_after < 15, f"the ranks took {gone_after:.1f} s to stop"
    stopped_at = int(latest(work / "wrapped").removeprefix("iter_"))  # they saved on the way out
    assert ROWS_BEFORE_FAULT <= stopped_at < ORPHAN_ITERS
    assert not (work / "wrapped" / "megatron_ext.lock").exists()
    resumed = subprocess.run(train_command(config, "--nproc-per-node", "2", "--resume", "auto", "--set",
                                           "training.exit_interval=1"),
                             env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert max(losses(work, "wrapped")) == stopped_at + 1


@pytest.mark.slow
@pytest.mark.distributed
def test_sighup_to_the_wrapper_saves_once_and_exits_0(work):
    """A dropped SSH session hangs up the wrapper: before the fix the ranks were never told (the wrapper died,
    they trained on); now the hang-up is passed on, and each rank treats it as SIGTERM."""
    config = write_config(work, "hungup", train_iters=ORPHAN_ITERS)
    wrapper = start(train_command(config, "--nproc-per-node", "2"))
    wait_for_rows(wrapper, work / "hungup.jsonl")
    family = psutil.Process(wrapper.pid).children(recursive=True)
    os.kill(wrapper.pid, signal.SIGHUP)
    out, err = wrapper.communicate(timeout=120)
    assert wrapper.returncode == 0, err[-3000:]
    assert "got SIGHUP" in err
    assert alive(family) == []
    stopped_at = int(latest(work / "hungup").removeprefix("iter_"))
    assert ROWS_BEFORE_FAULT <= stopped_at < ORPHAN_ITERS and max(losses(work, "hungup")) == stopped_at
    assert sorted(p.name for p in (work / "hungup").glob("iter_*")) == [f"iter_{stopped_at:07d}"]


def test_hangup_is_a_stop_signal_of_the_ranks_and_of_the_wrapper():
    from megatron_ext.training.cli import FORWARDED_SIGNALS
    from megatron_ext.training.train import StopSignal

    assert signal.SIGHUP in StopSignal.SIGNALS
    assert {signal.Signals[name] for name in FORWARDED_SIGNALS} == set(StopSignal.SIGNALS)


def test_a_rank_whose_launcher_dies_raises_the_stop_flag(monkeypatch):
    """The orphan watch: a rank re-parented away from its launcher stops as if signalled."""
    from megatron_ext.training import train as training

    parents = iter([100, 100, 1])
    monkeypatch.setattr(training.os, "getppid", lambda: next(parents, 1))
    monkeypatch.setattr(training.StopSignal, "PARENT_CHECK_SECONDS", 0.01)
    stop = training.StopSignal.__new__(training.StopSignal)
    stop.received = False
    stop._watch_parent(100)
    assert stop.received


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's parent-death signal")
def test_the_torchrun_child_dies_with_the_wrapper(tmp_path):
    """die_with_parent as the wrapper uses it: a child of a process killed with -9 gets SIGTERM from the kernel."""
    marker = tmp_path / "terminated"
    child = (f"import signal, sys, time, pathlib\n"
             f"signal.signal(signal.SIGTERM, lambda *a: (pathlib.Path({str(marker)!r}).write_text('x'), sys.exit(0)))\n"
             f"print('ready', flush=True); time.sleep(60)\n")
    parent = ("import os, subprocess, sys, time\n"
              "from megatron_ext.training.cli import die_with_parent\n"
              f"p = subprocess.Popen([sys.executable, '-c', {child!r}], preexec_fn=die_with_parent(os.getpid()),"
              " start_new_session=True)\n"
              "print(p.pid, flush=True); time.sleep(60)\n")
    wrapper = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    lines = [wrapper.stdout.readline().strip() for _ in range(2)]  # the child's pid and its "ready", in any order
    child_pid = int(next(line for line in lines if line != "ready"))
    wrapper.kill()
    wrapper.wait()
    deadline = time.monotonic() + 10
    while psutil.pid_exists(child_pid) and psutil.Process(child_pid).status() != psutil.STATUS_ZOMBIE \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the child outlived its killed parent without a SIGTERM"


def test_a_lock_held_by_an_orphaned_rank_is_named_with_the_command_that_ends_it(tmp_path, capsys):
    """A rank of an earlier job that outlived its launcher holds checkpoint.dir: the refusal says it is an orphan
    and how to end it (before: only "in use by process N")."""
    from megatron_ext.cli import main

    config = write_config(tmp_path, "orphaned", train_iters=2)
    # an orphan: the intermediate process exits at once, so the sleeper is re-parented (to init or a subreaper)
    launcher = subprocess.run([sys.executable, "-c", "import subprocess, sys; p = subprocess.Popen([sys.executable, "
                               "'-c', 'import time; time.sleep(120)'], start_new_session=True, stdout=subprocess.DEVNULL, "
                               "stderr=subprocess.DEVNULL); print(p.pid)"],
                              capture_output=True, text=True, timeout=60)
    orphan = int(launcher.stdout.strip())
    try:
        (tmp_path / "orphaned").mkdir()
        (tmp_path / "orphaned" / "megatron_ext.lock").write_text(json.dumps(
            {"host": socket.gethostname(), "pid": orphan, "heartbeat_s": 30.0}))
        assert main(["train", "--config", str(config), "--nproc-per-node", "2"]) == 2
    finally:
        os.kill(orphan, signal.SIGKILL)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert f"in use by process {orphan}" in lines[0] and f"process {orphan} on {socket.gethostname()} is an orphan" \
        in lines[0] and f"kill {orphan}" in lines[0], lines[0]
    # a holder whose launcher lives (here: this test) is a live job, not an orphan
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (tmp_path / "orphaned" / "megatron_ext.lock").write_text(json.dumps(
            {"host": socket.gethostname(), "pid": holder.pid, "heartbeat_s": 30.0}))
        assert main(["train", "--config", str(config), "--nproc-per-node", "2"]) == 2
    finally:
        holder.kill()
    line = capsys.readouterr().err.strip()
    assert f"in use by process {holder.pid}" in line and "is an orphan" not in line, line


# --- case 9: a rank that does not answer ----------------------------------------------------------

TIMEOUT_MINUTES = 0.1  # 6 s


@pytest.mark.slow
@pytest.mark.distributed
def test_a_stopped_rank_ends_the_run_at_the_timeout_naming_it_and_a_sigterm_meanwhile_too(work):
    """Rank 1 frozen with SIGSTOP, then SIGTERM to the wrapper: rank 0's stop-flag all-reduce cannot complete.
    Before the fix rank 0 waited gloo's default 30 minutes; now it ends after the timeout with one line naming
    rank 1, exit 2, and `latest` still names the last complete checkpoint."""
    import yaml

    config = write_config(work, "stuck", train_iters=LONG_RUN)
    settings = yaml.safe_load(config.read_text())
    settings["checkpoint"]["save_interval"] = 1
    settings["parallel"] = dict(distributed_timeout_minutes=TIMEOUT_MINUTES)
    config.write_text(yaml.safe_dump(settings))
    wrapper = start(train_command(config, "--nproc-per-node", "2"))
    wait_for_rows(wrapper, work / "stuck.jsonl", rows=3)
    ranks = ranks_of(wrapper.pid)
    assert sorted(ranks) == [0, 1], ranks
    ranks[1].suspend()  # SIGSTOP
    stopped = time.monotonic()
    before = latest(work / "stuck")
    os.kill(wrapper.pid, signal.SIGTERM)
    while alive([ranks[0]]) and time.monotonic() - stopped < 120:
        time.sleep(0.1)
    rank0_ended_after = time.monotonic() - stopped
    ranks[1].resume()  # the node comes back: it finds rank 0 gone and ends too
    out, err = wrapper.communicate(timeout=120)
    assert rank0_ended_after < TIMEOUT_MINUTES * 60 + 20, f"rank 0 ran {rank0_ended_after:.0f} s after the stop"
    assert wrapper.returncode == 2, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("megatron-ext train: rank 0:")]
    assert len(lines) == 1, err[-3000:]
    assert "rank 1 (pid" in lines[0] and "did not answer" in lines[0], lines[0]
    assert "distributed_timeout_minutes=0.1" in lines[0] and "Traceback" not in err.split(lines[0])[0][-200:]
    kept = latest(work / "stuck")
    assert int(kept.removeprefix("iter_")) >= int(before.removeprefix("iter_"))
    assert f"{work / 'stuck' / kept} (intact)" in lines[0]
    assert (work / "stuck" / kept / "megatron_ext.json").exists()


def test_distributed_timeout_minutes_reaches_the_process_groups():
    from megatron_ext.config import ConfigError, TrainConfig, from_dict, validate
    from megatron_ext.distributed import collective_timeout

    config = from_dict(TrainConfig, {"parallel": {"distributed_timeout_minutes": 0.1}}, prefix="")
    assert collective_timeout(config.parallel).total_seconds() == pytest.approx(6.0)
    assert collective_timeout(from_dict(TrainConfig, {}, prefix="").parallel).total_seconds() == 600
    with pytest.raises(ConfigError, match=r"parallel.distributed_timeout_minutes \(0(\.0)?\) must be > 0"):
        validate(from_dict(TrainConfig, {"parallel": {"distributed_timeout_minutes": 0},
                                         "data": {"tiny_corpus": True}}, prefix=""), check_files=False)


def test_only_gloo_failures_become_the_one_line_error(monkeypatch):
    """lost_rank_error names the silent rank for gloo's time-out and lost-peer errors, and leaves others alone."""
    from megatron_ext import distributed

    class Heartbeat:
        rank = 0

        def silent_ranks(self):
            return [1], ["pid 42 on node7"]

    monkeypatch.setattr(distributed.RankHeartbeat, "_running", Heartbeat())
    monkeypatch.setattr("torch.distributed.is_initialized", lambda: True)
    monkeypatch.setattr("torch.distributed.get_world_size", lambda: 2)
    timed_out = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting "
                             "6000ms for recv operation to complete")
    error = distributed.lost_rank_error(timed_out, 0.1, "ckpt/iter_0000004")
    assert isinstance(error, distributed.CollectiveTimeout)
    assert str(error).startswith("rank 0: a collective waited parallel.distributed_timeout_minutes=0.1 for another "
                                 "rank: rank 1 (pid 42 on node7) did not answer")
    assert "ckpt/iter_0000004 (intact)" in str(error)
    closed = RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:17572")
    assert "lost its connection to another rank" in str(distributed.lost_rank_error(closed, 10, None))
    assert distributed.lost_rank_error(RuntimeError("shape mismatch"), 10, None) is None
    assert distributed.lost_rank_error(ValueError("Timed out waiting"), 10, None) is None


@pytest.mark.slow  # a subprocess that imports the training loop
def test_a_stop_signal_during_the_teardown_of_a_finished_rank_does_not_kill_it(tmp_path):
    """The chaos test's double SIGTERM once ended a rank that had saved and finished with "killed by SIGTERM": the
    interpreter restores the default action of Python-handled signals while it tears down. A finished run's
    ranks ignore stop signals from then on; here the teardown is slowed and signalled (-15 before the fix)."""
    script = ("import time, sys\n"
              "from megatron_ext.training.train import StopSignal\n"
              "StopSignal(enabled=True)\n"
              "StopSignal.ignore_from_now_on()\n"
              "class Slow:\n"
              "    def __del__(self, sleep=time.sleep):  # module globals are gone by then\n"
              "        print('tearing down', flush=True); sleep(3)\n"
              "keep = Slow()\n")
    rank = subprocess.Popen([sys.executable, "-c", script], env=dict(ENV, RANK="0"), stdout=subprocess.PIPE, text=True)
    assert rank.stdout.readline().strip() == "tearing down"
    time.sleep(0.3)
    rank.send_signal(signal.SIGTERM)
    rank.communicate(timeout=60)
    assert rank.returncode == 0
