"""The reproduction's retrieval track: pretrain at L until passkey retrieval is learned, then extend to s*L with
every method at two budgets (and equal tokens for the PoSE family), from several pretraining seeds.

Data: passkey prompts of the evaluation's own template, one prompt of exactly the run's sequence length per
sample, loss on the answer tokens only (`megatron_ext.data.passkey_data`). The keys of every evaluation prompt are
held out of training. The pretrained model must retrieve at L (`retrieval.min_accuracy` of
`retrieval.check_trials` held-out prompts) before any extension starts; otherwise the run stops and says so.

Layout under `<output_dir>/retrieval/`:
    data/<tag>/{pretrain,extend}_<length>{.bin,.idx,_loss_mask.*,.keys.jsonl}
    pretrain_seed<k>/{train.yaml,train.log,checkpoints/,check.json,summary.json}
    seed<k>/<method>/<budget>/stage<i>/...      one extension run
    seed<k>/<method>/<budget>/result.json       training measurements + passkey trials per length
"""

import json
import time
from dataclasses import dataclass
from pathlib import Path

from megatron_ext.config import ConfigError
from megatron_ext.repro.config import RetrievalTrack

PASSKEY_SEED_OFFSET = 7_919  # evaluation prompts: seed + this; the pretraining check: seed + 2 * this


def budgets_of(track: RetrievalTrack, method) -> list[tuple[str, int, int]]:
    """(budget name, optimizer steps, prompts per step) of a method's extension runs; none for `original`."""
    if not method.stages:
        return []
    e = track.extend
    runs = [(name, steps, e.sequences_per_iter) for name, steps in e.budgets.items()]
    if e.equal_tokens and all(stage.pose for stage in method.stages):
        largest = max(e.budgets, key=e.budgets.get)
        runs.append((f"{largest}_equal_tokens", e.budgets[largest] * track.scale, e.sequences_per_iter))
    return runs


