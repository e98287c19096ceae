"""Runs one vLLM engine over a list of generate calls and writes what it returned (tests/test_serve_engine.py).

Runs in the serving environment (`make serve-env`), not in the training venv:
    .venv-serve/bin/python tests/serve_engine_checks.py JOB.json OUT.json
JOB: a list of {"model": DIR, "engine": {LLM keyword arguments}, "calls": [{"name", "prompts": [[token ids]],
"max_tokens"}...]}, one engine each, started one after the other in this process. The calls run in order,
each as one batched `generate`, so a later call can hit the prefix cache an earlier one filled. OUT: a list
of reports: per call, per prompt, the greedy tokens, the log-probability of each, and how many prompt
tokens came from the prefix cache; plus the engine's scheduler settings. A job with "expect_error" only
starts the engine and reports the error it raised.
"""

import json
import sys
import time


def main(job_file: str, out_file: str) -> int:
    import gc

    reports = []
    for job in json.loads(open(job_file).read()):
        reports.append(serve(job))
        gc.collect()  # the LLM's engine process ends with it
    open(out_file, "w").write(json.dumps(reports))
    return 0


def serve(job: dict) -> dict:
    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    if job.get("expect_error"):  # a model this vLLM must refuse: what it says
        try:
            LLM(model=job["model"], **job["engine"])
        except Exception as error:  # noqa: BLE001 (the message is the result)
            return {"error": f"{type(error).__name__}: {error}"}
        return {"error": None}
    llm = LLM(model=job["model"], **job["engine"])
    start_s = time.perf_counter() - started
    results = {}
    for call in job["calls"]:
        params = SamplingParams(max_tokens=call["max_tokens"], temperature=0.0, logprobs=1, ignore_eos=True)
        outputs = llm.generate([{"prompt_token_ids": p} for p in call["prompts"]], params, use_tqdm=False)
        results[call["name"]] = [_record(output) for output in outputs]
    scheduler = llm.llm_engine.vllm_config.scheduler_config
    cache = llm.llm_engine.vllm_config.cache_config
    report = {"results": results, "engine_start_s": start_s,
              "architecture": llm.llm_engine.vllm_config.model_config.architectures,
              "max_num_batched_tokens": scheduler.max_num_batched_tokens,
              "enable_chunked_prefill": scheduler.enable_chunked_prefill,
              "enable_prefix_caching": cache.enable_prefix_caching, "block_size": cache.block_size}
    llm.llm_engine.engine_core.shutdown()
    return report


def _record(output) -> dict:
    completion = output.outputs[0]
    tokens = list(completion.token_ids)
    logprobs = [step[token].logprob for token, step in zip(tokens, completion.logprobs)]
    return {"tokens": tokens, "logprobs": logprobs, "num_cached_tokens": output.num_cached_tokens or 0}


if __name__ == "__main__":  # vLLM starts its engine in a spawned process: the guard is required
    sys.exit(main(*sys.argv[1:]))
