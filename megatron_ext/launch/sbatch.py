"""Render an sbatch script: srun with one task per GPU, ranks from SLURM's variables
(megatron_ext.launch.slurm, no torchrun), a pyxis/enroot or Apptainer container, NCCL settings, and for
training: USR1 before the time limit -> every rank saves a checkpoint -> the job requeues -> resume auto.

The scripts in examples/slurm/ are this module's output (a test keeps them equal). Imports no megatron.
"""

import re
import shlex
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from megatron_ext import __version__

TEMPLATE = """\
#!/bin/bash
# {{title}}
#
# Rendered by: {{generated_by}}
{{notes}}#
# Submit from the directory your config paths are relative to (it becomes the container's working
# directory), after building the image (docs/launch.md, "The container"):
{{image_steps}}#   mkdir -p logs && sbatch {{script}} [more arguments for megatron-ext {{job}}]
# Read from the environment at submission, default in brackets:
#   CONTAINER_IMAGE    pyxis: a .sqsh file or registry#image:tag; Apptainer: a .sif [{{container_image}}]
#   CONTAINER_MOUNTS   host:container,... besides this directory [{{container_mounts}}]
#   CONTAINER_RUNTIME  pyxis (srun --container-image), apptainer (apptainer exec --nv) or none (the
#                      job's own environment: megatron-ext and python on PATH) [{{container_runtime}}]
#   HF_HOME            the Hugging Face cache the tasks see (models; the datasets lm-eval reads: compute nodes
#                      are often offline, so fetch them first on a login node with the same HF_HOME)
#                      [$PWD/.cache/huggingface]; HF_DATASETS_CACHE [$HF_HOME/datasets]
#   TRITON_CACHE_DIR   compiled Triton kernels, kept across requeues [$PWD/.cache/triton]
#SBATCH --job-name={{job_name}}
#SBATCH --nodes={{nodes}}
#SBATCH --ntasks-per-node={{tasks_per_node}}
{{resource_directives}}#SBATCH --mem={{mem}}
#SBATCH --exclusive
#SBATCH --time={{time}}
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
{{directives}}
set -euo pipefail

CONTAINER_IMAGE=${CONTAINER_IMAGE:-{{container_image}}}
CONTAINER_MOUNTS=${CONTAINER_MOUNTS-{{container_mounts}}}  # set it empty for none

# Rank 0 runs on the first node; every task derives the same port from the job id.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=$((15000 + SLURM_JOB_ID % 15000))
export MASTER_ADDR MASTER_PORT

export CUDA_DEVICE_MAX_CONNECTIONS=1      # megatron: TP/SP communication kernels run in issue order
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1  # a failed collective ends the job instead of hanging it
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# CPUs per task: what --cpus-per-task asked for, else this node's CPUs shared by its tasks (srun does not
# inherit sbatch's --cpus-per-task since SLURM 22.05, so it is passed on below).
CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-$(( ${SLURM_CPUS_ON_NODE:-$(nproc)} / ${SLURM_NTASKS_PER_NODE:-1} ))}
export OMP_NUM_THREADS=$CPUS_PER_TASK
export PYTHONUNBUFFERED=1
export PYTHONSAFEPATH=1  # python -m runs the installed megatron_ext, not a checkout in the submit directory
# Caches: the container has no home directory (--no-container-mount-home), so they are named here; one outside
# the submit directory is mounted too.
export HF_HOME=${HF_HOME:-$PWD/.cache/huggingface}
export HF_DATASETS_CACHE=${HF_DATASETS_CACHE:-$HF_HOME/datasets}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.cache/triton}
cache_mounts=
for cache in "$HF_HOME" "$HF_DATASETS_CACHE" "$TRITON_CACHE_DIR"; do
  mkdir -p "$cache"
  [[ $cache == "$PWD"/* || $cache == "$HF_HOME"/* ]] || cache_mounts+=",$cache:$cache"
done
# Fabric settings (NCCL_IB_HCA, NCCL_SOCKET_IFNAME, ...) are site-specific: see your cluster's guide.

launcher=(srun --kill-on-bad-exit=1 --cpus-per-task="$CPUS_PER_TASK")
mounts="$PWD:$PWD$cache_mounts${CONTAINER_MOUNTS:+,$CONTAINER_MOUNTS}"
case ${CONTAINER_RUNTIME:-{{container_runtime}}} in
  pyxis)
    launcher+=(--container-image="$CONTAINER_IMAGE" --container-mounts="$mounts" --container-workdir="$PWD"
               --no-container-mount-home) ;;
  apptainer)
    launcher+=(apptainer exec --nv --bind "$mounts" --pwd "$PWD" "$CONTAINER_IMAGE") ;;
  none) ;;
  *)
    echo "CONTAINER_RUNTIME must be pyxis, apptainer or none, not $CONTAINER_RUNTIME" >&2
    exit 2 ;;
esac

# One task per GPU; megatron_ext.launch.slurm turns SLURM_PROCID/LOCALID/... into RANK/LOCAL_RANK/...
command=(
{{command}}
  "$@"
)

{{run}}"""

