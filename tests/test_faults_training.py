"""Faults during training: a stop signal saves once and exits 0, a resume continues the uninterrupted run
exactly, the --nproc-per-node wrapper leaves no process behind, and non-finite training stops without
saving or deleting anything good."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from test_train import base_config

pytestmark = pytest.mark.distributed

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
LONG_RUN = 50  # iterations: the run is always still going when the signal comes


def write_config(work: Path, name: str, **training) -> Path:
    config = base_config(work / "cache")
    config["training"].update(training)
    config["checkpoint"] = dict(dir=str(work / name), save_interval=LONG_RUN, keep_last=None)
    config["logging"] = dict(metrics_file=str(work / f"{name}.jsonl"), tensorboard_dir=None, progress_bar=False)
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def train_command(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "megatron_ext.cli", "train", "--config", str(config), *args]


def losses(work: Path, name: str) -> dict[int, float]:
    rows = [json.loads(line) for line in (work / f"{name}.jsonl").read_text().splitlines()]
    return {row["iteration"]: row["loss"] for row in rows}


def start_and_signal(command: list[str], metrics: Path, send) -> subprocess.CompletedProcess:
    """Start `command` in a new session, call send(process) once it has logged two iterations, wait."""
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0][-3000:]
        time.sleep(0.05)
    send(process)
    output, _ = process.communicate(timeout=120)
    return subprocess.CompletedProcess(command, process.returncode, output)


def latest(root: Path) -> str:
    return (root / "latest").read_text().strip()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def signalled(work):
    """A one-rank run stopped by SIGTERM to its whole process group (as srun and Ctrl-C deliver it)."""
    config = write_config(work, "signalled", train_iters=LONG_RUN)
    run = start_and_signal(train_command(config), work / "signalled.jsonl",
                           lambda process: os.killpg(process.pid, signal.SIGTERM))
    assert run.returncode == 0, run.stdout[-3000:]
    stopped_at = int(latest(work / "signalled").removeprefix("iter_"))
    return stopped_at


def test_group_sigterm_saves_once_and_the_resume_matches_the_uninterrupted_run(work, signalled):
    stopped_at = signalled
    assert 2 <= stopped_at < LONG_RUN
    assert sorted(p.name for p in (work / "signalled").glob("iter_*")) == [f"iter_{stopped_at:07d}"]
    end = stopped_at + 2
    # train_iters sizes the shuffled dataset, so every run keeps it and stops with exit_interval instead
    resumed = subprocess.run(train_command(work / "signalled.yaml", "--set", "training.exit_interval=2"),
                             env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    reference = subprocess.run(train_command(write_config(work, "reference", train_iters=LONG_RUN, exit_interval=end)),
                               env=ENV, capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]
    interrupted, uninterrupted = losses(work, "signalled"), losses(work, "reference")
    assert sorted(interrupted) == list(range(1, end + 1))
    assert [interrupted[i] for i in range(1, end + 1)] == pytest.approx(
        [uninterrupted[i] for i in range(1, end + 1)], abs=1e-6)


def test_a_diverging_run_stops_naming_the_iteration_and_keeps_the_last_good_checkpoint(work):
    """A run that really diverges, with settings validation accepts (lr <= 1, everything finite): Adam with lr 1.0, no
    clipping or weight decay, adam_beta2 1e-30 and adam_eps 1e-30, so its second moment is the last gradient alone
    while the first remembers earlier ones: a weight whose gradient drops to about 0 (an embedding row of a token
    absent from the batch) moves by about mean/|0|. Iterations 1 and 2 are finite and saved (a checkpoint every
    iteration, keep_last=1); the step after blows the loss up. The run fails naming the first non-finite iteration,
    saves nothing after it, and keep_last deletes nothing good (before the fix, with lr 1e30: rc 0, NaN
    checkpoints, the good one deleted; lr above 1 is now refused at start-up, test_nonsense_numbers_...)."""
    config = yaml.safe_load(write_config(work, "exploding", train_iters=8).read_text())
    config["checkpoint"].update(save_interval=1, keep_last=1)
    config["optimizer"].update(lr=1.0, min_lr=1.0, clip_grad=0.0, weight_decay=0.0, adam_beta2=1e-30, adam_eps=1e-30)
    (work / "exploding.yaml").write_text(yaml.safe_dump(config))
    run = subprocess.run(train_command(work / "exploding.yaml"), env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stdout[-3000:] + run.stderr[-3000:]
    message = run.stderr.strip().splitlines()[-1]
    rows = [json.loads(line) for line in (work / "exploding.jsonl").read_text().splitlines()]
    bad = [r["iteration"] for r in rows if not all(abs(r[k]) < float("inf") for k in ("loss", "grad_norm"))]
    assert bad == [rows[-1]["iteration"]] and f"iteration {bad[0]}:" in message and "not finite" in message, message
    assert bad[0] >= 2, rows  # a checkpoint before it verifies: the run did diverge, it did not start non-finite
    good = f"iter_{bad[0] - 1:07d}"
    assert latest(work / "exploding") == good
    assert sorted(p.name for p in (work / "exploding").glob("iter_*")) == [good]
    assert finite_tensors(work / "exploding" / good)


def finite_tensors(checkpoint: Path) -> bool:
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = checkpoint.parent / "flat.pt"
    dcp_to_torch_save(str(checkpoint), str(flat))
    tensors = [value for value in torch.load(flat, weights_only=False).values() if isinstance(value, torch.Tensor)]
    return bool(tensors) and all(bool(torch.isfinite(t.float()).all()) for t in tensors)


def test_sigterm_to_the_wrapper_stops_both_ranks_saves_and_leaves_no_process(work):
    config = write_config(work, "wrapped", train_iters=LONG_RUN)
    family = []

    def send(wrapper):
        family.extend(psutil.Process(wrapper.pid).children(recursive=True))
        os.kill(wrapper.pid, signal.SIGTERM)

    run = start_and_signal(train_command(config, "--nproc-per-node", "2"), work / "wrapped.jsonl", send)
    assert run.returncode == 0, run.stdout[-3000:]
    assert len(family) >= 3  # torchrun and its two ranks
    time.sleep(0.5)
    assert [p.pid for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []
    stopped_at = int(latest(work / "wrapped").removeprefix("iter_"))
    assert 2 <= stopped_at < LONG_RUN and max(losses(work, "wrapped")) == stopped_at


# (the setting, what its refusal says): a value outside float32 is refused by the config's types as it is read;
# the rest by the validation of numbers (lr above 1 replaces the weights with noise at the first step)
@pytest.mark.parametrize("setting, says", [
    ("optimizer.lr=inf", "'inf' (a string) is not a finite number"), ("optimizer.lr=.inf", "is not a finite number"),
    ("optimizer.lr=1e39", "is not a finite number"), ("optimizer.lr=2", "must be at most 1.0"),
    ("optimizer.adam_eps=0", "must"), ("model.norm_epsilon=-1", "must"), ("training.exit_interval=-1", "must")])
def test_nonsense_numbers_are_refused_in_one_line(work, setting, says, capsys):
    from megatron_ext.cli import main

    config = write_config(work, "refused", train_iters=2)
    assert main(["train", "--config", str(config), "--set", setting]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"megatron-ext train: {setting.split('=')[0]}"), lines
    assert says in lines[0], lines
    assert not (work / "refused").exists()


def test_a_second_job_on_a_checkpoint_dir_in_use_is_refused(work):
    """The run holds checkpoint.dir's lock; a live owner's lock refuses another job, naming the owner."""
    import socket

    config = write_config(work, "locked", train_iters=2)
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (work / "locked").mkdir()
        (work / "locked" / "megatron_ext.lock").write_text(json.dumps({"host": socket.gethostname(),
                                                                         "pid": owner.pid}))
        run = subprocess.run(train_command(config), env=ENV, capture_output=True, text=True, timeout=300)
    finally:
        owner.kill()
    assert run.returncode == 2, run.stderr[-3000:]
    assert f"is in use by process {owner.pid}" in run.stderr.strip().splitlines()[-1]
    assert not list((work / "locked").glob("iter_*"))
    assert not (work / "locked.jsonl").exists()  # refused at start-up: not one iteration ran


def test_skip_tolerates_patience_non_finite_iterations_in_a_row_and_a_finite_one_resets_the_count():
    from megatron_ext.training.train import NonFiniteGuard, NonFiniteTraining

    nan = float("nan")
    guard = NonFiniteGuard("skip", patience=2)
    for iteration, finite in enumerate([False, False, True, False, False], start=1):
        guard.after_step(iteration, finite, 1.0 if finite else nan, 1.0, "iter_0000001")
    with pytest.raises(NonFiniteTraining, match=r"^iteration 6: loss nan, grad norm 1\.0 not finite \(3 in a row\)"):
        guard.after_step(6, False, nan, 1.0, "iter_0000003")
    with pytest.raises(NonFiniteTraining, match=r"^iteration 1: .* the last checkpoint is none"):
        NonFiniteGuard("stop", patience=5).after_step(1, False, nan, nan, None)


def srun_tasks(config: Path, *args: str, tasks: int = 2) -> list[subprocess.Popen]:
    """`tasks` ranks started as srun starts them: one process per task through megatron_ext.launch.slurm, with
    SLURM's variables, all in one process group (srun delivers a signal to every task)."""
    from conftest import _free_port

    slurm = dict(ENV, SLURM_STEP_NUM_TASKS=str(tasks), SLURM_STEP_TASKS_PER_NODE=str(tasks), SLURM_NODEID="0",
                 SLURM_STEP_NODELIST="localhost", SLURM_JOB_ID="4242", MASTER_PORT=str(_free_port()))
    command = [sys.executable, "-m", "megatron_ext.launch.slurm", "--", *train_command(config, *args)]
    started: list[subprocess.Popen] = []
    for rank in range(tasks):
        group = {"process_group": 0 if rank == 0 else started[0].pid}
        started.append(subprocess.Popen(command, env=dict(slurm, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank)),
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **group))
    return started


