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
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import yaml

from megatron_ext.errors import UserError
from megatron_ext.repro.config import ReproConfig, Track
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


def _raise_child_failure(code: int, log: Path) -> None:
    """A child that refused its settings (exit 2, one `megatron-ext train: ...` line) is the user's to fix: say
    that line as ours. Anything else is a crash: its log's tail, with our traceback."""
    text = log.read_text(errors="replace")
    refusals = [line for line in text.splitlines() if line.startswith("megatron-ext train: ")]
    if code == 2 and refusals:
        raise UserError(f"a training run of the study refused its settings ({log}): "
                        f"{refusals[-1].removeprefix('megatron-ext train: ')}")
    raise RuntimeError(f"training in {log.parent} failed (exit {code}); see {log}:\n{text[-3000:]}")


def run_training(raw: dict, run_dir: Path) -> dict:
    """Train in a child process; its wall time, peak RSS, last checkpoint and losses. Raises on failure."""
    from megatron_ext.checkpoint.layout import find_checkpoint

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
        _raise_child_failure(code, run_dir / "train.log")
    losses = {int(r["iteration"]): r["loss"] for r in map(json.loads, metrics.read_text().splitlines())
              if "loss" in r}
    checkpoint = find_checkpoint(raw["checkpoint"]["dir"], "auto")
    tokens = raw["training"]["train_iters"] * raw["training"]["global_batch_size"] * raw["model"]["seq_length"]
    return dict(seconds=seconds, peak_rss_mib=usage.ru_maxrss / 1024, checkpoint=str(checkpoint), tokens=tokens,
                first_loss=losses[min(losses)], last_loss=losses[max(losses)], command=" ".join(command))


def write_json(path: Path, value) -> None:
    """Written whole or not at all (a temporary file renamed into place): a rerun trusts what it finds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps(value, indent=1) + "\n")
    staging.replace(path)


def pretrain_settings(track: Track) -> dict:
    """A track's pretraining run's `train_yaml` settings (paths, seed and init aside)."""
    p = track.pretrain
    return dict(seq_length=track.base_length, rope={}, pose={}, iters=p.iters, global_batch=p.global_batch_size,
                micro_batch=p.micro_batch_size, lr=p.lr, min_lr=p.min_lr, warmup=min(p.warmup_iters, p.iters - 1))


def stage_settings(config: ReproConfig, method) -> list[tuple]:
    """(stage, `train_yaml` settings) per stage of `method`: the same tokens per step for every method, the
    steps split by budget share, each stage warming up for at most its length minus one step."""
    e, planned = config.extend, []
    for stage, iters in zip(method.stages, stage_iterations(e.iters, method.stages)):
        global_batch = e.tokens_per_iter // stage.seq_length
        planned.append((stage, dict(seq_length=stage.seq_length, rope=stage.rope, pose=stage.pose, iters=iters,
                                    global_batch=global_batch,
                                    micro_batch=min(global_batch, e.micro_batch_tokens // stage.seq_length),
                                    lr=e.lr, min_lr=e.min_lr, warmup=min(e.warmup_iters, iters - 1))))
    return planned


def check_settings(config: ReproConfig, out: Path) -> None:
    """Before any work: every training run the config makes is a valid TrainConfig, and `out` holds no run
    made with other settings (its kept phases would be mixed with these)."""
    from megatron_ext.config import ConfigError, TrainConfig, from_dict, validate
    from megatron_ext.repro import retrieval

    runs = []
    if "perplexity" in config.tracks:
        runs.append(("pretraining (pretrain.*)", pretrain_settings(config)))
        for method in config.selected_methods(config.model):
            runs += [(f"{method.name} stage {index + 1} (extend.*)", settings)
                     for index, (_, settings) in enumerate(stage_settings(config, method))]
    if "retrieval" in config.tracks:
        runs += retrieval.planned_runs(config, config.retrieval)
    for label, settings in runs:
        raw = train_yaml(config, data_prefix="unchecked", tokenizer_model="unchecked", seed=0, run_dir=out,
                         pretrained=None, **settings)
        try:
            validate(from_dict(TrainConfig, raw, prefix=""), check_files=False)
        except ConfigError as error:
            raise ConfigError(f"{label}: {error}") from None
    settings = asdict(config)
    tracks = {"perplexity": (out / "settings.json", {key: value for key, value in settings.items()
                                                     if key not in ("output_dir", "seeds", "methods", "tracks",
                                                                    "retrieval")}),
              "retrieval": (out / "retrieval" / "settings.json",
                            dict(model=settings["model"], data=settings["data"],
                                 retrieval={k: v for k, v in settings["retrieval"].items()
                                            if k not in ("seeds", "methods")}))}
    for track in config.tracks:
        settings_file, recorded = tracks[track]
        recorded = json.loads(json.dumps(recorded))  # as it reads back
        if settings_file.is_file():
            earlier = json.loads(settings_file.read_text())
            changed = sorted(key for key in recorded if earlier.get(key) != recorded[key])
            if changed:
                raise ConfigError(f"output_dir ({out}) holds a {track} track made with other {', '.join(changed)} "
                                  "settings; its kept phases would be mixed with these: pick a new output_dir or "
                                  f"remove {settings_file.parent}")
        else:
            write_json(settings_file, recorded)


def _child_environment() -> dict:
    """This process's environment without the rendezvous variables its own (evaluation) process group set."""
    names = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    return {key: value for key, value in os.environ.items() if key not in names}


