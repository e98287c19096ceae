"""Where a decode step's time goes: torch.profiler over DECODE_TOKENS decode steps of one engine of
serve_throughput.py (the HARPE plugin's or the stock one-base model's), the engine run in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0) so the profiler sees its operators. Runs in the serving environment:

    .venv-serve/bin/python benchmarks/serve_decode_profile.py harpe_plugin
    .venv-serve/bin/python benchmarks/serve_decode_profile.py shared_base_stock

Prints the operators by their own CPU time, with call counts: the two engines should run the same kernels
the same number of times (one rotary kernel call per layer and step), the plugin a few cheap torch ops more.
"""

import os
import sys
import tempfile
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # before vllm is imported
sys.path.insert(0, str(Path(__file__).parent))

import serve_throughput as bench  # noqa: E402 (after the environment it reads)


def main() -> int:
    which = sys.argv[1] if len(sys.argv) > 1 else "harpe_plugin"
    import random

    from torch.profiler import ProfilerActivity, profile

    with tempfile.TemporaryDirectory() as tmp:
        engine = bench.start(bench.write_models(Path(tmp))[which])
        rng = random.Random(0)
        prompts = [[rng.randrange(3, 2000) for _ in range(bench.DECODE_PROMPT_LEN)] for _ in range(bench.DECODE_PROMPTS)]
        bench.measure(engine, prompts, 4)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as profiled:
            wall, cpu = bench.measure(engine, prompts, bench.DECODE_TOKENS)
        print(f"{which}: {bench.DECODE_TOKENS} decode steps of {bench.DECODE_PROMPTS} sequences, {wall:.2f} s wall, "
              f"{cpu:.2f} s CPU, load average {os.getloadavg()[0]:.1f}")
        print(profiled.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=50))
        engine[0].llm_engine.engine_core.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