def stage_plan(track: RetrievalTrack, method, steps: int, sequences: int) -> list[tuple]:
    """(stage, `train_yaml` settings) per stage of one extension run."""
    from megatron_ext.repro.runner import stage_iterations

    e, planned = track.extend, []
    for stage, iters in zip(method.stages, stage_iterations(steps, method.stages)):
        planned.append((stage, dict(seq_length=stage.seq_length, rope=stage.rope, pose=stage.pose, iters=iters,
                                    global_batch=sequences,
                                    micro_batch=max(1, min(sequences, e.micro_batch_tokens // stage.seq_length)),
                                    lr=e.lr, min_lr=e.min_lr, warmup=min(e.warmup_iters, iters - 1))))
    return planned


def planned_runs(config, track: RetrievalTrack) -> list[tuple[str, dict]]:
    """(label, settings) of every training run the track makes: checked before any work."""
    from megatron_ext.repro.runner import pretrain_settings

    runs = [("retrieval pretraining (retrieval.pretrain.*)", pretrain_settings(track))]
    for method in track.selected_methods(config.model):
        for budget, steps, sequences in budgets_of(track, method):
            runs += [(f"retrieval {method.name} {budget} stage {i + 1} (retrieval.extend.*)", settings)
                     for i, (_, settings) in enumerate(stage_plan(track, method, steps, sequences))]
    return runs


# --- data -------------------------------------------------------------------------------------


def evaluation_draws(track: RetrievalTrack, seed: int) -> dict[int, list[tuple[int, float]]]:
    """length -> (key, depth) of every evaluation prompt of a pretraining seed."""
    from megatron_ext.eval.passkey import draw_keys_and_depths

    return {n: draw_keys_and_depths(seed + PASSKEY_SEED_OFFSET, n, track.trials_at(n), track.eval.key_max)
            for n in track.eval_lengths()}


def check_draws(track: RetrievalTrack, seed: int) -> list[tuple[int, float]]:
    from megatron_ext.eval.passkey import draw_keys_and_depths

    return draw_keys_and_depths(seed + 2 * PASSKEY_SEED_OFFSET, track.base_length, track.check_trials,
                                track.eval.key_max)


def held_out_keys(track: RetrievalTrack) -> frozenset:
    """Every key an evaluation or check prompt of any seed uses: training never sees them."""
    keys = set()
    for seed in track.seeds:
        keys.update(key for draws in evaluation_draws(track, seed).values() for key, _ in draws)
        keys.update(key for key, _ in check_draws(track, seed))
    return frozenset(keys)


@dataclass(frozen=True)
class RetrievalData:
    tokenizer_model: str
    prefixes: dict  # (phase, length) -> indexed-dataset prefix; phase "pretrain" or "extend"


def prepare_retrieval_data(root: Path, tokenizer_model: str, config, track: RetrievalTrack, log) -> RetrievalData:
    """One dataset per (phase, sequence length) the track trains at, each as many prompts as its longest run
    reads (no prompt twice in a run); prompt lengths uniform from L/2 to the sequence length, so an extension
    keeps seeing short distances too. Built once, every file renamed into place when complete."""
    import hashlib

    from megatron_ext.data.passkey_data import passkey_documents, write_passkey_dataset
    from megatron_ext.eval.tokenizers import load_eval_tokenizer

    needed = {("pretrain", track.base_length): track.pretrain.iters * track.pretrain.global_batch_size}
    for method in track.selected_methods(config.model):
        for _, steps, sequences in budgets_of(track, method):
            for _, settings in stage_plan(track, method, steps, sequences):
                key = ("extend", settings["seq_length"])
                needed[key] = max(needed.get(key, 0), settings["iters"] * settings["global_batch"])
    held_out = held_out_keys(track)
    identity = json.dumps([sorted(needed.items()), sorted(held_out), track.eval.key_max,
                           Path(tokenizer_model).stat().st_size]).encode()
    directory = Path(root) / hashlib.sha256(identity).hexdigest()[:12]
    tokenizer = load_eval_tokenizer(tokenizer_model, "sentencepiece")
    try:  # the shortest prompt the track trains or evaluates on, before any work
        passkey_documents(tokenizer, length=track.base_length, count=1, seed=0, key_max=track.eval.key_max)
    except ValueError as error:
        raise ConfigError(f"retrieval.base_length ({track.base_length}) cannot hold a passkey prompt with this "
                          f"tokenizer ({error}): raise retrieval.base_length or data.vocab_size") from None
    prefixes = {}
    for (phase, length), count in sorted(needed.items()):
        prefix = directory / f"{phase}_{length}"
        prefixes[phase, length] = str(prefix)
        if Path(f"{prefix}.keys.jsonl").is_file():
            continue
        started = time.perf_counter()
        write_passkey_dataset(prefix, tokenizer, length=length, count=count, seed=0 if phase == "pretrain" else 1,
                              key_max=track.eval.key_max, held_out_keys=held_out, shortest=track.base_length // 2)
        log(f"retrieval data: {count} {phase} prompts of {length} tokens ({time.perf_counter() - started:.0f} s)")
    return RetrievalData(tokenizer_model, prefixes)


# --- runs -------------------------------------------------------------------------------------


def retrieval_yaml(config, data: RetrievalData, phase: str, *, seed: int, run_dir: Path, pretrained, **settings):
    from megatron_ext.repro.runner import train_yaml

    length = settings["seq_length"]
    raw = train_yaml(config, data_prefix=data.prefixes[phase, length], tokenizer_model=data.tokenizer_model,
                     seed=seed, run_dir=run_dir, pretrained=pretrained, **settings)
    raw["data"].update(add_extra_token=False, answer_only_loss=True)
    return raw


def passkey_trials(model, length: int, draws: list[tuple[int, float]], batch_size: int) -> list[dict]:
    """One teacher-forced pass per prompt: key, depth, exact match, share of key tokens right."""
    from megatron_ext.eval.distributed import check_prompt_groups
    from megatron_ext.data.prompts import PASSKEY_FILLER, filler_tokens, passkey_prompt

    filler = filler_tokens(model.tokenizer, PASSKEY_FILLER)
    prompts = [passkey_prompt(model.tokenizer, length, key=key, depth=depth, filler=filler) for key, depth in draws]
    checks = check_prompt_groups(model, [prompts], batch_size=batch_size, number_answer=True)[0]
    return [dict(key=key, depth=depth, correct=bool(check.correct), token_accuracy=check.token_accuracy)
            for (key, depth), check in zip(draws, checks)]


def evaluate_model(track: RetrievalTrack, checkpoint: str, name: str, seed: int) -> dict:
    """Passkey trials at every evaluation length (length as text -> list of trials)."""
    from megatron_ext.eval.models import load_eval_model

    model = load_eval_model(checkpoint, name=name, precision="fp32")
    return {str(length): passkey_trials(model, length, draws, track.eval.batch_size)
            for length, draws in evaluation_draws(track, seed).items()}


class RetrievalNotLearned(ConfigError):
    """The pretrained model does not retrieve at L: extension numbers would sit at the floor."""


def _check(track: RetrievalTrack, checkpoint: str, seed: int) -> tuple[float, int]:
    """Passkey exact match at L on the seed's held-out check prompts: (accuracy, prompts)."""
    from megatron_ext.eval.models import load_eval_model

    model = load_eval_model(checkpoint, name=f"pretrain_seed{seed}", precision="fp32")
    trials = passkey_trials(model, track.base_length, check_draws(track, seed), track.eval.batch_size)
    return sum(t["correct"] for t in trials) / len(trials), len(trials)


def pretrain_seed(config, track: RetrievalTrack, data: RetrievalData, seed: int, out: Path, log) -> dict:
    """Pretrain one seed at L (or reuse it) until it retrieves: after `pretrain.iters`, and after each of up to
    `pretrain.max_extra_rounds` continuations of `pretrain.extra_iters` at the final learning rate, the model is
    checked at L on held-out prompts; the first check that reaches `min_accuracy` ends the pretraining. Returns
    the summary; a seed that never gets there stops the run."""
    from megatron_ext.checkpoint.layout import find_checkpoint
    from megatron_ext.repro.runner import pretrain_settings, run_training, write_json

    p, run_dir = track.pretrain, out / f"pretrain_seed{seed}"
    summary_file = run_dir / "summary.json"
    if summary_file.is_file() and find_checkpoint(run_dir / "checkpoints", "auto") is not None:
        summary = json.loads(summary_file.read_text())
        log(f"retrieval pretraining seed {seed}: reusing {summary['checkpoint']}")
    else:
        log(f"retrieval pretraining seed {seed} at {track.base_length}: {p.iters} iterations of "
            f"{p.global_batch_size} prompts, loss on the answer only (log: {run_dir / 'train.log'})")
        raw = retrieval_yaml(config, data, "pretrain", seed=seed, run_dir=run_dir, pretrained=None,
                             **pretrain_settings(track))
        summary = run_training(raw, run_dir)
        summary.update(iterations=p.iters, checks=[])
    summary.setdefault("iterations", p.iters)
    summary.setdefault("checks", [summary["check_accuracy"]] if "check_accuracy" in summary else [])
    while True:
        if len(summary["checks"]) < 1 + summary.get("extra_rounds", 0):
            started = time.perf_counter()
            accuracy, prompts = _check(track, summary["checkpoint"], seed)
            summary["checks"].append(accuracy)
            summary.update(check_accuracy=accuracy, check_trials=prompts,
                           check_seconds=summary.get("check_seconds", 0.0) + time.perf_counter() - started)
            write_json(summary_file, summary)
        log(f"retrieval pretraining seed {seed}: {summary['iterations']} iterations, {summary['seconds']:.0f} s, "
            f"answer loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f}, passkey exact match at "
            f"{track.base_length}: {summary['check_accuracy']:.3f} ({summary['check_trials']} held-out prompts; "
            f"required {track.min_accuracy:g})")
        rounds = summary.get("extra_rounds", 0)
        if summary["check_accuracy"] >= track.min_accuracy or rounds >= p.max_extra_rounds:
            break
        more_dir = run_dir / f"more{rounds + 1}"
        log(f"retrieval pretraining seed {seed}: below {track.min_accuracy:g}, {p.extra_iters} more iterations at "
            f"lr {p.min_lr:g} (round {rounds + 1} of at most {p.max_extra_rounds})")
        raw = retrieval_yaml(config, data, "pretrain", seed=seed + 1000 * (rounds + 1), run_dir=more_dir,
                             pretrained=summary["checkpoint"], **dict(
                                 pretrain_settings(track), iters=p.extra_iters, lr=p.min_lr, min_lr=p.min_lr,
                                 warmup=min(10, p.extra_iters - 1)))
        more = run_training(raw, more_dir)
        summary.update(checkpoint=more["checkpoint"], seconds=summary["seconds"] + more["seconds"],
                       last_loss=more["last_loss"], iterations=summary["iterations"] + p.extra_iters,
                       extra_rounds=rounds + 1)
        write_json(summary_file, summary)
    if summary["check_accuracy"] < track.min_accuracy:
        raise RetrievalNotLearned(
            f"retrieval pretraining seed {seed} reaches passkey exact match {summary['check_accuracy']:.3f} at "
            f"{track.base_length} tokens after {summary['iterations']} iterations, below retrieval.min_accuracy "
            f"({track.min_accuracy:g}): the extension would measure the floor. Train longer "
            f"(retrieval.pretrain.iters, now {p.iters}; retrieval.pretrain.max_extra_rounds, now "
            f"{p.max_extra_rounds}) or with another learning rate (retrieval.pretrain.lr); "
            f"{run_dir / 'train.log'} has the losses")
    return summary


def extension_runs(track: RetrievalTrack, method) -> list[tuple[list, int]]:
    """The training runs of a method's budgets: [(budgets it serves, steps)]. A single-stage method trains once,
    to its largest budget, and each budget is the checkpoint at its own step (the learning rate is constant
    after warm-up, so the first n steps of a longer run are an n-step run); a multi-stage method (ABF-multi)
    splits each budget over its stages and trains once per budget."""
    budgets = budgets_of(track, method)
    if len(method.stages) == 1 and budgets:
        return [(budgets, max(steps for _, steps, _ in budgets))]
    return [([budget], budget[1]) for budget in budgets]


def run_track(config, track: RetrievalTrack, tokenizer_model: str, out: Path, log, fresh: bool = False) -> dict:
    """Every pretraining seed, method and budget of the track; returns the results for the report."""
    import math
    import shutil

    from megatron_ext.checkpoint.layout import checkpoint_name
    from megatron_ext.repro.runner import run_training, write_json

    out = out / "retrieval"
    data = prepare_retrieval_data(out / "data", tokenizer_model, config, track, log)
    methods = track.selected_methods(config.model)
    pretrained, failed = {}, {}  # each seed is pretrained (and checked) right before its own extensions
    results = []
    jobs = [(seed, method, served, steps) for seed in track.seeds for method in methods
            for served, steps in (extension_runs(track, method) or [([("none", 0, 0)], 0)])]
    for done, (seed, method, served, steps) in enumerate(jobs, start=1):
        if seed in failed:
            continue
        if seed not in pretrained:
            try:
                pretrained[seed] = pretrain_seed(config, track, data, seed, out, log)
            except RetrievalNotLearned as error:
                failed[seed] = json.loads((out / f"pretrain_seed{seed}" / "summary.json").read_text())
                if len(failed) > track.max_failed_seeds:
                    raise
                log(f"{error}. Seed {seed} is left out ({len(failed)} of at most {track.max_failed_seeds} seeds)")
                continue
        method_dir = out / f"seed{seed}" / method.name
        files = [method_dir / budget / "result.json" for budget, _, _ in served]
        if all(f.is_file() for f in files) and not fresh:
            results += [json.loads(f.read_text()) for f in files]
            continue
        sequences = served[0][2]
        run_dir = method_dir / (served[0][0] if len(served) == 1 else "run")
        checkpoint, stages, seconds = pretrained[seed]["checkpoint"], [], 0.0
        for index, (stage, settings) in enumerate(stage_plan(track, method, steps, sequences)):
            stage_dir = run_dir / f"stage{index}"
            raw = retrieval_yaml(config, data, "extend", seed=seed, run_dir=stage_dir, pretrained=checkpoint,
                                 **settings)
            if len(served) > 1:  # one checkpoint per budget's step
                raw["checkpoint"].update(save_interval=math.gcd(*[b[1] for b in served]), keep_last=None)
            measured = run_training(raw, stage_dir)
            measured.update(seq_length=stage.seq_length, iterations=settings["iters"],
                            global_batch=settings["global_batch"], pose=stage.pose, label=stage.label)
            stages.append(measured)
            checkpoint, seconds = measured["checkpoint"], seconds + measured["seconds"]
        if len(served) > 1:  # keep the budgets' checkpoints only
            kept = {checkpoint_name(b[1]) for b in served}
            for saved in Path(checkpoint).parent.glob("iter_*"):
                if saved.name not in kept:
                    shutil.rmtree(saved, ignore_errors=True)
        for (budget, budget_steps, _), result_file in zip(served, files):
            # a shared run: the checkpoint at this budget's step; otherwise the run's (last stage's) last one
            budget_checkpoint = (str(Path(checkpoint).parent / checkpoint_name(budget_steps)) if len(served) > 1
                                 else checkpoint)
            share = budget_steps / steps if steps else 0.0  # the run's time up to this budget's step
            started = time.perf_counter()
            trials = evaluate_model(track, budget_checkpoint, method.name, seed)
            result = dict(method=method.name, description=method.description, seed=seed, budget=budget,
                          steps=budget_steps, sequences_per_iter=sequences, seconds=seconds * share,
                          eval_seconds=time.perf_counter() - started,
                          tokens=round(sum(s["tokens"] for s in stages) * share), stages=stages,
                          checkpoint=budget_checkpoint, trials=trials)
            write_json(result_file, result)
            results.append(result)
            accuracy = {n: sum(t["correct"] for t in ts) / len(ts) for n, ts in trials.items()}
            log(f"[retrieval {done}/{len(jobs)}] seed {seed} {method.name} {budget}: train {result['seconds']:.0f} s, "
                f"eval {result['eval_seconds']:.0f} s, passkey " + " ".join(f"{n}:{a:.2f}" for n, a in accuracy.items()))
    return dict(pretrain=pretrained, failed=failed, results=results)