RUN_ONCE = """\
"${launcher[@]}" python -m megatron_ext.launch.slurm -- "${command[@]}"
"""

RUN_WITH_REQUEUE = """\
# Before the time limit SLURM sends USR1 to this script (--signal=B:USR1@...); srun forwards it to
# every rank, which finishes its step, saves a checkpoint and exits. Then the job requeues itself
# and the next run continues from the newest checkpoint (--resume auto).
# A checkpoint.dir lock held by another job stops the run before its first step, and rank 0 appends
# why to $MEGATRON_EXT_LOCK_REFUSED. That job may be gone without its lock looking stale yet (its node
# died a moment ago): requeue, up to $LOCK_REQUEUES times in a row, and the lock is taken over once it
# does (megatron_ext/checkpoint/lock.py). A run that got the lock starts the count again.
export MEGATRON_EXT_LOCK_REFUSED="$PWD/logs/lock-refusals-$SLURM_JOB_ID"
LOCK_REQUEUES=3
lock_refusals() { if [[ -f $MEGATRON_EXT_LOCK_REFUSED ]]; then wc -l < "$MEGATRON_EXT_LOCK_REFUSED"; else echo 0; fi; }
refusals_before=$(lock_refusals)
stop_requested=0
srun_pid=
# shellcheck disable=SC2317  # called by the trap below
forward_stop() {
  stop_requested=1
  echo "$(date '+%F %T') time limit near: every rank saves a checkpoint and exits"
  if [[ -n $srun_pid ]]; then kill -USR1 "$srun_pid" || true; fi
}
trap forward_stop USR1

"${launcher[@]}" python -m megatron_ext.launch.slurm -- "${command[@]}" &
srun_pid=$!
status=0
wait "$srun_pid" || status=$?
while (( stop_requested )) && kill -0 "$srun_pid" 2>/dev/null; do  # the trap interrupted `wait`
  status=0
  wait "$srun_pid" || status=$?
done
if (( stop_requested )); then
  echo "requeueing job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}); it resumes from the newest checkpoint"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
refusals=$(lock_refusals)
if (( refusals > refusals_before )); then
  if (( refusals <= LOCK_REQUEUES )); then
    echo "checkpoint.dir locked by another job (refusal $refusals of $LOCK_REQUEUES): requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  echo "checkpoint.dir still locked after $LOCK_REQUEUES requeues: not requeueing again" >&2
else
  rm -f "$MEGATRON_EXT_LOCK_REFUSED"
fi
exit "$status"
"""

DEFAULT_IMAGE = "$PWD/megatron_ext.sqsh"
IMAGE_TAG = f"megatron-ext:{__version__}"  # what `make image` tags (tools/container_image.sh)
CONTAINER_RUNTIMES = ("pyxis", "apptainer", "none")
DEFAULT_MOUNTS = "/checkpoints:/checkpoints,/data:/data,/models:/models"


@dataclass
class SbatchJob:
    """Everything an sbatch script needs; `command` is the megatron-ext command line (as a list)."""

    job: str  # train | eval | convert
    title: str
    job_name: str
    command: list[str]
    nodes: int = 1
    gpus_per_node: int = 8
    tasks_per_node: int = 8
    cpus_per_task: int | None = None  # None: the node's CPUs shared by its tasks, worked out in the job
    mem: str = "0"  # --mem: 0 is all of each node's memory
    container_runtime: str = "pyxis"  # the default of CONTAINER_RUNTIME: pyxis | apptainer | none
    time: str = "04:00:00"
    partition: str | None = None
    account: str | None = None
    container_image: str = DEFAULT_IMAGE
    container_mounts: str = DEFAULT_MOUNTS
    signal_seconds: int | None = None  # train: USR1 this long before the limit, then requeue
    generated_by: str = ""
    script: str = "job.sbatch"
    notes: list[str] = field(default_factory=list)


