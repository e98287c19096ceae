"""`python -m megatron_ext.launch.slurm -- COMMAND`: what srun starts on every task, without torchrun.

    srun ... python -m megatron_ext.launch.slurm -- megatron-ext train --config x.yaml

sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT from the srun task's
SLURM_* variables (values already set, e.g. by torchrun, win; the mapping is
megatron_ext.distributed.distributed_env_from_slurm) and runs the command in their place.
Standard library only: it runs inside the container before anything heavy is imported.
"""

import os
import sys

from megatron_ext.distributed import distributed_env_from_slurm


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
