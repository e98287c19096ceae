"""The real-model experiment: SmolLM2-135M continued with ABF, PoSE+YaRN, HARPE and HARPE+PoSE on CPU, measured.

    python tools/real_model_experiment.py --config examples/real_model/experiment.yaml

Every method gets the same budget (optimizer steps x sequences x window tokens) from the same converted weights,
through the commands a user runs (`megatron-ext convert`, `preprocess`, `train --nproc-per-node 2`). Each RoPE
setting is the one the method would use to take this model from its 8192 positions to 2x them (the reproduction's
transfer rule, megatron_ext.repro.methods); training windows are short because this is a CPU. Measured:
- do no harm: held-out perplexity at the training window before training, right after the RoPE switch (the
  converted weights with the method's RoPE) and at each saved checkpoint;
- beyond the window: perplexity of long held-out documents and passkey retrieval at 1x/2x/4x the window after the
  budget. Every part runs in its own process, its wall time recorded; results are cached per part in
  OUTPUT/results.json, so a rerun continues. The report: tools/real_model_report.py.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

EVAL_PARTS = ("harm", "long", "passkey")
METHODS = ("original", "abf", "pose_yarn", "harpe", "harpe_pose")
REPRO_NAMES = {"abf": "abf", "pose_yarn": "pose_yarn", "harpe": "harpe_uniform", "harpe_pose": "harpe_pose"}


@dataclass
class TrainSettings:
    iters: int = 10
    global_batch_size: int = 4  # sequences of `window` tokens per optimizer step
    micro_batch_size: int = 2
    lr: float = 2.0e-5
    warmup_iters: int = 2
    save_interval: int = 5  # each saved checkpoint is a point of the do-no-harm curve
    nproc: int = 2  # gloo ranks


@dataclass
class EvalSettings:
    harm_documents: dict = field(default_factory=lambda: {"code": 6, "prose": 3})
    harm_document_tokens: int = 512  # each cut to this many tokens, read in windows of `window`
    long_documents: dict = field(default_factory=lambda: {"code": 4, "prose": 2})
    long_multiples: list = field(default_factory=lambda: [1, 2, 4])  # of the window; one window per document
    passkey_multiples: list = field(default_factory=lambda: [1, 2])
    passkey_trials: int = 10
    threads: int = 2


@dataclass
class ExperimentConfig:
    output_dir: str = "runs/real_model_experiment"
    cache_dir: str = "runs/cache/real_model"
    window: int = 256  # the training window: tokens per training sequence
    target: int = 16384  # RoPE settings for this many positions (2x the model's 8192)
    methods: list = field(default_factory=lambda: list(METHODS))
    report_dir: str = "docs/results"  # real_model.md, .json and .png go here
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)


def read_experiment(path: Path, overrides: list[str]) -> ExperimentConfig:
    from megatron_ext.config.reader import read_config

    return read_config(path, ExperimentConfig, overrides, example="examples/real_model/experiment.yaml")


# --- parts ----------------------------------------------------------------------------------------------------


class Results:
    """OUTPUT/results.json: {part: {"seconds": wall time, "value": ...}}, written after every part."""

    def __init__(self, path: Path):
        self.path = path
        self.parts = json.loads(path.read_text()) if path.exists() else {}

    def run(self, name: str, work):
        if name in self.parts:
            print(f"[{time.strftime('%H:%M:%S')}] {name}: done before ({self.parts[name]['seconds']:.0f} s)",
                  flush=True)
            return self.parts[name]["value"]
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        start = time.time()
        value = work()
        self.record(name, time.time() - start, value)
        return value

    def record(self, name: str, seconds: float, value) -> None:
        self.parts[name] = {"seconds": round(seconds, 1), "value": value}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.parts, indent=1))
        temporary.replace(self.path)
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {seconds:.0f} s", flush=True)


def command(*args: str, env: dict | None = None) -> None:
    """Run a command with its output on this console; a failure stops the experiment with its exit code."""
    print("  $", " ".join(args), flush=True)
    done = subprocess.run(args, env=dict(os.environ, **(env or {})))
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(args)}")


def megatron_ext(*args: str) -> None:
    command(str(Path(sys.executable).with_name("megatron-ext")), *args, env={"PYTHONWARNINGS": "ignore"})


def prepare(config: ExperimentConfig, results: Results, out: Path) -> dict:
    """Fetch and convert the model, write and tokenize the text: the paths the methods share."""
    from real_model_data import write as write_text

    from megatron_ext.hf.real_model import fetch_smollm2

    hf_dir = Path(results.run("fetch", lambda: str(fetch_smollm2(config.cache_dir))))
    converted = out / "converted"
    if not (converted / "latest").exists():
        results.parts.pop("convert", None)
    results.run("convert", lambda: megatron_ext("convert", "hf-to-mcore", "--hf", str(hf_dir), "--out",
                                                str(converted), "--no-progress"))
    text = out / "text"
    results.run("text", lambda: write_text(text))
    train_prefix = out / "data" / "train"
    results.run("preprocess", lambda: megatron_ext(
        "preprocess", "--input", str(text / "train.jsonl"), "--output-prefix", str(train_prefix), "--tokenizer",
        str(hf_dir), "--workers", "2", "--append-eod", "--overwrite"))
    return dict(hf_dir=str(hf_dir), converted=str(converted), text=str(text), train_prefix=str(train_prefix))


def method_ropes(config: ExperimentConfig, converted: str) -> dict:
    """{method: (rope settings over the model's, pose settings)}: the reproduction's rules at this model's size."""
    from megatron_ext.checkpoint.state import read_checkpoint
    from megatron_ext.repro.methods import build_methods

    model = read_checkpoint(converted, setting="converted").state.config
    head_dim = model.model.hidden_size // model.model.num_attention_heads
    native = 8192  # SmolLM2's max_position_embeddings, the length its RoPE was trained for
    methods = build_methods(base_length=native, scale=config.target // native, head_dim=head_dim,
                            base=model.rope.base)
    ropes = {"original": ({}, {})}
    for name, repro_name in REPRO_NAMES.items():
        stage, = methods[repro_name].stages
        ropes[name] = ({"base": model.rope.base, **stage.rope}, dict(stage.pose))
    return ropes


def train_config(config: ExperimentConfig, paths: dict, rope: dict, pose: dict, run: Path) -> dict:
    t = config.train
    return {
        "model": {"seq_length": config.window},  # the window; the architecture comes from checkpoint.pretrained
        "rope": rope,
        **({"pose": pose} if pose else {}),
        "data": {"train_data": [paths["train_prefix"]], "tokenizer": paths["hf_dir"], "document_mask": True},
        "training": {"train_iters": t.iters, "micro_batch_size": t.micro_batch_size,
                     "global_batch_size": t.global_batch_size},
        "optimizer": {"lr": t.lr, "min_lr": t.lr, "weight_decay": 0.0, "warmup_iters": t.warmup_iters,
                      "lr_decay_style": "constant"},
        "checkpoint": {"dir": str(run / "checkpoints"), "pretrained": paths["converted"],
                       "save_interval": t.save_interval, "keep_last": None},
        "logging": {"log_interval": 1, "tensorboard_dir": None, "metrics_file": str(run / "metrics.jsonl"),
                    "progress_bar": False},
    }


def train(config: ExperimentConfig, run: Path, settings: dict) -> dict:
    run.mkdir(parents=True, exist_ok=True)
    (run / "train.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    megatron_ext("train", "--config", str(run / "train.yaml"), "--nproc-per-node", str(config.train.nproc))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {"loss": [row["loss"] for row in rows], "step_s": [row["step_s"] for row in rows]}


def evaluate_in_child(config_path: Path, overrides: list[str], method: str, parts: list[str]) -> dict:
    """Evaluation parts of one method in a fresh process (its own process group and memory, one model load per
    checkpoint): {part: {"seconds", "value"}}."""
    out = Path(read_experiment(config_path, overrides).output_dir) / method / "eval.json"
    args = [sys.executable, __file__, "--config", str(config_path), "--evaluate", method, ",".join(parts),
            "--result", str(out)]
    for item in overrides:
        args += ["--set", item]
    command(*args, env={"PYTHONWARNINGS": "ignore"})
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--evaluate", nargs=2, metavar=("METHOD", "PART"), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    config = read_experiment(args.config, args.set)
    out = Path(config.output_dir)
    if args.evaluate:
        from real_model_eval import evaluate_parts

        method, parts = args.evaluate
        torch_threads(config.eval.threads)
        value = evaluate_parts(config, out, method, parts.split(","))
        args.result.parent.mkdir(parents=True, exist_ok=True)
        args.result.write_text(json.dumps(value))
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "experiment.json").write_text(json.dumps(asdict(config), indent=1))
    results = Results(out / "results.json")
    paths = prepare(config, results, out)
    (out / "paths.json").write_text(json.dumps(paths))
    ropes = method_ropes(config, paths["converted"])
    (out / "ropes.json").write_text(json.dumps(ropes, indent=1))
    for method in config.methods:
        rope, pose = ropes[method]
        if method != "original":
            results.run(f"{method}/train", lambda: train(config, out / method, train_config(
                config, paths, rope, pose, out / method)))
        todo = [part for part in EVAL_PARTS if f"{method}/{part}" not in results.parts]
        if todo:
            print(f"[{time.strftime('%H:%M:%S')}] {method}: evaluating {', '.join(todo)} ...", flush=True)
            start = time.time()
            done = evaluate_in_child(args.config, args.set, method, todo)
            for part, result in done.items():
                results.record(f"{method}/{part}", result["seconds"], result["value"])
            # the child's start (imports, process group): wall time that no part above holds
            results.record(f"{method}/eval start-up", time.time() - start - sum(r["seconds"] for r in done.values()),
                           None)
    from real_model_report import write_report

    print(write_report(out, Path(config.report_dir)))


def torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
