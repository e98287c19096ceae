"""Prefill and decode tokens/s of a HARPE export through megatron_ext's vLLM plugin against the same weights with
one shared RoPE base on stock vLLM (its own rotary kernel). Runs in the serving environment:

    .venv-serve/bin/python benchmarks/serve_throughput.py [--out docs/results/serve_throughput.json]

One random Llama (4 layers, hidden 512, 8 query heads over 4 KV groups, head_dim 64) is saved twice with the
same weights: as HarpeLlamaForCausalLM (HARPE bases per KV group, YaRN x4) and as LlamaForCausalLM (one base,
YaRN x4). Each engine serves the same requests: prefill = PREFILL_PROMPTS prompts of PREFILL_LEN tokens with
one new token; decode = DECODE_PROMPTS short prompts with DECODE_TOKENS new tokens each (prefill time
subtracted). Both engines run side by side and are measured in turns (--repeats times); the table reports
medians, the spread of the per-repeat ratios, and the machine's load average at each repeat (CPU hosts are shared).
The rotation alone is timed against vLLM's op as the engine runs it (forward_cpu / forward_cuda: the fused kernel,
which vLLM enables whenever torch.compile's inductor is off, as with enforce_eager here).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

PREFILL_PROMPTS, PREFILL_LEN = 8, 1024
DECODE_PROMPTS, DECODE_PROMPT_LEN, DECODE_TOKENS = 8, 16, 64
REPEATS = 9
KEYS = ("prefill_tok_s", "decode_tok_s", "prefill_tok_per_cpu_s", "decode_tok_per_cpu_s")
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


def measure(engine, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one batched generate: CPU time of this process (the engine's front end) and
    of the engine's own processes, which a shared machine's load changes far less than the wall time."""
    from vllm import SamplingParams

    llm, processes = engine
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    cpu_before, started = cpu_seconds(processes), time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - started, cpu_seconds(processes) - cpu_before


def cpu_seconds(processes) -> float:
    import psutil

    return sum(sum(process.cpu_times()[:2]) for process in [psutil.Process(), *processes])


def start(model_dir: Path):
    """The engine and the processes it started (its engine core): (LLM, [psutil.Process])."""
    import psutil
    from vllm import LLM

    before = {child.pid for child in psutil.Process().children(recursive=True)}
    llm = LLM(model=str(model_dir), skip_tokenizer_init=True, enforce_eager=True, dtype="float32",
              max_model_len=2048, max_num_seqs=16, max_num_batched_tokens=2048, enable_prefix_caching=False,
              kv_cache_memory_bytes=1 << 30, seed=0)
    return llm, [child for child in psutil.Process().children(recursive=True) if child.pid not in before]


def measure_once(engine, long_prompts, short_prompts) -> dict:
    prefill_s, prefill_cpu = measure(engine, long_prompts, 1)
    short_s, short_cpu = measure(engine, short_prompts, 1)
    decode_s, decode_cpu = measure(engine, short_prompts, DECODE_TOKENS)
    prefill_tokens, decode_tokens = PREFILL_PROMPTS * PREFILL_LEN, DECODE_PROMPTS * (DECODE_TOKENS - 1)
    return {"prefill_tok_s": prefill_tokens / prefill_s, "decode_tok_s": decode_tokens / (decode_s - short_s),
            "prefill_tok_per_cpu_s": prefill_tokens / prefill_cpu,
            "decode_tok_per_cpu_s": decode_tokens / (decode_cpu - short_cpu)}


def run(dirs: dict[str, Path], repeats: int) -> dict:
    """Both engines up at once, measured in turns (A B B A A B ...: each goes first as often), so a change in the
    machine's load hits both alike."""
    import random

    engines = {name: start(path) for name, path in dirs.items()}
    rng = random.Random(0)
    long_prompts = [[rng.randrange(3, 2000) for _ in range(PREFILL_LEN)] for _ in range(PREFILL_PROMPTS)]
    short_prompts = [[rng.randrange(3, 2000) for _ in range(DECODE_PROMPT_LEN)] for _ in range(DECODE_PROMPTS)]
    for engine in engines.values():
        measure(engine, short_prompts, 4)  # warm-up
    runs = {name: [] for name in engines}
    for repeat in range(repeats):
        load = os.getloadavg()[0]
        order = list(engines) if repeat % 2 == 0 else list(engines)[::-1]
        for name in order:
            runs[name].append(measure_once(engines[name], long_prompts, short_prompts) | {"load_avg_1min": load})
    for llm, _ in engines.values():
        llm.llm_engine.engine_core.shutdown()
    return {name: {key: statistics.median(row[key] for row in rows) for key in KEYS} | {"runs": rows}
            for name, rows in runs.items()}


