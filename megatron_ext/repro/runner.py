"""`megatron-ext repro`: pretrain once at L, extend to s*L with every method under one token budget, evaluate.

Every training run is a `megatron-ext train` child process with its own YAML (written next to its
checkpoint, so any phase can be rerun by hand); the runner measures each child's wall time and peak
resident memory (wait4). Evaluation runs in this process. Finished work is kept: a method whose
`result.json` exists is not trained or evaluated again, and a complete pretraining checkpoint is reused,
so an interrupted run picks up where it stopped.

Layout of the output directory:
    data/<tag>/                        tokenizer + pretraining and extension datasets
    pretrain/{train.yaml,train.log,checkpoints/}
    seed<k>/<method>/stage<i>/{train.yaml,train.log,metrics.jsonl,checkpoints/}
    seed<k>/<method>/result.json       training measurements + evaluation
    report.md, results.json, ppl_vs_length.png, passkey_heatmap.png
"""

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import yaml

from megatron_ext.repro.config import ReproConfig
from megatron_ext.repro.data import prepare_repro_data


def stage_iterations(total: int, stages: list) -> list[int]:
    """Split `total` optimizer steps over stages by their budget shares; the last stage takes the remainder."""
    counts = [max(1, round(total * stage.budget_share)) for stage in stages[:-1]]
    return counts + [total - sum(counts)]


def train_yaml(config: ReproConfig, *, seq_length: int, rope: dict, pose: dict, data_prefix: str,
               tokenizer_model: str, iters: int, global_batch: int, micro_batch: int, lr: float, min_lr: float,
               warmup: int, seed: int, run_dir: Path, pretrained: str | None) -> dict:
    """The TrainConfig mapping of one training run."""
    m = config.model
    return {
        "model": dict(num_layers=m.num_layers, hidden_size=m.hidden_size, num_attention_heads=m.num_attention_heads,
                      num_query_groups=m.num_query_groups, seq_length=seq_length),
        "rope": {"base": m.rope_base, **rope},
        "pose": dict(pose),
        "data": dict(train_data=[data_prefix], tokenizer_model=tokenizer_model),
        "training": dict(train_iters=iters, global_batch_size=global_batch, micro_batch_size=micro_batch, seed=seed),
        "optimizer": dict(lr=lr, min_lr=min_lr, warmup_iters=warmup),
        "checkpoint": dict(dir=str(run_dir / "checkpoints"), save_interval=iters, keep_last=1, pretrained=pretrained),
        "logging": dict(log_interval=max(1, iters // 10), tensorboard_dir=None,
                        metrics_file=str(run_dir / "metrics.jsonl"), progress_bar=False),
    }


def run_training(raw: dict, run_dir: Path) -> dict:
    """Train in a child process; its wall time, peak RSS, last checkpoint and losses. Raises on failure."""
    from megatron_ext.training.checkpoint import find_checkpoint
    from megatron_ext.training.config import from_dict, validate
    from megatron_ext.training.config import TrainConfig

    validate(from_dict(TrainConfig, raw, prefix=""))  # a bad generated config fails here, not in the child
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "train.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    metrics = Path(raw["logging"]["metrics_file"])
    metrics.unlink(missing_ok=True)
    command = [sys.executable, "-m", "megatron_ext.cli", "train", "--config", str(run_dir / "train.yaml"),
               "--resume", "none"]
    started = time.perf_counter()
    with open(run_dir / "train.log", "w") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=_child_environment())
        _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = (run_dir / "train.log").read_text()[-3000:]
        raise RuntimeError(f"training in {run_dir} failed (exit {code}); see {run_dir / 'train.log'}:\n{tail}")
    losses = {int(r["iteration"]): r["loss"] for r in map(json.loads, metrics.read_text().splitlines())
              if "loss" in r}
    checkpoint = find_checkpoint(raw["checkpoint"]["dir"], "auto")
    tokens = raw["training"]["train_iters"] * raw["training"]["global_batch_size"] * raw["model"]["seq_length"]
    return dict(seconds=seconds, peak_rss_mib=usage.ru_maxrss / 1024, checkpoint=str(checkpoint), tokens=tokens,
                first_loss=losses[min(losses)], last_loss=losses[max(losses)], command=" ".join(command))


