"""SLURM launch: ranks from SLURM's variables (no torchrun), sbatch scripts that parse, pass shellcheck,
match what `megatron-ext launch` renders, and requeue after the pre-timeout signal."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_ext.cli import main
from megatron_ext.distributed import distributed_env_from_slurm, expand_hostlist, expand_tasks_per_node

ROOT = Path(__file__).parent.parent
EXAMPLES = sorted((ROOT / "examples" / "slurm").glob("*.sbatch"))


def srun_task(procid, *, nodes="gpu-[07-08]", tasks_per_node="4(x2)", ntasks=8, job_id=4242):
    """The variables srun gives task `procid` of 2 nodes x 4 tasks (block distribution)."""
    return {"SLURM_JOB_ID": str(job_id), "SLURM_JOB_NODELIST": nodes, "SLURM_STEP_NODELIST": nodes,
            "SLURM_STEP_NUM_TASKS": str(ntasks), "SLURM_NTASKS": str(ntasks), "SLURM_PROCID": str(procid),
            "SLURM_LOCALID": str(procid % 4), "SLURM_NODEID": str(procid // 4),
            "SLURM_STEP_TASKS_PER_NODE": tasks_per_node}


def test_two_nodes_of_four_tasks_map_to_ranks():
    for procid in range(8):
        env = distributed_env_from_slurm(srun_task(procid))
        assert env == {"RANK": str(procid), "WORLD_SIZE": "8", "LOCAL_RANK": str(procid % 4),
                       "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "gpu-07", "MASTER_PORT": str(15000 + 4242)}


def test_outside_srun_there_is_nothing_to_map():
    batch_script = {"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "n1", "SLURM_NTASKS": "8", "SLURM_PROCID": "0"}
    assert distributed_env_from_slurm(batch_script) == {}
    assert distributed_env_from_slurm({}) == {}


def test_exported_master_address_and_port_win():
    env = distributed_env_from_slurm({**srun_task(5), "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29500"})
    assert (env["MASTER_ADDR"], env["MASTER_PORT"], env["RANK"]) == ("10.0.0.7", "29500", "5")


def test_inconsistent_task_variables_are_refused():
    with pytest.raises(ValueError, match="SLURM_LOCALID=4"):
        distributed_env_from_slurm({**srun_task(4), "SLURM_LOCALID": "4"})


def test_hostlists_and_task_counts_expand():
    assert expand_hostlist("gpu[07-08,10],login1,r[1-2]n[1-2]-ib") == [
        "gpu07", "gpu08", "gpu10", "login1", "r1n1-ib", "r1n2-ib", "r2n1-ib", "r2n2-ib"]
    assert expand_tasks_per_node("8(x2),4") == [8, 8, 4]
    env = distributed_env_from_slurm(srun_task(8, nodes="a[1-3]", tasks_per_node="4(x2),2", ntasks=10)
                                     | {"SLURM_LOCALID": "0", "SLURM_NODEID": "2"})
    assert (env["LOCAL_WORLD_SIZE"], env["MASTER_ADDR"]) == ("2", "a1")


def test_srun_wrapper_exports_the_mapping_and_runs_the_command():
    """`python -m megatron_ext.launch.slurm -- CMD` as srun starts it for tasks 1 and 6 of 2 nodes x 4; a RANK
    that is already set (torchrun inside srun) is kept."""
    show = "import json, os; print(json.dumps({k: os.environ[k] for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR')}))"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_"))}
    tasks = [base | srun_task(1), base | srun_task(6), base | srun_task(6) | {"RANK": "99"}]
    running = [subprocess.Popen([sys.executable, "-m", "megatron_ext.launch.slurm", "--", sys.executable, "-c", show],
                                env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True) for env in tasks]
    seen = [json.loads(p.communicate(timeout=60)[0]) for p in running]
    assert seen == [{"RANK": rank, "LOCAL_RANK": local, "WORLD_SIZE": "8", "MASTER_ADDR": "gpu-07"}
                    for rank, local in (("1", "1"), ("6", "2"), ("99", "2"))]


def test_examples_are_what_launch_renders(tmp_path, monkeypatch):
    """Each script in examples/slurm/ names the command that rendered it; running it again gives the same file."""
    assert {p.name for p in EXAMPLES} == {"train_harpe_128k.sbatch", "train_pose_2k_to_128k.sbatch",
                                          "eval.sbatch", "convert.sbatch"}
    shutil.copytree(ROOT / "examples" / "configs", tmp_path / "examples" / "configs")
    (tmp_path / "examples" / "slurm").mkdir()
    monkeypatch.chdir(tmp_path)
    for example in EXAMPLES:
        line = next(l for l in example.read_text().splitlines() if l.startswith("# Rendered by: "))
        argv = shlex.split(line.removeprefix("# Rendered by: "))
        assert argv[:2] == ["megatron-ext", "launch"]
        assert main(argv[1:]) == 0
        rendered = (tmp_path / "examples" / "slurm" / example.name).read_text()
        assert _stable(rendered) == _stable(example.read_text()), f"re-render {example.name}: {line[2:]}"


def _stable(script: str) -> list[str]:
    """The script without its estimate line, which moves with every change to the memory/time model."""
    return [line for line in script.splitlines() if not line.startswith("# estimated ")]


def _rendered_variant(tmp_path_factory) -> Path:
    """A script with every optional directive: partition, account, the config's own layout."""
    path = tmp_path_factory.mktemp("sbatch") / "variant.sbatch"
    assert main(["launch", "--config", "examples/configs/llama2_7b_harpe_128k.yaml", "--nodes", "8",
                 "--keep-layout", "--partition", "gpu", "--account", "proj", "--container-image",
                 "registry#team/megatron-ext:0.1.0", "--output", str(path)]) == 0
    return path


