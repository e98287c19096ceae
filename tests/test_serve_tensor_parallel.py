"""Tensor parallelism in the engine (CPU, serving env): a HARPE export with 2 KV groups served at TP 2 (one KV group,
with its own base, and its query heads per rank; vLLM's all-reduces between the ranks) gives TP 1's greedy tokens
and log-probabilities. tests/test_serve_rotary.py holds each rank's tables to the slices of the full ones; this is
the same through vLLM's parallel layers, worker processes and KV cache."""

import os

import pytest

from serve_models import build_export, harpe_rope, needs_serve_env, prompt, run_engine

pytestmark = [pytest.mark.slow, needs_serve_env]

ENGINE = {"skip_tokenizer_init": True, "enforce_eager": True, "dtype": "float32", "max_model_len": 256,
          "max_num_seqs": 4, "kv_cache_memory_bytes": 128 << 20, "seed": 0}
PROMPTS = [prompt(9, 41), prompt(70, 42), prompt(150, 43)]  # beyond the 32-token training window


def test_tp2_serves_the_tokens_of_tp1(tmp_path, single_rank):
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip(f"TP 2 on CPU binds one CPU per rank; this process may use {len(cpus)}")
    export, _ = build_export(tmp_path / "harpe", rope=harpe_rope(), family="llama")
    calls = [{"name": "batch", "prompts": PROMPTS, "max_tokens": 8}]
    env = {"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"}
    (tp1,) = run_engine([{"model": str(export), "engine": ENGINE, "calls": calls}], tmp_path / "tp1", env=env)
    # vLLM's CPU workers bind their threads to one NUMA node each unless told which CPUs: one CPU per rank here
    (tp2,) = run_engine([{"model": str(export), "calls": calls,
                          "engine": {**ENGINE, "tensor_parallel_size": 2, "distributed_executor_backend": "mp"}}],
                        tmp_path / "tp2", env={**env, "VLLM_CPU_OMP_THREADS_BIND": f"{cpus[0]}|{cpus[1]}"})
    assert tp1["architecture"] == tp2["architecture"] == ["HarpeLlamaForCausalLM"]
    worst = 0.0
    for one, two in zip(tp1["results"]["batch"], tp2["results"]["batch"]):
        assert one["tokens"] == two["tokens"]
        worst = max(worst, *(abs(a - b) for a, b in zip(one["logprobs"], two["logprobs"])))
    print(f"TP 2 against TP 1: {len(PROMPTS)} x 8 greedy tokens equal, largest log-probability difference {worst:.1e}")
    # fp32; the two ranks' partial sums are added by an all-reduce, in another order than one rank's matmul
    assert worst < 1e-4
