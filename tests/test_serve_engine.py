"""End to end, fp32, enforce_eager: exports of tiny models trained here, served by vLLM (serving env), equal
transformers (megatron_ext.hf's loader) and the training model's own greedy decode.

Two engine processes for the whole module: one with megatron_ext's plugin (HARPE exports: Llama + YaRN, Qwen2
with q/k/v biases + Llama-3 scaling, Mistral + linear scaling), one with every vLLM plugin off (stock vLLM: a PoSE +
YaRN Qwen2 export it must serve, the HARPE export it must refuse).
"""

import json

import pytest

from serve_models import (
    WINDOW,
    build_export,
    harpe_rope,
    megatron_greedy,
    needs_serve_env,
    pose_yarn_rope,
    prompt,
    run_engine,
    transformers_greedy,
)

pytestmark = [pytest.mark.slow, needs_serve_env]

NEW_TOKENS = 8
CHUNK_BUDGET = 64  # max_num_batched_tokens: the long prompt needs several prefill chunks
BLOCK = 32
ENGINE = {"skip_tokenizer_init": True, "enforce_eager": True, "dtype": "float32", "max_model_len": 512,
          "max_num_seqs": 8, "max_num_batched_tokens": CHUNK_BUDGET, "block_size": BLOCK,
          "enable_prefix_caching": True, "kv_cache_memory_bytes": 256 << 20, "seed": 0}
# The exports say max_position_embeddings = the training window: serving beyond it is the point of HARPE.
LONG_CONTEXT = {"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"}


SHARED_PREFIX = prompt(128, 90)
CALLS = {
    "mixed_batch": [prompt(5, 1), prompt(33, 2), prompt(77, 3), prompt(150, 4)],  # one generate call
    "long_prompt": [prompt(300, 5)],  # > CHUNK_BUDGET tokens: chunked prefill
    "prefix_first": [SHARED_PREFIX + prompt(10, 91)],
    "prefix_second": [SHARED_PREFIX + prompt(12, 92)],  # a later call: its prefix blocks come from the cache
}


def _calls(calls: dict) -> list[dict]:
    return [{"name": name, "prompts": prompts, "max_tokens": NEW_TOKENS} for name, prompts in calls.items()]


@pytest.fixture(scope="module")
def served(tmp_path_factory, single_rank):
    """The exports, their trained models, the calls, and what the two engine processes returned."""
    work = tmp_path_factory.mktemp("serve")
    harpe_dir, harpe_model = build_export(work / "harpe", rope=harpe_rope(), family="llama")
    pose_dir, pose_model = build_export(work / "pose", rope=pose_yarn_rope(), family="qwen2", qkv_bias=True,
                                        pose_target=128, seed=4)
    qwen2_rope = harpe_rope()
    qwen2_rope.scaling = "llama3"
    qwen2_rope.scaling_params = {"factor": 4.0, "original_max_position_embeddings": WINDOW}
    qwen2_dir, qwen2_model = build_export(work / "harpe_qwen2", rope=qwen2_rope, family="qwen2", qkv_bias=True, seed=5)
    mistral_rope = harpe_rope()
    mistral_rope.scaling, mistral_rope.scaling_params = "linear", {"factor": 4.0}
    mistral_dir, mistral_model = build_export(work / "harpe_mistral", rope=mistral_rope, family="mistral", seed=6)
    pose_calls = {"pose_batch": [prompt(40, 11), prompt(100, 12), prompt(7, 13)]}
    qwen2_calls = {"qwen2_batch": [prompt(60, 21), prompt(200, 22), prompt(9, 23)]}
    mistral_calls = {"mistral_batch": [prompt(120, 31), prompt(6, 32)]}
    plugin = run_engine([{"model": str(harpe_dir), "engine": ENGINE, "calls": _calls(CALLS)},
                         {"model": str(qwen2_dir), "engine": ENGINE, "calls": _calls(qwen2_calls)},
                         {"model": str(mistral_dir), "engine": ENGINE, "calls": _calls(mistral_calls)}],
                        work / "plugin_run", env=LONG_CONTEXT)
    stock_engine = {**ENGINE, "max_model_len": 128}
    stock = run_engine([{"model": str(pose_dir), "engine": stock_engine, "calls": _calls(pose_calls)},
                        {"model": str(harpe_dir), "engine": stock_engine, "expect_error": True}],
                       work / "stock_run", env={**LONG_CONTEXT, "VLLM_PLUGINS": ""})
    return {"harpe": (harpe_dir, harpe_model, CALLS, plugin[0]),
            "harpe_qwen2": (qwen2_dir, qwen2_model, qwen2_calls, plugin[1]),
            "harpe_mistral": (mistral_dir, mistral_model, mistral_calls, plugin[2]),
            "pose": (pose_dir, pose_model, pose_calls, stock[0]), "stock_refusal": stock[1]}


