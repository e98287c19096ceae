"""`VllmLM`: `eval lm-eval --backend vllm`, the harness's requests scored by a vLLM engine on the model's export.

Why a subclass of EvalModelLM and not lm-eval's own `vllm` model: the numbers must equal the default backend's
within the kernels' tolerance, so everything but the forward pass is shared by construction: the same tokenizer
(the checkpoint's), BOS rule, context cut (the last max_length + 1 tokens), rolling windows and stop rule. lm-eval's
`vllm` model tokenizes with the export's Hugging Face tokenizer under its own BOS and truncation rules. vLLM only
replaces the model: a loglikelihood is the sum of the engine's prompt log-probabilities of the continuation
(log_softmax of the raw logits, in the engine's dtype), "greedy" is rank 1 at every continuation token; greedy
generation is the engine's temperature-0 decoding, cut where the default backend's loop would have stopped.
Every request of a call goes to the engine at once (vLLM batches and schedules them).

HARPE exports run through megatron_ext's vLLM plugin (registered by vLLM's entry point in every process it
starts); a checkpoint is exported first, once, where `megatron-ext serve` puts it (<checkpoint root>/hf_exports/
iter_XXXXXXX). Imports vllm: runs in the serving environment (`make serve-env`).
"""

import json
import logging
import os
from pathlib import Path

import torch

from megatron_ext.eval.harness.lm import EvalModelLM
from megatron_ext.eval.models import EvalModel
from megatron_ext.eval.settings import EvalSettingsError

log = logging.getLogger("megatron_ext")

CPU_KV_CACHE_BYTES = 1 << 30  # vLLM's CPU default reserves most of the host's memory for the KV cache
GPU_SHARE_OF_FREE_MEMORY = 0.85  # of what is free when the engine starts (the evaluated model may hold some)


def export_of(model: EvalModel) -> Path:
    """The Hugging Face directory vLLM loads: the model's own directory, else its checkpoint's export (made once,
    under <checkpoint root>/hf_exports/iter_XXXXXXX, the place `megatron-ext serve` uses)."""
    if not model.source:
        raise EvalSettingsError(f"lm_eval.backend vllm: {model.name} was not loaded from a directory; vLLM loads "
                                "an exported model directory or a checkpoint")
    source = Path(model.source)
    if (source / "config.json").is_file():
        return source
    out = source.parent / "hf_exports" / source.name
    if (out / "config.json").is_file():
        log.info(f"megatron_ext: lm-eval on vLLM reads {out} (exported from {source} before)")
        return out
    from megatron_ext.convert import mcore_to_hf

    log.info(f"megatron_ext: exporting {source} to {out} for vLLM")
    # with the tokenizer this evaluation reads (the checkpoint's record, or --tokenizer): the engine itself gets
    # token ids only, but the export is left for `serve` and other tools, which need one
    return mcore_to_hf(source, out, tokenizer=getattr(model.tokenizer, "path", None))


def model_dtype(model: EvalModel) -> str:
    """The dtype the default backend computes in (the loaded weights'), so both backends score alike."""
    modules = getattr(model, "model", None)
    modules = modules if isinstance(modules, (list, tuple)) else [modules]
    for module in modules:
        for parameter in getattr(module, "parameters", lambda: [])():
            return str(parameter.dtype).removeprefix("torch.")
    return "auto"


class VllmLM(EvalModelLM):
    """EvalModelLM with its forward passes done by a vLLM engine over the model's export (module docstring)."""

    def __init__(self, model: EvalModel, *, max_length: int | None = None, batch_size: int = 1,
                 max_gen_tokens: int = 256, tensor_parallel_size: int = 1):
        super().__init__(model, max_length=max_length, batch_size=batch_size, max_gen_tokens=max_gen_tokens)
        self.engine = start_engine(export_of(model), max_model_len=self.max_length + 2, dtype=model_dtype(model),
                                   tensor_parallel_size=tensor_parallel_size)

    def close(self) -> None:
        """Stop the engine and drop it now, as vLLM's own examples end: its client threads then finish while the
        interpreter is whole, not during its teardown (where one aborted a CI run at exit, code -6)."""
        import gc

        self.engine.llm_engine.engine_core.shutdown()
        del self.engine
        gc.collect()

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: (strings, context ids, continuation ids); (log p(continuation | context), greedy?) each,
        from one batched engine call over every request."""
        from vllm import SamplingParams

        prompts = [(context + continuation)[-(self.max_length + 1):] for _, context, continuation in requests]
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1, detokenize=False)
        outputs = self.engine.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        scores = []
        for output, prompt, (_, _, continuation) in zip(outputs, prompts, requests):
            steps = output.prompt_logprobs[len(prompt) - len(continuation):]  # one dict per continuation token
            chosen = [step[token] for step, token in zip(steps, continuation)]
            scores.append((sum(entry.logprob for entry in chosen), all(entry.rank == 1 for entry in chosen)))
        return scores

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Every request's greedy continuation from one batched engine call, cut as the default backend stops."""
        from vllm import SamplingParams

        jobs = [self._generation_job(request.args[0], request.args[1], request.task_name) for request in requests]
        eos = [] if self.eot_token_id is None else [self.eot_token_id]
        params = [SamplingParams(max_tokens=max_new, temperature=0.0, stop_token_ids=eos, detokenize=False)
                  for _, max_new, _ in jobs]
        outputs = self.engine.generate([{"prompt_token_ids": prompt} for prompt, _, _ in jobs], params,
                                       use_tqdm=False)
        return [self._finish(list(output.outputs[0].token_ids), until)
                for output, (_, _, until) in zip(outputs, jobs)]

    def _finish(self, generated: list[int], until: list[str]) -> str:
        """The default backend's loop stops at the first token after which `stop` holds: cut there."""
        for end in range(1, len(generated) + 1):
            if self._stops(generated[:end], until):
                generated = generated[:end]
                break
        return self._decoded(generated, until)


def start_engine(export: Path, *, max_model_len: int, dtype: str, tensor_parallel_size: int):
    """vLLM's offline engine on `export`, with the settings a CPU or GPU host needs for scoring."""
    from vllm import LLM

    on_gpu = torch.cuda.is_available()
    config = json.loads((export / "config.json").read_text())
    trained = config.get("max_position_embeddings")
    if trained and max_model_len > trained:
        # max_length + 2 tokens (the scored token beyond the window and one generated token): past the export's
        # max_position_embeddings, which vLLM refuses unless told; the user chose max_length.
        os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
    memory = ({"gpu_memory_utilization": GPU_SHARE_OF_FREE_MEMORY * _free_gpu_share()} if on_gpu
              else {"kv_cache_memory_bytes": CPU_KV_CACHE_BYTES})
    try:
        return LLM(model=str(export), skip_tokenizer_init=True, dtype=dtype, max_model_len=max_model_len,
                   tensor_parallel_size=tensor_parallel_size, enforce_eager=not on_gpu,
                   enable_prefix_caching=False,  # prompt log-probabilities are computed for every prompt token
                   seed=0, **memory)
    except ValueError as error:  # vLLM's refusal of this model or these settings
        raise EvalSettingsError(f"lm_eval.backend vllm: vLLM cannot run {export}: {error}") from None


def _free_gpu_share() -> float:
    free, total = torch.cuda.mem_get_info()
    return free / total