def render(job: SbatchJob) -> str:
    if job.container_runtime not in CONTAINER_RUNTIMES:
        raise ValueError(f"container_runtime {job.container_runtime!r}: one of {', '.join(CONTAINER_RUNTIMES)}")
    resources = [f"#SBATCH --gpus-per-node={job.gpus_per_node}"] if job.gpus_per_node else []  # 0: a CPU job
    if job.cpus_per_task is not None:
        resources.append(f"#SBATCH --cpus-per-task={job.cpus_per_task}")
    directives = []
    if job.partition:
        directives.append(f"#SBATCH --partition={job.partition}")
    if job.account:
        directives.append(f"#SBATCH --account={job.account}")
    if job.signal_seconds is not None:
        directives += [f"#SBATCH --signal=B:USR1@{job.signal_seconds}", "#SBATCH --requeue"]
    values = {
        "title": job.title, "generated_by": job.generated_by, "script": job.script, "job": job.job,
        "notes": "".join(f"# {line}\n" if line else "#\n" for line in job.notes),
        "job_name": job.job_name, "nodes": job.nodes, "tasks_per_node": job.tasks_per_node,
        "resource_directives": "".join(line + "\n" for line in resources), "mem": job.mem,
        "container_runtime": job.container_runtime, "time": job.time,
        "directives": "".join(line + "\n" for line in directives), "container_image": job.container_image,
        "container_mounts": job.container_mounts,
        "command": "\n".join("  " + line for line in _command_lines(job.command)),
        "run": RUN_WITH_REQUEUE if job.signal_seconds is not None else RUN_ONCE,
        "image_steps": "".join(f"#   {line}\n" for line in image_steps(job)),
    }
    return re.sub(r"\{\{(\w+)\}\}", lambda m: str(values[m.group(1)]), TEMPLATE)


def image_steps(job: SbatchJob) -> list[str]:
    """The commands that make what CONTAINER_IMAGE names, run in this checkout: the image (`make image` for GPU
    jobs, `make image-cpu` for CPU jobs), then enroot's squashfs for pyxis (or a registry push) and, for
    Apptainer, a SIF. docs/launch.md, "The container", has the other ways."""
    if job.container_runtime == "none":
        return []
    image = job.container_image
    if job.gpus_per_node:  # docker build (buildah where no Docker engine runs)
        tag, engine = IMAGE_TAG, "docker"
        steps, sqsh_source, sif_source = ["make image"], f"dockerd://{tag}", f"docker-daemon://{tag}"
    else:  # buildah's (and podman's) image store
        tag, engine = f"localhost/{IMAGE_TAG}-cpu", "buildah"
        steps, sqsh_source, sif_source = ["make image-cpu"], f"podman://{tag}", "oci-archive:megatron_ext.tar"
    if "#" in image:  # pyxis pulls registry#name:tag itself
        remote = image.replace("#", "/")
        steps.append(f"{engine} tag {tag} {remote} && {engine} push {remote}")
    elif not image.endswith(".sif"):
        steps.append(f"enroot import -o {image} {sqsh_source}")
    sif = image if image.endswith(".sif") else "megatron_ext.sif"
    if not image.endswith(".sif"):
        steps.append(f"Apptainer instead: CONTAINER_RUNTIME=apptainer CONTAINER_IMAGE=$PWD/{sif}, made by")
    if not job.gpus_per_node:
        steps.append(f"buildah push {tag} oci-archive:megatron_ext.tar")
    return [*steps, f"apptainer build {sif} {sif_source}"]


def _command_lines(command: list[str]) -> list[str]:
    """The program and its first option pair on one line, then one `--option value` per line."""
    lines, current = [], []
    for word in command:
        if word.startswith("--") and current and any(w.startswith("--") for w in current):
            lines.append(" ".join(current))
            current = []
        current.append(shlex.quote(word))
    return lines + [" ".join(current)] if current else lines


def mounts_for(paths: list[str | None]) -> str:
    """host:container mounts for the top-level directories of the absolute paths a config names
    (relative paths live under the submit directory, which the script mounts itself)."""
    tops = sorted({PurePosixPath(p).parts[1] for p in paths if p and PurePosixPath(p).is_absolute()
                   and len(PurePosixPath(p).parts) > 1})
    return ",".join(f"/{top}:/{top}" for top in tops)


def signal_lead_seconds(step_seconds: float, checkpoint_seconds: float = 300.0) -> int:
    """How long before the time limit to ask for a checkpoint: the step in flight plus one more (the
    estimate's margin) plus the save, in whole minutes (SLURM may signal up to a minute early)."""
    return 60 * -(-int(2 * step_seconds + checkpoint_seconds) // 60)
