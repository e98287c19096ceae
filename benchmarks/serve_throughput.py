"""Prefill and decode tokens/s of a HARPE export through megatron_ext's vLLM plugin against the same weights with
one shared RoPE base on stock vLLM (its own rotary kernel). Runs in the serving environment:

    .venv-serve/bin/python benchmarks/serve_throughput.py [--out docs/results/serve_throughput.json]

One random Llama (4 layers, hidden 512, 8 query heads over 4 KV groups, head_dim 64) is saved twice with the
same weights: as HarpeLlamaForCausalLM (HARPE bases per KV group, YaRN x4) and as LlamaForCausalLM (one base,
YaRN x4). Each engine serves the same requests: prefill = PREFILL_PROMPTS prompts of PREFILL_LEN tokens with
one new token; decode = DECODE_PROMPTS short prompts with DECODE_TOKENS new tokens each (prefill time
subtracted). Both engines run side by side and are measured in turns, REPEATS times; the table reports medians.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

PREFILL_PROMPTS, PREFILL_LEN = 8, 1024
DECODE_PROMPTS, DECODE_PROMPT_LEN, DECODE_TOKENS = 8, 16, 64
REPEATS = 5
SIZES = dict(vocab_size=2048, hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, head_dim=64, max_position_embeddings=2048)


def write_models(root: Path) -> dict[str, Path]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_ext.convert.adapters import HARPE_PREFIX
    from megatron_ext.rope.hf_forms import rope_to_hf, set_hf_rope
    from megatron_ext.rope import RopeConfig

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SIZES)).eval()
    yarn = {"factor": 4.0, "original_max_position_embeddings": 512}
    ropes = {"harpe_plugin": RopeConfig(scaling="yarn", scaling_params=yarn, head_base_strategy="uniform",
                                        head_base_params={"b_min": 500.0, "b_max": 500000.0}),
             "shared_base_stock": RopeConfig(base=10000.0, scaling="yarn", scaling_params=yarn)}
    dirs = {}
    for name, rope in ropes.items():
        out = root / name
        model.save_pretrained(out)
        config = json.loads((out / "config.json").read_text())
        set_hf_rope(config, rope_to_hf(rope, num_query_groups=SIZES["num_key_value_heads"],
                                       head_dim=SIZES["head_dim"]), "rope_parameters")
        if rope.per_head:
            config["architectures"] = [HARPE_PREFIX + "LlamaForCausalLM"]
        (out / "config.json").write_text(json.dumps(config, indent=1))
        dirs[name] = out
    return dirs


def measure(llm, prompts: list[list[int]], new_tokens: int) -> float:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    started = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - started


def start(model_dir: Path):
    from vllm import LLM

    return LLM(model=str(model_dir), skip_tokenizer_init=True, enforce_eager=True, dtype="float32",
               max_model_len=2048, max_num_seqs=16, max_num_batched_tokens=2048, enable_prefix_caching=False,
               kv_cache_memory_bytes=1 << 30, seed=0)


def measure_once(llm, long_prompts, short_prompts) -> dict:
    prefill_s = measure(llm, long_prompts, 1)
    short_prefill_s = measure(llm, short_prompts, 1)
    decode_s = measure(llm, short_prompts, DECODE_TOKENS) - short_prefill_s
    return {"prefill_tok_s": PREFILL_PROMPTS * PREFILL_LEN / prefill_s,
            "decode_tok_s": DECODE_PROMPTS * (DECODE_TOKENS - 1) / decode_s}


def run(dirs: dict[str, Path]) -> dict:
    """Both engines up at once, measured in turns (A B A B ...), so a change in the machine's load hits both."""
    import random

    engines = {name: start(path) for name, path in dirs.items()}
    rng = random.Random(0)
    long_prompts = [[rng.randrange(3, 2000) for _ in range(PREFILL_LEN)] for _ in range(PREFILL_PROMPTS)]
    short_prompts = [[rng.randrange(3, 2000) for _ in range(DECODE_PROMPT_LEN)] for _ in range(DECODE_PROMPTS)]
    for llm in engines.values():
        measure(llm, short_prompts, 4)  # warm-up
    runs = {name: [] for name in engines}
    for _ in range(REPEATS):
        for name, llm in engines.items():
            runs[name].append(measure_once(llm, long_prompts, short_prompts))
    for llm in engines.values():
        llm.llm_engine.engine_core.shutdown()
    return {name: {key: statistics.median(row[key] for row in rows) for key in rows[0]} | {"runs": rows}
            for name, rows in runs.items()}


