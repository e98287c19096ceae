"""torch.distributed's rank variables from SLURM's, so `srun` starts one process per GPU without torchrun.

    srun ... python -m megatron_ext.launch.slurm -- megatron-ext train --config x.yaml

sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT from the srun task's
SLURM_* variables (values already set, e.g. by torchrun, win) and runs the command in their place.
Standard library only: it runs inside the container before anything heavy is imported.
"""

import os
import re
import sys
from collections.abc import Mapping

PORT_BASE, PORT_SPAN = 15000, 15000  # below Linux's ephemeral ports (32768+)


def expand_hostlist(hostlist: str) -> list[str]:
    """SLURM's compressed host list -> host names: 'gpu[07-08,10],login1' -> gpu07, gpu08, gpu10, login1.

    Zero padding is kept ('[07-08]'); several bracket groups in one name multiply ('r[1-2]n[1-2]')."""
    hosts = []
    for item in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", hostlist):
        hosts += _expand_one(item)
    return hosts


def _expand_one(name: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", name)
    if match is None:
        return [name]
    head, tail = name[:match.start()], name[match.end():]
    numbers = []
    for part in match.group(1).split(","):
        first, _, last = part.partition("-")
        width = len(first)
        numbers += [str(i).zfill(width) for i in range(int(first), int(last or first) + 1)]
    return [head + number + rest for number in numbers for rest in _expand_one(tail)]


def expand_tasks_per_node(spec: str) -> list[int]:
    """SLURM's tasks-per-node list -> one count per node: '4(x2),3' -> [4, 4, 3]."""
    counts = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            raise ValueError(f"cannot read tasks per node {spec!r}: expected e.g. '8(x2),4'")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def distributed_env_from_slurm(environ: Mapping[str, str]) -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT of this srun task,
    or {} outside an srun step (a batch script, salloc shell or no SLURM: SLURM_STEP_NUM_TASKS unset).

    MASTER_ADDR is the step's first node, where SLURM puts rank 0; MASTER_PORT is derived from the
    job id so that every task agrees without talking. A MASTER_ADDR or MASTER_PORT already in
    `environ` (e.g. exported by the sbatch script) is kept.
    """
    if "SLURM_STEP_NUM_TASKS" not in environ or "SLURM_PROCID" not in environ:
        return {}
    rank, world = int(environ["SLURM_PROCID"]), int(environ["SLURM_STEP_NUM_TASKS"])
    local_rank, node = int(environ["SLURM_LOCALID"]), int(environ.get("SLURM_NODEID", "0"))
    per_node = expand_tasks_per_node(environ.get("SLURM_STEP_TASKS_PER_NODE")
                                     or environ.get("SLURM_TASKS_PER_NODE", str(world)))
    nodelist = (environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
                or environ.get("SLURM_NODELIST"))
    if node >= len(per_node) or not 0 <= local_rank < per_node[node] or not 0 <= rank < world:
        raise ValueError(
            f"inconsistent SLURM task: SLURM_PROCID={rank} of {world}, SLURM_LOCALID={local_rank}, "
            f"SLURM_NODEID={node}, tasks per node {per_node}: start it with srun inside the allocation"
        )
    master = environ.get("MASTER_ADDR") or (expand_hostlist(nodelist)[0] if nodelist else None)
    if master is None:
        raise ValueError("no SLURM_STEP_NODELIST / SLURM_JOB_NODELIST to find rank 0's node: export MASTER_ADDR")
    port = environ.get("MASTER_PORT") or str(PORT_BASE + int(environ.get("SLURM_JOB_ID", "0")) % PORT_SPAN)
    return dict(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank),
                LOCAL_WORLD_SIZE=str(per_node[node]), MASTER_ADDR=master, MASTER_PORT=port)


def main(argv: list[str] | None = None) -> int:
    """Export the mapping (without overwriting what is set) and exec the command after `--`."""
    command = list(sys.argv[1:] if argv is None else argv)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        print("usage: python -m megatron_ext.launch.slurm -- COMMAND [ARGS...]  (inside srun)", file=sys.stderr)
        return 2
    mapping = distributed_env_from_slurm(os.environ)
    if not mapping:
        print("megatron_ext.launch.slurm: not inside an srun step; running the command unchanged", file=sys.stderr)
    for key, value in mapping.items():
        os.environ.setdefault(key, value)
    os.execvp(command[0], command)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