@pytest.mark.parametrize("example", [*EXAMPLES, "variant"], ids=lambda p: getattr(p, "name", p))
def test_sbatch_scripts_pass_bash_n_and_shellcheck(example, tmp_path_factory, monkeypatch):
    monkeypatch.chdir(ROOT)
    if example == "variant":
        example = _rendered_variant(tmp_path_factory)
    subprocess.run(["bash", "-n", str(example)], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    result = subprocess.run(["shellcheck", "--shell=bash", str(example)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_train_script_checks_the_layout_of_its_config(capsys):
    assert main(["launch", "--config", "examples/configs/llama2_7b_harpe_128k.yaml", "--nodes", "8",
                 "--keep-layout", "--partition", "gpu", "--time", "02:00:00"]) == 0
    text = capsys.readouterr().out
    assert "Layout (from the config): TP2 PP1 CP8 DP4, micro-batch 1, recompute none" in text
    assert "#SBATCH --partition=gpu\n" in text and "#SBATCH --requeue\n" in text
    assert "--set parallel" not in text  # the config's own layout
    assert main(["launch", "--config", "examples/configs/llama2_7b_harpe_128k.yaml", "--nodes", "8", "--keep-layout",
                 "--set", "training.recompute=none", "--set", "parallel.context_parallel_size=1"]) == 2
    error = capsys.readouterr().err
    assert re.match(r"megatron-ext launch: the config's layout \(TP2 PP1 CP1 DP32, .*\) on 64 GPUs: needs .*"
                    r"drop --keep-layout to let the planner choose\n$", error)


@pytest.mark.parametrize("flags, message", [
    (["--nodes", "1"], "--job train needs --config (the training YAML the job runs)"),
    (["--nodes", "0", "--job", "eval"], "--nodes 0: give at least 1"),
    (["--nodes", "1", "--job", "eval", "--config", "examples/configs/tiny_harpe_cpu.yaml"],
     "--job eval takes its settings at submission"),
    (["--nodes", "1", "--config", "examples/configs/llama2_7b_harpe_128k.yaml", "--gpu", "a100-80gb",
      "--gpus-per-node", "1"], "no layout of examples/configs/llama2_7b_harpe_128k.yaml fits 1 x "),
])
def test_bad_launch_arguments_are_one_line_errors(capsys, monkeypatch, flags, message):
    monkeypatch.chdir(ROOT)
    assert main(["launch", *flags]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"megatron-ext launch: {message}") and captured.err.count("\n") == 1
    assert "Traceback" not in captured.err and captured.out == ""


def _fake_cluster(tmp_path, trainer_exit):
    """`srun` and `scontrol` stand-ins that log what the batch script asks of them."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(
        '#!/bin/bash\nif [[ $1 == show ]]; then echo node1; else echo "scontrol $*" >> "$LOG"; fi\n')
    # The "ranks": log the command, then run until USR1 (save, exit 0) or exit with trainer_exit.
    (bin_dir / "srun").write_text(
        '#!/bin/bash\necho "srun $*" >> "$LOG"\n'
        'trap \'echo "rank saved a checkpoint" >> "$LOG"; exit 0\' USR1\n'
        f'if [[ {trainer_exit} == wait ]]; then while true; do sleep 0.05; done; fi\nexit {trainer_exit}\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = os.environ | {"PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(log), "SLURM_JOB_ID": "77",
                        "SLURM_JOB_NODELIST": "node1", "SLURM_CPUS_ON_NODE": "16", "SLURM_NTASKS_PER_NODE": "8"}
    env.pop("SLURM_CPUS_PER_TASK", None)
    return env, log


def test_time_limit_signal_saves_then_requeues(tmp_path):
    env, log = _fake_cluster(tmp_path, "wait")
    script = ROOT / "examples" / "slurm" / "train_harpe_128k.sbatch"
    job = subprocess.Popen(["bash", str(script), "--set", "training.train_iters=10"], env=env, cwd=tmp_path,
                           stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 20
    while not (log.exists() and "srun" in log.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)  # what SLURM sends the batch shell (--signal=B:USR1@...)
    out, _ = job.communicate(timeout=20)
    lines = log.read_text().splitlines()
    assert job.returncode == 0, out
    assert lines[0].startswith("srun --kill-on-bad-exit=1 --cpus-per-task=2 --container-image=") and lines[0].endswith(
        "megatron-ext train --config examples/configs/llama2_7b_harpe_128k.yaml --resume auto "
        "--set parallel.tensor_model_parallel_size=2 --set parallel.pipeline_model_parallel_size=1 "
        "--set parallel.context_parallel_size=8 --set parallel.sequence_parallel=true "
        "--set parallel.use_distributed_optimizer=true --set training.micro_batch_size=1 "
        "--set training.recompute=none --set training.train_iters=10")
    assert "python -m megatron_ext.launch.slurm --" in lines[0]
    assert lines[1:] == ["rank saved a checkpoint", "scontrol requeue 77"]


def test_a_failed_run_is_not_requeued(tmp_path):
    env, log = _fake_cluster(tmp_path, 3)
    script = ROOT / "examples" / "slurm" / "train_pose_2k_to_128k.sbatch"
    result = subprocess.run(["bash", str(script)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=20)
    assert result.returncode == 3
    assert "scontrol" not in log.read_text()


def test_a_refused_checkpoint_lock_requeues_a_few_times_then_stops(tmp_path):
    """The ranks stand-in takes checkpoint.dir's lock with the real lock module, as rank 0 of `train` does."""
    from megatron_ext.checkpoint.lock import LOCK_FILE, REFUSALS_FILE_VARIABLE

    env, log = _fake_cluster(tmp_path, 0)
    (tmp_path / "bin" / "srun").write_text(
        f'#!/bin/bash\n"{sys.executable}" -c "import sys; from megatron_ext.checkpoint.lock import *\n'
        f'try: lock_checkpoint_dir(sys.argv[1])\nexcept CheckpointDirLocked: sys.exit(2)" "$CKPT"\n')
    (tmp_path / "logs").mkdir()
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    lock = checkpoint / LOCK_FILE
    lock.write_text(json.dumps({"host": "gpu-node-07", "pid": 4242, "heartbeat_s": 30.0}))  # a live job's
    env |= {"CKPT": str(checkpoint), "PYTHONPATH": str(ROOT)}
    script = ROOT / "examples" / "slurm" / "train_pose_2k_to_128k.sbatch"
    assert f"export {REFUSALS_FILE_VARIABLE}=" in script.read_text()

    def run_job():
        return subprocess.run(["bash", str(script)], env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=60)

    for refusal in (1, 2, 3):
        result = run_job()
        assert result.returncode == 0, result.stderr
        assert f"(refusal {refusal} of 3): requeueing job 77" in result.stdout
        assert log.read_text().splitlines() == ["scontrol requeue 77"] * refusal
    result = run_job()  # a lock held that long belongs to a job that runs: no endless requeues
    assert result.returncode == 2 and "still locked after 3 requeues" in result.stderr
    assert log.read_text().count("scontrol requeue") == 3

    stale = time.time() - 3600  # its heartbeat stopped: the next run takes the lock and the count starts over
    os.utime(lock, (stale, stale))
    result = run_job()
    assert result.returncode == 0 and log.read_text().count("scontrol requeue") == 3
    assert not (tmp_path / "logs" / "lock-refusals-77").exists()


def test_apptainer_runtime_wraps_each_task(tmp_path):
    env, log = _fake_cluster(tmp_path, 0)
    env |= {"CONTAINER_RUNTIME": "apptainer", "CONTAINER_IMAGE": "/img/megatron_ext.sif", "CONTAINER_MOUNTS": ""}
    script = ROOT / "examples" / "slurm" / "eval.sbatch"
    result = subprocess.run(["bash", str(script), "--task", "passkey"], env=env, cwd=tmp_path, timeout=20)
    assert result.returncode == 0
    assert log.read_text().splitlines() == [
        f"srun --kill-on-bad-exit=1 --cpus-per-task=2 apptainer exec --nv --bind {tmp_path}:{tmp_path} --pwd {tmp_path} "
        "/img/megatron_ext.sif python -m megatron_ext.launch.slurm -- megatron-ext eval --task passkey"]
    env["CONTAINER_RUNTIME"] = "docker"
    result = subprocess.run(["bash", str(script)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=20)
    assert result.returncode == 2 and "CONTAINER_RUNTIME must be pyxis, apptainer or none" in result.stderr


def test_cpu_ranks_share_the_cores_of_their_node_unless_omp_num_threads_says_otherwise():
    from megatron_ext.distributed import cpu_threads_per_rank

    assert cpu_threads_per_rank({"LOCAL_WORLD_SIZE": "2"}, cpus=16) == 8
    assert cpu_threads_per_rank({"LOCAL_WORLD_SIZE": "4"}, cpus=2) == 1
    assert cpu_threads_per_rank({}, cpus=6) == 6  # one process
    srun = dict(SLURM_STEP_NUM_TASKS="4", SLURM_PROCID="1", SLURM_LOCALID="1", SLURM_NODEID="0",
                SLURM_STEP_TASKS_PER_NODE="2(x2)", SLURM_STEP_NODELIST="n[1-2]")
    assert cpu_threads_per_rank(srun, cpus=16) == 8  # two tasks on this node
    assert cpu_threads_per_rank({"LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "3"}, cpus=16) is None