def test_harpe_export_names_itself_for_the_plugin(served):
    harpe_dir, _, _, report = served["harpe"]
    config = json.loads((harpe_dir / "config.json").read_text())
    assert config["architectures"] == ["HarpeLlamaForCausalLM"] and config["rope_parameters"]["rope_type"] == "harpe"
    assert report["architecture"] == ["HarpeLlamaForCausalLM"]
    qwen2_dir, _, _, qwen2_report = served["harpe_qwen2"]
    assert json.loads((qwen2_dir / "config.json").read_text())["architectures"] == ["HarpeQwen2ForCausalLM"]
    assert qwen2_report["architecture"] == ["HarpeQwen2ForCausalLM"]
    assert served["harpe_mistral"][3]["architecture"] == ["HarpeMistralForCausalLM"]
    pose_config = json.loads((served["pose"][0] / "config.json").read_text())
    assert pose_config["architectures"] == ["Qwen2ForCausalLM"]
    assert pose_config["rope_parameters"]["rope_type"] == "yarn"


@pytest.mark.parametrize("model", ["harpe", "harpe_qwen2", "harpe_mistral", "pose"])
def test_greedy_tokens_and_logprobs_equal_transformers(served, model):
    export, _, calls, report = served[model]
    prompts = [p for name in calls for p in calls[name]]
    served_runs = [r for name in calls for r in report["results"][name]]
    references = transformers_greedy(export, prompts, NEW_TOKENS)
    differences = []
    for p, ours, reference in zip(prompts, served_runs, references):
        assert ours["tokens"] == reference["tokens"], f"prompt of {len(p)} tokens"
        differences.append(max(abs(a - b) for a, b in zip(ours["logprobs"], reference["logprobs"])))
        assert differences[-1] < 1e-3, f"prompt of {len(p)} tokens: top-1 log-probs differ by {differences[-1]}"
    print(f"\n{model}: {len(prompts)} prompts x {NEW_TOKENS} tokens equal; largest top-1 log-prob difference "
          f"{max(differences):.2e}")


@pytest.mark.parametrize("model", ["harpe", "harpe_qwen2", "harpe_mistral", "pose"])
def test_greedy_tokens_equal_the_training_models_own_decode(served, model):
    _, trained, calls, report = served[model]
    for name, prompts in calls.items():
        for p, ours in zip(prompts, report["results"][name]):
            assert ours["tokens"] == megatron_greedy(trained, p, NEW_TOKENS), f"{name}: prompt of {len(p)} tokens"


def test_prompts_beyond_the_training_window_were_served(served):
    """What the equality above covered: prompts past the window, a long one in chunks, a mixed batch."""
    _, _, calls, report = served["harpe"]
    assert max(len(p) for p in calls["mixed_batch"]) > 4 * WINDOW and len(calls["long_prompt"][0]) > 8 * WINDOW
    assert report["enable_chunked_prefill"] and report["max_num_batched_tokens"] == CHUNK_BUDGET
    assert len(calls["long_prompt"][0]) > CHUNK_BUDGET


def test_shared_prefix_comes_from_the_prefix_cache(served):
    _, _, _, report = served["harpe"]
    assert report["enable_prefix_caching"]
    cached = report["results"]["prefix_second"][0]["num_cached_tokens"]
    assert cached >= (len(SHARED_PREFIX) // BLOCK) * BLOCK, cached  # every full block of the shared prefix


def test_stock_vllm_refuses_the_harpe_export_by_name(served):
    error = served["stock_refusal"]["error"]
    assert error is not None and "HarpeLlamaForCausalLM" in error, error
