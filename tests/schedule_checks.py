"""Gloo worker for test_schedule.py: torchrun --nproc-per-node 2 schedule_checks.py WORKDIR CONFIG_JSON.

One launch (a launch costs ~8 s on CPU), several training runs, each writing its metrics file
(WORKDIR/NAME.jsonl: loss, lr, validation loss) for the test to compare:
DP=2 (the reference: DP=2 equals one process, tests/test_train.py), PP=2 x VPP=2 interleaved (also with
the distributed optimizer and overlapped gradient reduction), CP=2,
interleaved stopped after 2 iterations and resumed, DP=2 resumed from the interleaved run's checkpoint, and a
batch-size ramp-up uninterrupted and stopped + resumed.
"""

import json
import sys
from pathlib import Path

from megatron_ext.config import TrainConfig, apply_override, from_dict, validate
from megatron_ext.training.train import train

INTERLEAVED = ["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=2"]
RAMP = ["training.rampup_batch_size=[2,2,4]"]


def run(base: dict, name: str, workdir: Path, overrides: list[str], checkpoint_dir: str | None = None) -> None:
    raw = json.loads(json.dumps(base))
    raw.setdefault("checkpoint", {})["dir"] = str(workdir / (checkpoint_dir or name))
    raw.setdefault("logging", {}).update(tensorboard_dir=None, metrics_file=str(workdir / f"{name}.jsonl"),
                                         progress_bar=False)
    for item in overrides:
        apply_override(raw, item)
    config = from_dict(TrainConfig, raw, prefix="")
    validate(config)
    train(config)


def main(workdir: str, base_json: str):
    import torch

    workdir = Path(workdir)
    base = json.loads(Path(base_json).read_text())
    run(base, "dp2", workdir, [])
    run(base, "interleaved", workdir, INTERLEAVED)
    run(base, "interleaved_distributed_optimizer", workdir, [*INTERLEAVED, "parallel.use_distributed_optimizer=true",
                                                             "parallel.overlap_grad_reduce=true"])
    run(base, "cp2", workdir, ["parallel.context_parallel_size=2"])
    run(base, "interleaved_resumed", workdir, [*INTERLEAVED, "training.exit_interval=2"])
    run(base, "interleaved_resumed_leg2", workdir, INTERLEAVED, checkpoint_dir="interleaved_resumed")
    run(base, "interleaved_to_dp2", workdir, [f"checkpoint.resume={workdir / 'interleaved' / 'iter_0000003'}"])
    run(base, "ramp", workdir, RAMP)
    run(base, "ramp_resumed", workdir, [*RAMP, "training.exit_interval=2"])
    run(base, "ramp_resumed_leg2", workdir, RAMP, checkpoint_dir="ramp_resumed")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
