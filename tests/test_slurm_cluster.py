"""The rendered sbatch script on a real one-node SLURM (tests/slurm_cluster.py starts slurmctld, slurmd and
munged here; skipped with its reason where they cannot run): a tiny CPU config in two srun tasks receives
SLURM's pre-timeout USR1 (`scancel --signal=USR1 --batch`, what `--signal=B:USR1@...` sends), every rank saves
once, the job requeues itself, and the requeued run resumes with --resume auto to the end with the losses of
an uninterrupted two-rank run."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from megatron_ext.cli import main
from slurm_cluster import ClusterUnavailable, start_cluster, stop_cluster
from test_train import base_config

pytestmark = pytest.mark.distributed
ITERS = 40


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    directory = tmp_path_factory.mktemp("slurm")
    try:
        env = start_cluster(directory)
    except ClusterUnavailable as why:
        pytest.skip(f"no local SLURM cluster: {why}")
    yield dict(env, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", PYTHONWARNINGS="ignore")
    stop_cluster(directory)


def write_config(work: Path, name: str) -> Path:
    config = base_config(work / "cache")
    config["training"]["train_iters"] = ITERS
    config["checkpoint"] = dict(dir=str(work / name), save_interval=ITERS, keep_last=None)
    config["logging"] = dict(metrics_file=str(work / f"{name}.jsonl"), tensorboard_dir=None, progress_bar=False)
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def losses(path: Path) -> dict[int, float]:
    return {row["iteration"]: row["loss"] for row in map(json.loads, path.read_text().splitlines())}


def slurm(env, *command: str) -> str:
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, f"{' '.join(command)}: {run.stderr}"
    return run.stdout.strip()


def job_state(env, job: str) -> str:
    return next(field.split("=", 1)[1] for field in slurm(env, "scontrol", "show", "job", job).split()
                if field.startswith("JobState="))


def wait_for(condition, seconds: float, what: str, diagnose) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {seconds:.0f} s: {diagnose()[-4000:]}"
        time.sleep(0.5)


def test_usr1_before_the_time_limit_saves_requeues_and_the_requeued_job_finishes_the_run(cluster, tmp_path,
                                                                                           monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, "job")
    assert main(["launch", "--config", str(config), "--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "2",
                 "--container-runtime", "none", "--time", "00:20:00", "--output", "job.sbatch"]) == 0
    (tmp_path / "logs").mkdir()
    job = slurm(cluster, "sbatch", "--parsable", "job.sbatch").split(";")[0]
    log = lambda: "\n".join(p.read_text() for p in (tmp_path / "logs").glob("*.out"))  # noqa: E731
    metrics = tmp_path / "job.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, 240, "two iterations", log)
    slurm(cluster, "scancel", "--signal=USR1", "--batch", job)
    wait_for(lambda: job_state(cluster, job) == "PENDING", 240, "the job requeued", log)
    stopped_at = int((tmp_path / "job" / "latest").read_text().strip().removeprefix("iter_"))
    assert 2 <= stopped_at < ITERS and max(losses(metrics)) == stopped_at
    assert sorted(p.name for p in (tmp_path / "job").glob("iter_*")) == [f"iter_{stopped_at:07d}"]

    slurm(cluster, "scontrol", "update", f"jobid={job}", "StartTime=now")  # SLURM delays a requeued job
    wait_for(lambda: job_state(cluster, job) == "COMPLETED", 300, "the requeued job to finish", log)
    text = log()
    assert "time limit near: every rank saves a checkpoint" in text and f"requeueing job {job}" in text

    reference = write_config(tmp_path, "reference")
    run = subprocess.run([sys.executable, "-m", "megatron_ext.cli", "train", "--config", str(reference),
                          "--nproc-per-node", "2"], env=dict(cluster, OMP_NUM_THREADS="1"),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    interrupted, uninterrupted = losses(metrics), losses(tmp_path / "reference.jsonl")
    assert sorted(interrupted) == list(range(1, ITERS + 1))
    assert [interrupted[i] for i in range(1, ITERS + 1)] == pytest.approx(
        [uninterrupted[i] for i in range(1, ITERS + 1)], abs=1e-6)