def rotary_alone(tokens: int, repeats: int = 40) -> dict:
    """Seconds per call (the fastest of `repeats`, taken in turns: the least disturbed by other load) for `tokens`
    tokens of one layer, q/k sliced from one qkv tensor as vLLM's attention hands them over: the plugin's rotation
    with vLLM's fused kernel (what the engine runs), the plugin's torch-op rotation (inductor's path), and vLLM's
    one-base module through the kernel (forward_cpu/forward_cuda) and through torch ops (forward_native)."""
    import torch
    from vllm import _custom_ops
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    from megatron_ext.rope import RopeConfig
    from megatron_ext.serve.rotary import GroupedRotary

    heads, kv_heads, head_dim = SIZES["num_attention_heads"], SIZES["num_key_value_heads"], SIZES["head_dim"]
    yarn = {"factor": 4.0, "original_max_position_embeddings": 512}
    rope = RopeConfig(scaling="yarn", scaling_params=yarn, head_base_strategy="uniform",
                      head_base_params={"b_min": 500.0, "b_max": 500000.0})
    shape = dict(head_dim=head_dim, num_heads=heads, num_kv_heads=kv_heads, max_position=2048)
    with set_current_vllm_config(VllmConfig()):
        stock = get_rope(head_dim, max_position=2048, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0,
                                                                       **yarn}, dtype=torch.float32)
    kernel = stock.forward_cuda if torch.cuda.is_available() else stock.forward_cpu
    modules = {"plugin_fused_kernel": GroupedRotary(rope, **shape, fused_rotary=_custom_ops.rotary_embedding),
               "plugin_torch_ops": GroupedRotary(rope, **shape),
               "stock_fused_kernel": kernel, "stock_torch_ops": stock.forward_native}
    positions = torch.randint(0, 2048, (tokens,))
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim)
    query, key, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    best = dict.fromkeys(modules, float("inf"))
    for _ in range(repeats):
        for name, module in modules.items():
            started = time.perf_counter()
            module(positions, query, key)  # in place for the kernels: the values do not matter here
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/results/serve_throughput.json")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="measurements of each engine, taken in turns")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dirs = write_models(Path(tmp))
        results = run(dirs, args.repeats)
    ours, stock = results["harpe_plugin"]["runs"], results["shared_base_stock"]["runs"]
    ratios = {key: results["harpe_plugin"][key] / results["shared_base_stock"][key] for key in KEYS}
    # each repeat's two measurements were taken back to back, so their ratio sees the same machine load
    paired = {key: spread([a[key] / b[key] for a, b in zip(ours, stock)]) for key in KEYS}
    load = spread([row["load_avg_1min"] for row in ours])
    rotary = {f"{tokens}_tokens": rotary_alone(tokens) for tokens in (PREFILL_PROMPTS * PREFILL_LEN, DECODE_PROMPTS)}
    print(f"{'engine':<20} {'prefill tok/s':>14} {'decode tok/s':>13} {'prefill tok/CPU-s':>18} "
          f"{'decode tok/CPU-s':>17}   (medians of {args.repeats})")
    for name, row in [*results.items(), ("ratio (HARPE/stock)", ratios)]:
        print(f"{name:<20} " + " ".join(f"{row[key]:>{width}.{3 if row is ratios else 0}f}"
                                        for key, width in zip(KEYS, (14, 13, 18, 17))))
    for key in KEYS:
        print(f"paired ratio per repeat, {key}: min {paired[key]['min']:.3f} median {paired[key]['median']:.3f} "
              f"max {paired[key]['max']:.3f}")
    print(f"load average (1 min) during the repeats: {load['min']:.1f} .. {load['max']:.1f} "
          f"(median {load['median']:.1f}) on {os.cpu_count()} CPUs")
    for case, times in rotary.items():
        print(f"rotary alone, one layer, {case}: " + ", ".join(f"{n} {t * 1e6:.0f} us" for n, t in times.items()))
    import torch
    import vllm

    report = {"results": results, "ratio_harpe_over_stock": ratios, "paired_ratio_per_repeat": paired,
              "load_avg_1min": load, "cpus": os.cpu_count(), "rotary_alone_s": rotary, "model": SIZES,
              "prefill": {"prompts": PREFILL_PROMPTS, "length": PREFILL_LEN},
              "decode": {"prompts": DECODE_PROMPTS, "prompt_length": DECODE_PROMPT_LEN, "new_tokens": DECODE_TOKENS},
              "repeats": args.repeats, "vllm": vllm.__version__, "torch": torch.__version__,
              "device": "cuda" if torch.cuda.is_available() else "cpu", "command": " ".join(sys.argv)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":  # vLLM starts its engine in a spawned process
    sys.exit(main())
