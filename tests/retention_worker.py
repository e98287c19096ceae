"""One rank of tests/test_checkpoint_retention.py's two-rank keep_last case (no megatron: retention needs only
torch.distributed).

    python retention_worker.py RANK WORLD PORT ROOT SAVED KEEP_LAST   prune ROOT as a save of SAVED would; print one
        JSON line: the names this rank saw removed (rank 0 removes) and the files of each checkpoint it verified
"""
import json
import sys
from pathlib import Path

import torch

from megatron_ext.checkpoint import retention


def main(rank: int, world: int, port: int, root: Path, saved: str, keep_last: int) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    read = {}
    problems = retention.file_problems

    def recording(checkpoint, listed):  # this rank's share of each checkpoint it verifies
        read.setdefault(Path(checkpoint).name, []).extend(sorted(listed))
        return problems(checkpoint, listed)

    retention.file_problems = recording
    removed = retention.prune(root, keep_last, root / saved, token=f"test{rank}")
    torch.distributed.barrier()
    print(json.dumps({"rank": rank, "removed": removed, "read": read}))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    rank, world, port = (int(value) for value in sys.argv[1:4])
    main(rank, world, port, Path(sys.argv[4]), sys.argv[5], int(sys.argv[6]))
