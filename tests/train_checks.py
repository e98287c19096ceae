"""Gloo worker for the training tests: torchrun --nproc-per-node 2 train_checks.py WORKDIR CONFIG_JSON.

Runs the training entry point several times in one launch (a launch costs ~10 s on CPU):
DP=2, TP=2, PP=2, CP=2, a run stopped after 2 iterations and resumed, a TP=1 run
resumed from the TP=2 run's checkpoint, and document-masked runs at DP=2 and CP=2. Writes
every run's per-iteration losses to WORKDIR/results.json for test_train.py to compare.
"""

import json
import sys
from pathlib import Path

from megatron_ext.config import TrainConfig, apply_override, from_dict, validate
from megatron_ext.training.train import train


DOCUMENT_MASK = ["data.document_mask=true", "data.mask_eod_loss=true"]
# the tiny corpus's documents run to thousands of tokens: 12 windows of 512 hold one document boundary (window 9)
LONG = ["model.seq_length=512", "training.train_iters=3"]


def run(base: dict, name: str, workdir: Path, overrides: list[str]) -> dict[int, float]:
    raw = json.loads(json.dumps(base))
    raw.setdefault("checkpoint", {})["dir"] = str(workdir / name)
    raw.setdefault("logging", {}).update(tensorboard_dir=None, metrics_file=None, progress_bar=False)
    for item in overrides:
        apply_override(raw, item)
    config = from_dict(TrainConfig, raw, prefix="")
    validate(config)
    return train(config).losses


def main(workdir: str, base_json: str):
    import torch

    workdir = Path(workdir)
    base = json.loads(Path(base_json).read_text())
    results = {
        "dp2": run(base, "dp2", workdir, []),
        "tp2": run(base, "tp2", workdir, ["parallel.tensor_model_parallel_size=2"]),
        "pp2": run(base, "pp2", workdir, ["parallel.pipeline_model_parallel_size=2"]),
        "cp2": run(base, "cp2", workdir, ["parallel.context_parallel_size=2"]),
        "dp2_distributed_optimizer": run(base, "dp2_do", workdir, ["parallel.use_distributed_optimizer=true"]),
        "dp2_full_recompute": run(base, "dp2_recompute", workdir, ["training.recompute=full"]),
        "long_dp2": run(base, "long_dp2", workdir, LONG),
        "documents_dp2": run(base, "documents_dp2", workdir, [*LONG, *DOCUMENT_MASK]),
        "documents_cp2": run(base, "documents_cp2", workdir,
                             [*LONG, *DOCUMENT_MASK, "parallel.context_parallel_size=2"]),
    }
    first = run(base, "resumed", workdir, ["training.exit_interval=2"])
    second = run(base, "resumed", workdir, ["checkpoint.resume=auto"])
    results["resume_first_leg"], results["resume_second_leg"] = first, second
    tp2_checkpoint = workdir / "tp2" / "iter_0000003"
    results["tp2_to_tp1"] = run(base, "tp2_to_tp1", workdir, [f"checkpoint.resume={tp2_checkpoint}"])
    results["pretrained"] = run(base, "pretrained", workdir, [f"checkpoint.pretrained={tp2_checkpoint}",
                                                              "training.train_iters=1"])
    if torch.distributed.get_rank() == 0:
        (workdir / "results.json").write_text(json.dumps(results))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