def finish(tasks: list[subprocess.Popen]) -> list[tuple[int, str]]:
    return [(task.returncode, output) for task, output in ((t, t.communicate(timeout=300)[0]) for t in tasks)]


@pytest.mark.parametrize("async_save", [False, True], ids=["sync-save", "async-save"])
def test_usr1_to_every_srun_task_saves_once_and_the_resume_matches_the_uninterrupted_run(work, async_save):
    """Two ranks under srun, SLURM's pre-timeout USR1 to the whole step: every rank saves the same iteration
    once, exits 0, and the resumed run (a requeued job) repeats the uninterrupted two-rank run."""
    name = "srun_async" if async_save else "srun"
    config = yaml.safe_load(write_config(work, name, train_iters=LONG_RUN).read_text())
    config["checkpoint"]["async_save"] = async_save
    (work / f"{name}.yaml").write_text(yaml.safe_dump(config))
    metrics = work / f"{name}.jsonl"
    tasks = srun_tasks(work / f"{name}.yaml")
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert all(t.poll() is None for t in tasks) and time.monotonic() < deadline, finish(tasks)
        time.sleep(0.05)
    os.killpg(tasks[0].pid, signal.SIGUSR1)
    stopped = finish(tasks)
    assert [rc for rc, _ in stopped] == [0, 0], stopped[0][1][-3000:] + stopped[1][1][-3000:]
    stopped_at = int(latest(work / name).removeprefix("iter_"))
    assert 2 <= stopped_at < LONG_RUN
    assert sorted(p.name for p in (work / name).iterdir()) == [f"iter_{stopped_at:07d}", "latest"]

    end = stopped_at + 2
    resumed = finish(srun_tasks(work / f"{name}.yaml", "--set", "training.exit_interval=2"))
    assert [rc for rc, _ in resumed] == [0, 0], resumed[0][1][-3000:]
    reference = write_config(work, f"{name}_reference", train_iters=LONG_RUN, exit_interval=end)
    uninterrupted = finish(srun_tasks(reference))
    assert [rc for rc, _ in uninterrupted] == [0, 0], uninterrupted[0][1][-3000:]
    interrupted, expected = losses(work, name), losses(work, f"{name}_reference")
    assert sorted(interrupted) == list(range(1, end + 1))
    assert [interrupted[i] for i in range(1, end + 1)] == pytest.approx([expected[i] for i in range(1, end + 1)],
                                                                        abs=1e-6)
