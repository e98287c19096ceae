"""`megatron-ext eval lm-eval --backend vllm`: the harness's requests scored by a vLLM engine (serving environment)
give the default backend's numbers on a HARPE checkpoint: every loglikelihood within fp32 kernel tolerance, the same
greedy flags, the same generated text, the same metrics. Bad backend settings stop with one line before any model
loads (these run in the training venv, which has no vLLM)."""

import json
import os
import subprocess

import pytest
import torch
from serve_models import SERVE_PYTHON, needs_serve_env

from test_eval_harness import offline, tasks  # noqa: F401 (fixtures: local task YAMLs, datasets offline)

from megatron_ext.cli import main

pytest_plugins = ["test_eval_support"]  # sp_tokenizer, single_rank

MAX_LENGTH = 32  # as test_eval_harness: a passage spans several rolling windows
VOCAB, PADDED = 1003, 1024  # more model rows than tokenizer pieces (600), padded for TP 2 as training saves them


def save_harpe_checkpoint(root, tokenizer):
    """A 2-layer HARPE GQA model (4 query heads over 2 KV groups with their own bases; head_dim 32, a size vLLM's
    CPU attention takes) with padded vocabulary rows, saved as training saves it."""
    from megatron_ext.checkpoint.state import CheckpointState
    from megatron_ext.checkpoint.store import save_checkpoint
    from megatron_ext.config import ModelConfig, TrainConfig
    from megatron_ext.models.builder import build_gpt
    from megatron_ext.rope import RopeConfig

    rope = RopeConfig(head_base_strategy="uniform", head_base_params={"b_min": 1e3, "b_max": 1e5})
    config = TrainConfig(model=ModelConfig(num_layers=2, hidden_size=128, num_attention_heads=4, num_query_groups=2,
                                           ffn_hidden_size=256, seq_length=MAX_LENGTH, init_method_std=0.1,
                                           vocab_size=VOCAB), rope=rope)
    torch.manual_seed(0)
    model = build_gpt(config, PADDED, torch.device("cpu")).eval()
    state = CheckpointState.of_run(config, iteration=5, padded_vocab_size=PADDED, parallel=dict(tp=1, pp=1),
                                   tokenizer_model=str(tokenizer.path), tokenizer_vocab_size=tokenizer.vocab_size)
    save_checkpoint(root / "ckpt", 5, model=[model], state=state.to_json())
    return root / "ckpt"


def run_backend(command: list[str], model, tasks, output, backend: str) -> dict:
    argv = ["eval", "lm-eval", "--model", str(model), "--tasks", tasks["choice"], tasks["generate"], tasks["rolling"],
            "--max-length", str(MAX_LENGTH), "--log-samples", "--output-dir", str(output), "--backend", backend]
    if command:
        # faulthandler: should the engine's process abort again, the Python stacks of its threads come with it
        run = subprocess.run([*command, *argv], capture_output=True, text=True, timeout=1500,
                             env={**os.environ, "PYTHONFAULTHANDLER": "1"})
        assert run.returncode == 0, run.stderr[-4000:]
    else:
        assert main(argv) == 0
    results = json.loads((output / "lm_eval_results.json").read_text())
    results["samples"] = {task: [json.loads(line) for line in (output / f"samples_{task}.jsonl").open()]
                          for task in ("tiny_choice", "tiny_generate", "tiny_rolling")}
    return results


def numbers(response) -> list:
    """The leaves of a sample's filtered responses: floats (loglikelihoods), bools (greedy), strings (text)."""
    if isinstance(response, (list, tuple)):
        return [leaf for item in response for leaf in numbers(item)]
    return [response]


@pytest.mark.slow
@needs_serve_env
def test_vllm_backend_scores_as_the_default_backend(single_rank, sp_tokenizer, tasks, tmp_path):
    checkpoint = save_harpe_checkpoint(tmp_path, sp_tokenizer)
    default = run_backend([], checkpoint, tasks, tmp_path / "default", "default")
    # The serving environment's own megatron-ext; the checkpoint is exported there (hf_exports/iter_0000005).
    engine = run_backend([str(SERVE_PYTHON.parent / "megatron-ext")], checkpoint, tasks, tmp_path / "vllm", "vllm")
    assert (checkpoint / "hf_exports" / "iter_0000005" / "config.json").is_file()
    exported = json.loads((checkpoint / "hf_exports" / "iter_0000005" / "config.json").read_text())
    assert exported["architectures"] == ["HarpeLlamaForCausalLM"]  # served through the plugin, per-group bases

    worst = 0.0
    for task, samples in default["samples"].items():
        theirs = engine["samples"][task]
        assert [s["doc_id"] for s in samples] == [s["doc_id"] for s in theirs]
        for ours, vllm in zip(samples, theirs):
            a, b = numbers(ours["filtered_resps"]), numbers(vllm["filtered_resps"])
            assert len(a) == len(b) and a, (task, ours["filtered_resps"], vllm["filtered_resps"])
            for x, y in zip(a, b):
                if isinstance(x, float):
                    worst = max(worst, abs(x - y))
                    # fp32 on both sides; measured worst 3.9e-5 (a rolling window sums 32 token log-probabilities)
                    assert y == pytest.approx(x, abs=1e-3, rel=1e-5), (task, ours["doc_id"])
                else:  # greedy flags and generated text: exactly the default backend's
                    assert x == y, (task, ours["doc_id"], ours["filtered_resps"], vllm["filtered_resps"])
    metrics = {task: {backend: results["results"][task][metric] for backend, results in (("default", default),
                                                                                       ("vllm", engine))}
               for task, metric in (("tiny_choice", "acc,none"), ("tiny_generate", "exact_match,none"),
                                    ("tiny_rolling", "word_perplexity,none"))}
    print(f"largest loglikelihood difference, default vs vLLM: {worst:.2e}; metrics: {metrics}")
    for task, metric in (("tiny_choice", "acc,none"), ("tiny_generate", "exact_match,none")):
        assert engine["results"][task][metric] == default["results"][task][metric]
    assert engine["results"]["tiny_rolling"]["word_perplexity,none"] == pytest.approx(
        default["results"]["tiny_rolling"]["word_perplexity,none"], rel=1e-4)


def test_an_unknown_backend_is_refused_by_name(capsys):
    assert main(["eval", "lm-eval", "--model", "absent", "--tasks", "x", "--backend", "tgi"]) == 2
    assert "lm_eval.backend ('tgi') must be one of default, vllm" in capsys.readouterr().err


def test_the_vllm_backend_without_vllm_names_the_serving_environment(monkeypatch, capsys):
    import importlib.util

    from megatron_ext.eval.harness.settings import LmEvalSettings, require_vllm

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(Exception, match="make serve-env, then run .venv-serve/bin/megatron-ext eval lm-eval "
                                        "--backend vllm"):
        require_vllm()
    LmEvalSettings(tasks=["x"], backend="vllm").validate()  # a valid setting: only the install is missing
