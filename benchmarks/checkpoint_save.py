"""Seconds of training stalled per checkpoint save, synchronous vs background (checkpoint.async_save), and
the share of a save spent on the manifest's CRC-32, on the tiny model and a ~100M-parameter model (CPU).

Run: python benchmarks/checkpoint_save.py [--iters 13] [--save-interval 3] [--models tiny,100m] [--repeats 3]
Each model trains through the real entry point three times: no checkpoint until the end, a synchronous save
every --save-interval iterations, and the same saves in the background. Rows of metrics.jsonl carry their
wall-clock time; the loop's time from the first row to the last, minus the no-save run's, divided by the
saves in between, is the stall per save (for a background save: the copy of the state, the finalize step,
and whatever the writing thread takes from the training steps); the rows' checkpoint_s, summed, is the time
the loop was blocked in the save calls themselves (robust to a busy machine, blind to that contention). The
CRC-32 share: the manifest's checksums of the last synchronous checkpoint, recomputed, over the synchronous
blocked time. Disk timings vary from run to run: each model's three runs are repeated (--repeats) and the
table shows medians (every repeat's numbers are in the JSON). Prints a table and writes
docs/results/checkpoint_save.json.
"""

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from megatron_ext.config import TrainConfig, apply_override, from_dict, validate

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "examples" / "configs" / "tiny_harpe_cpu.yaml"
MODELS = {
    "tiny": [],  # the tiny default: 4 layers, hidden 128
    "100m": ["model.num_layers=12", "model.hidden_size=768", "model.num_attention_heads=12",
             "model.ffn_hidden_size=2048", "model.seq_length=128", "training.micro_batch_size=1",
             "training.global_batch_size=1"],
}
MODES = {"none": [], "sync": [], "async": ["checkpoint.async_save=true"]}


def run(model: str, mode: str, args, workdir: Path) -> dict:
    import yaml

    from megatron_ext.training.train import train

    raw = yaml.safe_load(TINY.read_text())
    interval = args.iters * 10 if mode == "none" else args.save_interval
    for item in [f"training.train_iters={args.iters}", "optimizer.warmup_iters=1", f"checkpoint.save_interval={interval}",
                 "checkpoint.keep_last=2", f"checkpoint.dir={workdir / 'ckpt'}", "checkpoint.resume=none",
                 f"data.cache_dir={args.cache_dir}", "logging.progress_bar=false", "logging.tensorboard_dir=null",
                 f"logging.metrics_file={workdir / 'metrics.jsonl'}", *MODELS[model], *MODES[mode]]:
        apply_override(raw, item)
    config = from_dict(TrainConfig, raw, prefix="")
    validate(config)
    train(config)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    saves_between = sum(1 for r in rows[:-1] if r["iteration"] % interval == 0)
    checksum_s = checksum_seconds(workdir / "ckpt") if mode == "sync" else None
    return dict(loop_s=rows[-1]["time"] - rows[0]["time"], saves=saves_between, checksum_s=checksum_s,
                blocked_s=sum(r["checkpoint_s"] for r in rows[1:]),
                checkpoint_bytes=checkpoint_bytes(workdir / "ckpt"),
                step_s=sorted(r["step_s"] for r in rows[1:])[len(rows[1:]) // 2])


def checksum_seconds(root: Path) -> float:
    from megatron_ext.checkpoint.integrity import checkpoint_files, describe_files
    from megatron_ext.checkpoint.layout import find_checkpoint

    checkpoint = find_checkpoint(root, "auto")
    started = time.perf_counter()
    describe_files(checkpoint, checkpoint_files(checkpoint))
    return time.perf_counter() - started


def checkpoint_bytes(root: Path) -> int:
    from megatron_ext.checkpoint.layout import find_checkpoint

    checkpoint = find_checkpoint(root, "auto")
    return sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=13)
    parser.add_argument("--save-interval", type=int, default=3)
    parser.add_argument("--models", default="tiny,100m")
    parser.add_argument("--repeats", type=int, default=3, help="each model's three runs this many times; medians")
    parser.add_argument("--cache-dir", default=str(ROOT / "runs" / "cache"))
    parser.add_argument("--output", default=str(ROOT / "docs" / "results" / "checkpoint_save.json"))
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    results = []
    for model in args.models.split(","):
        trials = []  # each repeat: the three runs back to back, so a slow spell of the disk hits all three
        for _ in range(args.repeats):
            measured = {}
            for mode in MODES:
                with tempfile.TemporaryDirectory() as workdir:
                    measured[mode] = run(model, mode, args, Path(workdir))
            trials.append(measured)
        saves = trials[0]["sync"]["saves"]
        per_save = {f"{mode}_{what}": [value(t, mode) / saves for t in trials]
                    for mode in ("sync", "async")
                    for what, value in (("blocked_s", lambda t, m: t[m]["blocked_s"]),
                                        ("stall_s", lambda t, m: t[m]["loop_s"] - t["none"]["loop_s"]))}
        median = {key: statistics.median(values) for key, values in per_save.items()}
        checksum = statistics.median(t["sync"]["checksum_s"] for t in trials)
        results.append(dict(model=model, checkpoint_mb=trials[0]["sync"]["checkpoint_bytes"] / 2**20,
                            step_s=statistics.median(t["none"]["step_s"] for t in trials), saves=saves,
                            repeats=args.repeats, **median,
                            blocked_async_over_sync=median["async_blocked_s"] / median["sync_blocked_s"],
                            stall_async_over_sync=median["async_stall_s"] / median["sync_stall_s"],
                            checksum_s=checksum, checksum_share=checksum / median["sync_blocked_s"],
                            per_repeat=per_save))

    print("per save, median of the repeats: 'blocked' = seconds the loop spent in the save calls (metrics' "
          "checkpoint_s); 'stall' = extra loop seconds against the run without saves (also counts steps slowed by "
          "the writing thread)")
    header = (f"{'model':<6} {'ckpt MB':>8} {'step s':>7} {'saves':>5} {'sync blocked':>12} {'async blocked':>13} "
              f"{'ratio':>6} {'sync stall':>10} {'async stall':>11} {'ratio':>6} {'CRC-32 s':>8} {'CRC share':>9}")
    print(header)
    for r in results:
        print(f"{r['model']:<6} {r['checkpoint_mb']:>8.1f} {r['step_s']:>7.3f} {r['saves']:>5} "
              f"{r['sync_blocked_s']:>12.3f} {r['async_blocked_s']:>13.3f} {r['blocked_async_over_sync']:>6.2f} "
              f"{r['sync_stall_s']:>10.3f} {r['async_stall_s']:>11.3f} {r['stall_async_over_sync']:>6.2f} "
              f"{r['checksum_s']:>8.3f} {r['checksum_share']:>9.1%}")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(dict(
        command="python benchmarks/checkpoint_save.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k in ("iters", "save_interval", "models", "repeats")),
        machine=dict(platform=platform.platform(), processor=platform.processor(), cpus=torch.get_num_threads(),
                     torch=torch.__version__),
        results=results), indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
