"""A real one-node SLURM cluster for the tests: munged, slurmctld and slurmd on this machine.

`start_cluster(directory)` installs Debian's slurm-wlm and munge where they are missing (root and apt-get only),
writes a slurm.conf for this host into `directory`, starts the daemons and waits until the node is idle; it
returns the environment (SLURM_CONF) that sbatch/squeue/scontrol need, or raises ClusterUnavailable saying
why. `stop_cluster(directory)` stops the two SLURM daemons it started (munged stays: it may serve others).
"""
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


class ClusterUnavailable(RuntimeError):
    pass


def _install() -> None:
    if shutil.which("slurmctld") and shutil.which("munged"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise ClusterUnavailable("slurm-wlm is not installed and this is not a root Debian/Ubuntu machine")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]):
        run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        if run.returncode != 0:
            raise ClusterUnavailable(f"{' '.join(command)} failed: {run.stderr.strip()[-300:]}")


def _config(directory: Path, host: str) -> str:
    memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 // 2
    return "\n".join([
        "ClusterName=megatron-ext-tests", f"SlurmctldHost={host}", "SlurmUser=root", "AuthType=auth/munge",
        f"StateSaveLocation={directory}/state", f"SlurmdSpoolDir={directory}/spool",
        f"SlurmctldPidFile={directory}/slurmctld.pid", f"SlurmdPidFile={directory}/slurmd.pid",
        f"SlurmctldLogFile={directory}/slurmctld.log", f"SlurmdLogFile={directory}/slurmd.log",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "ReturnToService=2",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "JobRequeue=1", "MpiDefault=none",
        "SchedulerParameters=sched_interval=1", "MinJobAge=600",
        f"NodeName={host} CPUs={os.cpu_count()} RealMemory={memory_mb} State=UNKNOWN",
        f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES", ""])


def _start_munge() -> None:
    if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
        return
    for path in ("/etc/munge", "/var/log/munge", "/run/munge", "/var/lib/munge"):
        Path(path).mkdir(parents=True, exist_ok=True)
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        key.write_bytes(os.urandom(1024))
    subprocess.run(["chown", "-R", "munge:munge", "/etc/munge", "/var/log/munge", "/run/munge", "/var/lib/munge"],
                   capture_output=True)
    key.chmod(0o400)
    subprocess.run(["munged", "--force"], capture_output=True, timeout=30)
    _wait(lambda: subprocess.run(["munge", "-n"], capture_output=True).returncode == 0, 10, "munged")


def _wait(ready, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not ready():
        if time.monotonic() > deadline:
            raise ClusterUnavailable(f"{what} did not come up within {seconds:.0f} s")
        time.sleep(0.5)


def start_cluster(directory: Path) -> dict:
    directory = Path(directory)
    _install()
    for sub in ("state", "spool"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().split(".")[0]
    conf = directory / "slurm.conf"
    conf.write_text(_config(directory, host))
    env = dict(os.environ, SLURM_CONF=str(conf))
    _start_munge()
    for daemon in ("slurmctld", "slurmd"):
        run = subprocess.run([daemon, "-f", str(conf)], env=env, capture_output=True, text=True, timeout=60)
        if run.returncode != 0:
            raise ClusterUnavailable(f"{daemon} did not start: {run.stderr.strip()[-300:]}")

    def idle() -> bool:
        state = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True)
        return "idle" in state.stdout
    _wait(idle, 60, "the SLURM node")
    return env


def stop_cluster(directory: Path) -> None:
    for name in ("slurmd.pid", "slurmctld.pid"):
        pid_file = Path(directory) / name
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            continue
        try:
            os.kill(pid, signal.SIGTERM)
            for _ in range(20):
                os.kill(pid, 0)
                time.sleep(0.25)
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