def pretrain(config: ReproConfig, data, out: Path, log) -> dict:
    """Train the base model at L (or reuse a complete run) and return its measurements."""
    from megatron_ext.checkpoint.layout import find_checkpoint

    p, run_dir = config.pretrain, out / "pretrain"
    summary_file = run_dir / "summary.json"
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        if find_checkpoint(run_dir / "checkpoints", "auto") is not None:
            log(f"pretraining: reusing {summary['checkpoint']}")
            return summary
    raw = train_yaml(config, data_prefix=data.pretrain_prefix, tokenizer_model=data.tokenizer_model, seed=p.seed,
                     run_dir=run_dir, pretrained=None, **pretrain_settings(config))
    log(f"pretraining at {config.base_length}: {p.iters} iterations of {p.global_batch_size} sequences "
        f"(log: {run_dir / 'train.log'})")
    summary = run_training(raw, run_dir)
    log(f"pretraining done in {summary['seconds']:.0f} s, loss {summary['first_loss']:.3f} -> "
        f"{summary['last_loss']:.3f}")
    write_json(summary_file, summary)
    return summary


def extend(config: ReproConfig, method, seed: int, data, base_checkpoint: str, out: Path, log) -> dict:
    """Run a method's stages from the pretrained checkpoint; per-stage and total measurements."""
    stages, checkpoint = [], base_checkpoint
    for index, (stage, settings) in enumerate(stage_settings(config, method)):
        run_dir = out / f"stage{index}"
        raw = train_yaml(config, data_prefix=data.extension_prefix, tokenizer_model=data.tokenizer_model, seed=seed,
                         run_dir=run_dir, pretrained=checkpoint, **settings)
        log(f"  {method.name} stage {index + 1}/{len(method.stages)}{' ' + stage.label if stage.label else ''}: "
            f"{settings['iters']} iterations x {settings['global_batch']} sequences of {stage.seq_length}"
            + (f", PoSE ids up to {stage.pose['target_length']}" if stage.pose else ""))
        measured = run_training(raw, run_dir)
        measured.update(seq_length=stage.seq_length, iterations=settings["iters"],
                        global_batch=settings["global_batch"], rope=raw["rope"], pose=stage.pose, label=stage.label)
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
    per_layer = [statistics.fmean(layer.entropy) for layer in sorted(attention.layers, key=lambda l: l.layer)]
    return dict(  # lengths as text: the keys read back from result.json are text too
        perplexity={str(row.length): row.perplexity for row in perplexity.rows},
        passkey={str(row.length): row.accuracy for row in passkey.rows},
        passkey_token_accuracy={str(row.length): row.token_accuracy for row in passkey.rows},
        entropy_length=max(lengths), entropy_per_layer=per_layer, entropy=statistics.fmean(per_layer),
    )


def run_perplexity_track(config: ReproConfig, data, out: Path, log, fresh: bool) -> tuple[dict, dict]:
    """Pretrain on text at L, extend with every method per extension seed, evaluate; (pretraining, results)."""
    methods = config.selected_methods(config.model)
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
            write_json(result_file, result)
            results[seed, method.name] = result
            longest = max(config.eval_lengths())
            log(f"[{done}/{total}] seed {seed} {method.name}: extension {trained['seconds']:.0f} s, "
                f"PPL@{longest} {evaluation['perplexity'][str(longest)]:.2f}, passkey@{longest} "
                f"{evaluation['passkey'][str(longest)]:.2f}")
    return base, results


def run_repro(config: ReproConfig, *, command: str, fresh: bool = False) -> Path:
    """The whole reproduction, every track the config names; returns the report's path."""
    from megatron_ext.repro.report import write_report
    from megatron_ext.repro.retrieval import run_track

    started = time.perf_counter()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    def log(message):
        print(f"[repro {time.perf_counter() - started:6.0f} s] {message}", flush=True)

    check_settings(config, out)
    data = prepare_repro_data(out / "data", config.data)
    log(f"data ready: tokenizer {data.tokenizer_model}")
    base, results, retrieval = None, {}, None
    if "perplexity" in config.tracks:
        base, results = run_perplexity_track(config, data, out, log, fresh)
    if "retrieval" in config.tracks:
        retrieval = run_track(config, config.retrieval, data.tokenizer_model, out, log, fresh)
        write_json(out / "retrieval" / "results.json", retrieval)
    report = write_report(config, base, results, retrieval, out, command=command,
                          seconds=time.perf_counter() - started)
    write_json(out / "results.json", dict(config=asdict(config), pretrain=base, results=list(results.values())))
    log(f"report: {report}")
    return report