def _child_environment() -> dict:
    """This process's environment without the rendezvous variables its own (evaluation) process group set."""
    names = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    return {key: value for key, value in os.environ.items() if key not in names}


def pretrain(config: ReproConfig, data, out: Path, log) -> dict:
    """Train the base model at L (or reuse a complete run) and return its measurements."""
    from megatron_ext.training.checkpoint import find_checkpoint

    p, run_dir = config.pretrain, out / "pretrain"
    summary_file = run_dir / "summary.json"
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        if find_checkpoint(run_dir / "checkpoints", "auto") is not None:
            log(f"pretraining: reusing {summary['checkpoint']}")
            return summary
    raw = train_yaml(config, seq_length=config.base_length, rope={}, pose={}, data_prefix=data.pretrain_prefix,
                     tokenizer_model=data.tokenizer_model, iters=p.iters, global_batch=p.global_batch_size,
                     micro_batch=p.micro_batch_size, lr=p.lr, min_lr=p.min_lr, warmup=p.warmup_iters, seed=p.seed,
                     run_dir=run_dir, pretrained=None)
    log(f"pretraining at {config.base_length}: {p.iters} iterations of {p.global_batch_size} sequences "
        f"(log: {run_dir / 'train.log'})")
    summary = run_training(raw, run_dir)
    log(f"pretraining done in {summary['seconds']:.0f} s, loss {summary['first_loss']:.3f} -> "
        f"{summary['last_loss']:.3f}")
    summary_file.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def extend(config: ReproConfig, method, seed: int, data, base_checkpoint: str, out: Path, log) -> dict:
    """Run a method's stages from the pretrained checkpoint; per-stage and total measurements."""
    e = config.extend
    stages, checkpoint = [], base_checkpoint
    for index, (stage, iters) in enumerate(zip(method.stages, stage_iterations(e.iters, method.stages))):
        global_batch = e.tokens_per_iter // stage.seq_length
        micro_batch = min(global_batch, e.micro_batch_tokens // stage.seq_length)
        run_dir = out / f"stage{index}"
        raw = train_yaml(config, seq_length=stage.seq_length, rope=stage.rope, pose=stage.pose,
                         data_prefix=data.extension_prefix, tokenizer_model=data.tokenizer_model, iters=iters,
                         global_batch=global_batch, micro_batch=micro_batch, lr=e.lr, min_lr=e.min_lr,
                         warmup=min(e.warmup_iters, iters - 1), seed=seed, run_dir=run_dir, pretrained=checkpoint)
        log(f"  {method.name} stage {index + 1}/{len(method.stages)}{' ' + stage.label if stage.label else ''}: "
            f"{iters} iterations x {global_batch} sequences of {stage.seq_length}"
            + (f", PoSE ids up to {stage.pose['target_length']}" if stage.pose else ""))
        measured = run_training(raw, run_dir)
        measured.update(seq_length=stage.seq_length, iterations=iters, global_batch=global_batch,
                        rope=raw["rope"], pose=stage.pose, label=stage.label)
        stages.append(measured)
        checkpoint = measured["checkpoint"]
    return dict(checkpoint=checkpoint, stages=stages, seconds=sum(s["seconds"] for s in stages),
                peak_rss_mib=max((s["peak_rss_mib"] for s in stages), default=None),
                tokens=sum(s["tokens"] for s in stages))


def evaluate(config: ReproConfig, checkpoint: str, name: str, assets: Path) -> dict:
    """Perplexity and passkey at every evaluation length, attention entropy at the longest."""
    from megatron_ext.eval.attention import evaluate_attention
    from megatron_ext.eval.models import load_eval_model
    from megatron_ext.eval.passkey import evaluate_passkey
    from megatron_ext.eval.perplexity import evaluate_perplexity
    from megatron_ext.eval.settings import AttentionSettings, PasskeySettings, PerplexitySettings

    from megatron_ext.eval.results import PROGRESS_BARS

    PROGRESS_BARS["enabled"] = False  # the runner logs one line per method instead
    lengths, ev = config.eval_lengths(), config.eval
    model = load_eval_model(checkpoint, name=name, precision="fp32")
    perplexity = evaluate_perplexity(model, PerplexitySettings(
        data=list(ev.perplexity_data), lengths=lengths, stride=config.base_length,
        num_documents=ev.perplexity_documents, min_document_tokens=max(lengths), max_document_tokens=max(lengths)))
    passkey = evaluate_passkey(model, PasskeySettings(lengths=lengths, trials=ev.passkey_trials,
                                                      batch_size=ev.batch_size))
    attention = evaluate_attention(model, AttentionSettings(lengths=[max(lengths)], trials=ev.attention_trials))
    for result in (perplexity, passkey, attention):
        result.save_json(assets / f"{result.task}.json")
    layers = sorted(attention.layers, key=lambda layer: layer.layer)
    return dict(
        perplexity={row.length: row.perplexity for row in perplexity.rows},
        passkey={row.length: row.accuracy for row in passkey.rows},
        passkey_token_accuracy={row.length: row.token_accuracy for row in passkey.rows},
        entropy_length=max(lengths),
        entropy_per_layer=[sum(layer.entropy) / len(layer.entropy) for layer in layers],
        entropy=sum(sum(layer.entropy) / len(layer.entropy) for layer in layers) / len(layers),
    )


def run_repro(config: ReproConfig, *, command: str, fresh: bool = False) -> Path:
    """The whole reproduction; returns the report's path."""
    started = time.perf_counter()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    def log(message):
        print(f"[repro {time.perf_counter() - started:6.0f} s] {message}", flush=True)

    methods = config.selected_methods()
    data = prepare_repro_data(out / "data", config.data)
    log(f"data ready: tokenizer {data.tokenizer_model}")
    base = pretrain(config, data, out, log)
    results = {}  # (seed, method) -> result
    total = len(config.seeds) * len(methods)
    for seed in config.seeds:
        for method in methods:
            done = len(results) + 1
            method_dir = out / f"seed{seed}" / method.name
            result_file = method_dir / "result.json"
            if result_file.is_file() and not fresh:
                results[seed, method.name] = json.loads(result_file.read_text())
                log(f"[{done}/{total}] seed {seed} {method.name}: kept from an earlier run")
                continue
            earlier = next((r for (_, name), r in results.items() if name == method.name), None)
            if not method.stages and earlier is not None:  # the pretrained model does not depend on the seed
                results[seed, method.name] = dict(earlier, seed=seed)
                log(f"[{done}/{total}] seed {seed} {method.name}: the same model as seed {earlier['seed']}")
                continue
            log(f"[{done}/{total}] seed {seed} {method.name}: {method.description}")
            trained = (extend(config, method, seed, data, base["checkpoint"], method_dir, log) if method.stages
                       else dict(checkpoint=base["checkpoint"], stages=[], seconds=0.0, peak_rss_mib=None, tokens=0))
            evaluation = evaluate(config, trained["checkpoint"], method.name, method_dir / "eval")
            result = dict(method=method.name, description=method.description, seed=seed, **trained, **evaluation)
            result_file.parent.mkdir(parents=True, exist_ok=True)
            result_file.write_text(json.dumps(result, indent=1) + "\n")
            results[seed, method.name] = result
            longest = max(config.eval_lengths())
            log(f"[{done}/{total}] seed {seed} {method.name}: extension {trained['seconds']:.0f} s, "
                f"PPL@{longest} {evaluation['perplexity'][longest]:.2f}, passkey@{longest} "
                f"{evaluation['passkey'][longest]:.2f}")
    from megatron_ext.repro.report import write_report

    report = write_report(config, base, results, out, command=command, seconds=time.perf_counter() - started)
    (out / "results.json").write_text(json.dumps(dict(config=asdict(config), pretrain=base,
                                                      results=list(results.values())), indent=1) + "\n")
    log(f"report: {report}")
    return report
