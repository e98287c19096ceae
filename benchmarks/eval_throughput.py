"""Passkey evaluation throughput with one rank vs two data-parallel ranks (gloo on CPU), prompts per second.

Run: python benchmarks/eval_throughput.py [--lengths 2048 8192 32768] [--trials 16 8 4]
Each layout is one torchrun launch of this script (--worker) on the same machine: DP=1 with all the
cores as intra-op threads, DP=1 with one thread (the work of one rank), DP=2 with half the cores each. The model is the tiny default's architecture
(examples/configs/tiny_harpe_cpu.yaml: 4 layers, hidden 128, 4 heads, HARPE bases) with random weights:
the work per prompt does not depend on the weights, and RoPE runs at any length, so the lengths need not
fit its trained window. The first prompt of each launch is a warm-up, not timed. Checks that every layout
gives the same passkey results, prints a table and writes docs/results/eval_throughput.json.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "examples" / "configs" / "tiny_harpe_cpu.yaml"


def build_model(cache_dir: str):
    """The tiny default's architecture, random weights, behind EvalModel; joins this launch's ranks (all DP)."""
    from megatron_ext.config import load_config
    from megatron_ext.data.tiny import prepare_tiny_dataset
    from megatron_ext.distributed import setup_distributed
    from megatron_ext.eval.models import MegatronExtModel
    from megatron_ext.eval.tokenizers import SentencePieceEvalTokenizer
    from megatron_ext.models.builder import build_gpt
    from megatron_ext.sizes import padded_vocab_size

    config = load_config(TINY, [f"data.cache_dir={cache_dir}"])
    device = setup_distributed(config.parallel)
    tokenizer_model, _ = prepare_tiny_dataset(cache_dir, seed=config.training.seed, build=False)
    tokenizer = SentencePieceEvalTokenizer(tokenizer_model)
    torch.manual_seed(0)
    model = build_gpt(config, padded_vocab_size(tokenizer.vocab_size, 1), device)
    return MegatronExtModel(model, tokenizer, name="tiny-random", context_window=config.model.seq_length)


def worker(args) -> None:
    """Time evaluate_passkey per length on this launch's ranks; rank 0 writes the numbers."""
    from megatron_ext.eval.passkey import evaluate_passkey
    from megatron_ext.eval.results import PROGRESS_BARS
    from megatron_ext.eval.settings import PasskeySettings

    PROGRESS_BARS["enabled"] = False
    model = build_model(args.cache_dir)
    evaluate_passkey(model, PasskeySettings(lengths=[min(args.lengths)], trials=1, seed=99))  # warm-up
    rows = []
    for length, trials in zip(args.lengths, args.trials):
        torch.distributed.barrier()
        started = time.perf_counter()
        result = evaluate_passkey(model, PasskeySettings(lengths=[length], trials=trials))
        seconds = time.perf_counter() - started  # the results are gathered: every rank has finished
        rows.append(dict(length=length, prompts=trials, seconds=seconds, prompts_per_s=trials / seconds,
                         result=result.to_json()))
    if torch.distributed.get_rank() == 0:
        Path(args.out).write_text(json.dumps(dict(data_parallel=model.data_parallel.size,
                                                  threads=torch.get_num_threads(), rows=rows)))


def launch(data_parallel: int, threads: int, args, out: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(data_parallel),
               __file__, "--worker", "--out", str(out), "--cache-dir", args.cache_dir,
               "--lengths", *map(str, args.lengths), "--trials", *map(str, args.trials)]
    subprocess.run(command, env=env, cwd=ROOT, check=True)
    return json.loads(out.read_text())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--trials", type=int, nargs="+", default=[16, 8, 4], help="prompts per length")
    parser.add_argument("--cache-dir", default="runs/cache", help="where the tiny default's tokenizer is built")
    parser.add_argument("--out", default="docs/results/eval_throughput.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if len(args.trials) != len(args.lengths):
        parser.error(f"--trials gives {len(args.trials)} counts for {len(args.lengths)} lengths: give one per length")
    if args.worker:
        return worker(args)

    from megatron_ext.config import load_config
    from megatron_ext.data.tiny import prepare_tiny_dataset

    prepare_tiny_dataset(args.cache_dir, seed=load_config(TINY).training.seed)  # once, before the ranks start
    cores = os.cpu_count()
    layouts = {"DP=1": (1, cores), "DP=1, 1 thread": (1, 1), "DP=2": (2, max(1, cores // 2))}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {name: launch(dp, threads, args, Path(tmp) / f"{index}.json")
                for index, (name, (dp, threads)) in enumerate(layouts.items())}
    rows = [dict(length=length, prompts=trials, **{f"{name} prompts/s": runs[name]["rows"][i]["prompts_per_s"]
                                                  for name in layouts})
            for i, (length, trials) in enumerate(zip(args.lengths, args.trials))]
    for row in rows:
        row["DP=2 / DP=1"] = row["DP=2 prompts/s"] / row["DP=1 prompts/s"]
        row["DP=2 / DP=1, 1 thread"] = row["DP=2 prompts/s"] / row["DP=1, 1 thread prompts/s"]
    identical = all(run["rows"][i]["result"] == runs["DP=1"]["rows"][i]["result"]
                    for run in runs.values() for i in range(len(rows)))
    machine = f"CPU ({platform.machine()}, {cores} cores), torch {torch.__version__}, gloo"
    print(f"\npasskey prompts/s, tiny model (random weights), {machine}; intra-op threads per rank: "
          + ", ".join(f"{name} {threads}" for name, (_, threads) in layouts.items()))
    columns = list(rows[0])
    print("".join(f"{column:>{max(9, len(column) + 2)}}" for column in columns))
    for row in rows:
        print("".join(f"{_cell(row[column]):>{max(9, len(column) + 2)}}" for column in columns))
    print(f"passkey results identical in every layout: {identical}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(
        benchmark="passkey evaluation throughput, one rank vs two data-parallel ranks", machine=machine,
        command=" ".join(["python", "benchmarks/eval_throughput.py", *sys.argv[1:]]),
        layouts={name: dict(data_parallel=dp, threads_per_rank=threads) for name, (dp, threads) in layouts.items()},
        results_identical=identical, rows=rows,
        seconds={name: {row["length"]: row["seconds"] for row in run["rows"]} for name, run in runs.items()}),
        indent=1) + "\n")
    print(f"wrote {args.out}")
    if not identical:
        sys.exit("a layout's passkey results differ from those of DP=1")


def _cell(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    main()