def rotary_alone(tokens: int, repeats: int = 40) -> dict:
    """Seconds per call (the fastest of `repeats`, taken in turns: the least disturbed by other load) of the
    plugin's rotation against vLLM's own rotary op on the same q/k, for `tokens` tokens of one layer."""
    import torch
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    from megatron_ext.rope import RopeConfig
    from megatron_ext.serve.rotary import GroupedRotary

    heads, kv_heads, head_dim = SIZES["num_attention_heads"], SIZES["num_key_value_heads"], SIZES["head_dim"]
    yarn = {"factor": 4.0, "original_max_position_embeddings": 512}
    ours = GroupedRotary(RopeConfig(scaling="yarn", scaling_params=yarn, head_base_strategy="uniform",
                                    head_base_params={"b_min": 500.0, "b_max": 500000.0}),
                         head_dim=head_dim, num_heads=heads, num_kv_heads=kv_heads, max_position=2048)
    with set_current_vllm_config(VllmConfig()):
        stock = get_rope(head_dim, max_position=2048, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0,
                                                                       **yarn}, dtype=torch.float32)
    positions = torch.randint(0, 2048, (tokens,))
    query, key = torch.randn(tokens, heads * head_dim), torch.randn(tokens, kv_heads * head_dim)
    best = {"harpe_plugin": float("inf"), "shared_base_stock": float("inf")}
    for _ in range(repeats):
        for name, module in (("harpe_plugin", ours), ("shared_base_stock", stock)):
            q, k = query.clone(), key.clone()
            started = time.perf_counter()
            module(positions, q, k)
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/results/serve_throughput.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dirs = write_models(Path(tmp))
        results = run(dirs)
    for row in results.values():  # the least disturbed repeat, next to the median
        row["best_prefill_tok_s"] = max(run["prefill_tok_s"] for run in row["runs"])
        row["best_decode_tok_s"] = max(run["decode_tok_s"] for run in row["runs"])
    keys = ("prefill_tok_s", "decode_tok_s", "best_prefill_tok_s", "best_decode_tok_s")
    ratios = {key: results["harpe_plugin"][key] / results["shared_base_stock"][key] for key in keys}
    rotary = {f"{tokens}_tokens": rotary_alone(tokens) for tokens in (PREFILL_PROMPTS * PREFILL_LEN, DECODE_PROMPTS)}
    print(f"{'engine':<20} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for name, row in results.items():
        print(f"{name:<20} {row['prefill_tok_s']:>14.0f} {row['decode_tok_s']:>13.1f}")
    print(f"{'ratio (HARPE/stock)':<20} {ratios['prefill_tok_s']:>14.3f} {ratios['decode_tok_s']:>13.3f}   (medians)")
    print(f"{'ratio, best repeats':<20} {ratios['best_prefill_tok_s']:>14.3f} {ratios['best_decode_tok_s']:>13.3f}")
    for case, times in rotary.items():
        print(f"rotary alone, one layer, {case}: plugin {times['harpe_plugin'] * 1e6:.0f} us, "
              f"vLLM's op {times['shared_base_stock'] * 1e6:.0f} us")
    import torch
    import vllm

    report = {"results": results, "ratio_harpe_over_stock": ratios, "rotary_alone_s": rotary, "model": SIZES,
              "prefill": {"prompts": PREFILL_PROMPTS, "length": PREFILL_LEN},
              "decode": {"prompts": DECODE_PROMPTS, "prompt_length": DECODE_PROMPT_LEN, "new_tokens": DECODE_TOKENS},
              "repeats": REPEATS, "vllm": vllm.__version__, "torch": torch.__version__,
              "device": "cuda" if torch.cuda.is_available() else "cpu", "command": " ".join(sys.argv)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":  # vLLM starts its engine in a spawned process
    sys.exit(main())
