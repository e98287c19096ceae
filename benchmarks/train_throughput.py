"""Training throughput of the tiny default: stock RoPE vs HARPE vs PoSE (L_c = L_t / 8), in one run.

Run: python benchmarks/train_throughput.py [--iters 8] [--seq-length 1024]
Each variant trains the same tiny model through the real entry point (megatron-core schedules,
DDP, optimizer) for --iters iterations; the first is dropped as warm-up. Prints a table and
writes docs/results/train_throughput.json.
"""

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path

import torch

from megatron_ext.config import TrainConfig, apply_override, from_dict, validate

TINY = Path(__file__).resolve().parent.parent / "examples" / "configs" / "tiny_harpe_cpu.yaml"


def variants(seq_length: int) -> dict[str, list[str]]:
    return {
        "stock RoPE (one base)": ["rope.head_base_strategy=null"],
        "HARPE (per-head bases)": [],  # the tiny example's uniform per-head bases
        f"PoSE (L_c={seq_length // 8}, L_t={seq_length})": [
            "rope.head_base_strategy=null", f"model.seq_length={seq_length // 8}", "pose.enabled=true",
            f"pose.target_length={seq_length}", "rope.scaling=linear", "rope.scaling_params={factor: 8.0}",
            # same tokens per iteration as the others
            "training.micro_batch_size=16", "training.global_batch_size=64",
        ],
    }


def measure(name: str, overrides: list[str], args, workdir: Path) -> dict:
    import yaml

    from megatron_ext.training.train import train

    raw = yaml.safe_load(TINY.read_text())
    for item in [f"model.seq_length={args.seq_length}", f"training.train_iters={args.iters}",
                 "optimizer.warmup_iters=1", f"checkpoint.save_interval={10 * args.iters}",
                 f"data.cache_dir={args.cache_dir}", "logging.progress_bar=false", "logging.tensorboard_dir=null",
                 f"logging.metrics_file={workdir / 'metrics.jsonl'}", f"checkpoint.dir={workdir / 'ckpt'}",
                 "checkpoint.resume=none", *overrides]:
        apply_override(raw, item)
    config = from_dict(TrainConfig, raw, prefix="")
    validate(config)
    train(config)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steady = rows[1:]
    return dict(variant=name, seq_length=config.model.seq_length,
                tokens_per_iteration=config.training.global_batch_size * config.model.seq_length,
                tokens_per_s=statistics.median(r["tokens_per_s"] for r in steady),
                step_s=statistics.median(r["step_s"] for r in steady), final_loss=rows[-1]["loss"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--cache-dir", default="runs/cache")
    parser.add_argument("--out", default="docs/results/train_throughput.json")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    results = []
    for name, overrides in variants(args.seq_length).items():
        with tempfile.TemporaryDirectory() as tmp:
            results.append(measure(name, overrides, args, Path(tmp)))
    stock = results[0]["tokens_per_s"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"\ntiny model training throughput, {device}, median of iterations 2..{args.iters}")
    print(f"{'variant':<32}{'seq':>6}{'tokens/iter':>13}{'step (s)':>10}{'tokens/s':>11}{'vs stock':>10}")
    for r in results:
        r["ratio_to_stock"] = r["tokens_per_s"] / stock
        print(f"{r['variant']:<32}{r['seq_length']:>6}{r['tokens_per_iteration']:>13}{r['step_s']:>10.2f}"
              f"{r['tokens_per_s']:>11.0f}{r['ratio_to_stock']:>10.3f}")
    command = f"python benchmarks/train_throughput.py --iters {args.iters} --seq-length {args.seq_length}"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(command=command, device=device, torch=torch.__version__,
                                              results=results), indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
