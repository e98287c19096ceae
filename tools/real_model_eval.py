"""The evaluation parts of tools/real_model_experiment.py, each run in its own process (`--evaluate METHOD PART`).

harm: held-out perplexity at the training window, for the converted weights with the method's RoPE (the switch)
and each saved checkpoint; long: one window per long held-out document at 1x/2x/4x the window; passkey: exact
match at 1x/2x the window. Models load on CPU in fp32 through megatron_ext's builder; the tokenizer is the HF
directory's own.
"""

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch


def evaluate_parts(config, out: Path, method: str, parts: list[str]) -> dict:
    """{part: {"seconds": wall time, "value": result}} of `method` for each of `parts` (harm, long, passkey)."""
    from megatron_ext.distributed import single_process_group

    unknown = set(parts) - {"harm", "long", "passkey"}
    if unknown:
        raise ValueError(f"unknown evaluation part(s) {sorted(unknown)}: harm, long or passkey")
    paths = json.loads((out / "paths.json").read_text())
    done = {}
    with single_process_group():
        if "harm" in parts:
            start = time.time()
            value = {label: harm_point(config, paths, load(path, paths, rope), step)
                     for label, step, path, rope in harm_points(out, paths, method)}
            done["harm"] = {"seconds": time.time() - start, "value": value}
        final = paths["converted"] if method == "original" else str(out / method / "checkpoints")
        model = None
        for part, evaluate in (("long", long_perplexity), ("passkey", passkey)):
            if part in parts:
                start = time.time()
                model = model or load(final, paths, None)
                value = evaluate(config, paths, model)
                done[part] = {"seconds": time.time() - start, "value": value}
    return done


def harm_points(out: Path, paths: dict, method: str):
    """(label, training step, checkpoint, RoPE override or None) of the do-no-harm curve."""
    from megatron_ext.config.reader import read_config
    from megatron_ext.config.train import TrainConfig

    if method == "original":
        yield "original", 0, paths["converted"], None
        return
    run = out / method
    rope = read_config(run / "train.yaml", TrainConfig, example="train.yaml").rope
    yield "switched", 0, paths["converted"], rope
    for checkpoint in sorted((run / "checkpoints").glob("iter_*")):
        step = int(checkpoint.name.split("_")[1])
        yield f"step {step}", step, str(checkpoint), None


def load(checkpoint, paths: dict, rope):
    """A MegatronExtModel of `checkpoint` in fp32 on CPU; `rope` replaces the checkpoint's RoPE when given."""
    from megatron_ext.checkpoint.state import read_checkpoint
    from megatron_ext.checkpoint.store import load_checkpoint
    from megatron_ext.eval.models import MegatronExtModel
    from megatron_ext.eval.tokenizers import load_eval_tokenizer
    from megatron_ext.models.builder import build_gpt

    saved = read_checkpoint(checkpoint, setting="checkpoint")
    config = saved.state.config
    if rope is not None:
        config.rope = rope
    config.training.precision, config.training.fp8 = "fp32", "off"
    model = build_gpt(config, saved.state.padded_vocab_size, torch.device("cpu"))
    load_checkpoint(saved.path, model=[model], restore_rng=False, setting="checkpoint")
    tokenizer = load_eval_tokenizer(paths["hf_dir"], setting="the model's tokenizer")
    return MegatronExtModel(model, tokenizer, name=str(saved.path), vocab_size=tokenizer.vocab_size)


def harm_point(config, paths: dict, model, step: int) -> dict:
    from megatron_ext.eval.perplexity import evaluate_perplexity
    from megatron_ext.eval.settings import PerplexitySettings

    e = config.eval
    point = {"step": step}
    for kind, count in e.harm_documents.items():
        settings = PerplexitySettings(data=[f"{paths['text']}/heldout_{kind}.jsonl"], lengths=[config.window],
                                      stride=config.window, num_documents=count,
                                      max_document_tokens=e.harm_document_tokens)
        point[kind] = asdict(evaluate_perplexity(model, settings).rows[0])
    return point


def long_perplexity(config, paths: dict, model) -> dict:
    from megatron_ext.eval.perplexity import evaluate_perplexity
    from megatron_ext.eval.settings import PerplexitySettings

    e = config.eval
    lengths = [config.window * m for m in e.long_multiples]
    rows = {}
    for kind, count in e.long_documents.items():
        settings = PerplexitySettings(data=[f"{paths['text']}/heldout_{kind}.jsonl"], lengths=lengths,
                                      truncate=True, num_documents=count, min_document_tokens=max(lengths))
        rows[kind] = [asdict(row) for row in evaluate_perplexity(model, settings).rows]
    return rows


def passkey(config, paths: dict, model) -> dict:
    from megatron_ext.eval.passkey import evaluate_passkey
    from megatron_ext.eval.settings import PasskeySettings

    e = config.eval
    settings = PasskeySettings(lengths=[config.window * m for m in e.passkey_multiples], trials=e.passkey_trials,
                               seed=0, batch_size=1)
    result = evaluate_passkey(model, settings)
    return {"rows": [asdict(row) for row in result.rows], "trials": [asdict(trial) for trial in result.trials]}
