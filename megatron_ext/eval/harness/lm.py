"""`EvalModelLM`: lm-eval's `LM` over an `EvalModel`, so the harness scores our checkpoints with their own RoPE.

Every score comes from `EvalModel.logits`: megatron_ext checkpoints at any saved layout (HARPE bases per KV
group; PoSE-trained models read with plain 0 .. s-1 ids at their target length), Hugging Face directories
(HARPE exports through megatron_ext.hf). Tokens as lm-eval's own `hf` model makes them: the tokenizer's BOS
first (when it has one), a continuation's ids taken from the encoding of context + continuation; except that a
rolling (perplexity) text starts from one BOS, where lm-eval's `hf` model puts a second after its prefix token.
"""

import logging

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import Collator, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from megatron_ext.eval.distributed import data_parallel_of
from megatron_ext.eval.harness.decoding import greedy_tokens
from megatron_ext.eval.models import EvalModel
from megatron_ext.eval.results import is_reporting_rank
from megatron_ext.eval.settings import EvalSettingsError

log = logging.getLogger("megatron_ext")

DEFAULT_MAX_LENGTH = 2048  # lm-eval's, for a model that records no trained window


class EvalModelLM(TemplateLM):
    """loglikelihood (batched, right-padded), loglikelihood_rolling (lm-eval's disjoint windows) and greedy
    generate_until (KV cache, see decoding.py) on one EvalModel. The ranks of a TP/PP/CP model compute together;
    data-parallel replicas are lm-eval's ranks: each scores its share of every task's documents."""

    def __init__(self, model: EvalModel, *, max_length: int | None = None, batch_size: int = 1,
                 max_gen_tokens: int = 256):
        super().__init__()
        self.model = model
        self.max_length = max_length or model.context_window or DEFAULT_MAX_LENGTH
        if model.context_window and self.max_length > model.context_window:
            log.warning(f"megatron_ext: lm-eval max_length {self.max_length} exceeds the trained window "
                        f"{model.context_window} of {model.name}: scores there show extrapolation")
        self.batch_size = batch_size
        self.max_gen_toks = max_gen_tokens

    @property
    def eot_token_id(self) -> int:
        return self.model.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context and each rolling window start from (lm-eval's hf model: BOS, else EOS)."""
        bos = self.model.tokenizer.bos_id
        return bos if bos is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        ids = self.model.tokenizer.encode(string)
        bos = self.model.tokenizer.bos_id
        return ids if add_special_tokens is False or bos is None else [bos, *ids]

    def tok_decode(self, ids: list[int]) -> str:
        return self.model.tokenizer.decode(ids)

    # --- data parallelism: lm-eval splits each task's documents over the model's replicas ----------

    @property
    def rank(self) -> int:
        return data_parallel_of(self.model).rank

    @property
    def world_size(self) -> int:
        return data_parallel_of(self.model).size

    @property
    def device(self) -> torch.device:
        return getattr(self.model, "device", torch.device("cpu"))

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """The replicas' tensors stacked in replica order (lm-eval gathers request counts with it)."""
        dp = data_parallel_of(self.model)
        parts = [torch.empty_like(tensor) for _ in range(dp.size)]
        torch.distributed.all_gather(parts, tensor.contiguous(), group=dp.group)
        return torch.stack(parts)

    def gather_object(self, obj, dst: int = 0):
        """The replicas' objects, a list on replica `dst`, None on the others."""
        dp = data_parallel_of(self.model)
        gathered = [None] * dp.size if dp.rank == dst else None
        torch.distributed.gather_object(obj, gathered, dst=torch.distributed.get_global_rank(dp.group, dst),
                                        group=dp.group)
        return gathered

    def barrier(self) -> None:
        torch.distributed.barrier(group=data_parallel_of(self.model).group)

    def from_first_replica(self, obj):
        """`obj` of replica 0 on every replica (lm-eval returns its results on replica 0 only)."""
        dp = data_parallel_of(self.model)
        if dp.size == 1:
            return obj
        shared = [obj]
        torch.distributed.broadcast_object_list(shared, src=torch.distributed.get_global_rank(dp.group, 0),
                                                group=dp.group)
        return shared[0]

    # --- loglikelihood ------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) strings, context ids, continuation ids), longest first in batches
        of batch_size; returns (log p(continuation | context), whether greedy decoding gives it)."""
        order = Collator(requests, sort_fn=lambda r: (-len(r[1]) - len(r[2]), tuple(r[1] + r[2])))
        scores = []
        with _progress(disable_tqdm, total=len(requests), desc="loglikelihood") as bar:
            for batch in order.get_batched(n=self.batch_size):
                scores += self._score_batch([(context, continuation) for _, context, continuation in batch])
                bar.update(len(batch))
        return order.get_original(scores)

    def _score_batch(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """One forward pass over context + continuation (the last max_length + 1 tokens, the last one only
        predicted); right padding stays out of every scored row under causal attention."""
        windows = [(context + continuation)[-(self.max_length + 1):][:-1] for context, continuation in pairs]
        width = max(len(window) for window in windows)
        first = min(len(window) - len(continuation) for window, (_, continuation) in zip(windows, pairs))
        tokens = torch.tensor([window + [0] * (width - len(window)) for window in windows])  # [b, width]
        logprobs = self.model.logits(tokens, rows=torch.arange(first, width)).float().log_softmax(-1).cpu()
        scores = []
        for row, (window, (_, continuation)) in zip(logprobs, zip(windows, pairs)):
            end = len(window) - first
            predicted = row[end - len(continuation):end]  # [len(continuation), V]
            target = torch.tensor(continuation)
            scores.append((float(predicted.gather(-1, target[:, None]).sum()),
                           bool((predicted.argmax(-1) == target).all())))
        return scores

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(text) for perplexity tasks: the text (after the prefix token) in windows of max_length, each
        token predicted once with as much context as fits."""
        totals = []
        for request in _progress(disable_tqdm, iterable=requests, desc="loglikelihood_rolling"):
            (text,) = request.args
            windows = get_rolling_token_windows(token_list=self.tok_encode(text, add_special_tokens=False),
                                                prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                                                context_len=1)
            scored = self._loglikelihood_tokens([(None, *make_disjoint_window(w)) for w in windows],
                                                disable_tqdm=True)
            totals.append(sum(score for score, _ in scored))
        return totals

    # --- generation -------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        return [self._generate(request.args[0], request.args[1], request.task_name)
                for request in _progress(disable_tqdm, iterable=requests, desc="generate_until")]

    def _generate(self, context: str, gen_kwargs: dict, task: str | None) -> str:
        """Greedy continuation of `context`, cut before the first stop string; stops at EOS or max_gen_toks."""
        prompt, max_new_tokens, until = self._generation_job(context, gen_kwargs, task)
        generated = greedy_tokens(self.model, prompt, max_new_tokens, lambda tokens: self._stops(tokens, until))
        return self._decoded(generated, until)

    def _generation_job(self, context: str, gen_kwargs: dict, task: str | None) -> tuple[list[int], int, list[str]]:
        """(prompt ids, most new tokens, stop strings) of a greedy request; sampling requests are refused."""
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        if kwargs["do_sample"]:
            raise EvalSettingsError(f"lm_eval: task {task} samples (do_sample / temperature > 0): megatron-ext "
                                    "decodes greedily only; choose a greedy task or set its generation_kwargs")
        until, max_new_tokens = kwargs["until"], kwargs["max_gen_toks"]
        room = self.max_length - max_new_tokens
        if room < 1:
            raise EvalSettingsError(f"lm_eval: task {task} generates up to {max_new_tokens} tokens, max_length is "
                                    f"{self.max_length}: raise --max-length")
        prompt = self.tok_encode(context)[-room:] or [self.prefix_token_id]  # an empty context without BOS
        return prompt, max_new_tokens, until

    def _stops(self, generated: list[int], until: list[str]) -> bool:
        """Generation ends after this token: EOS, or a stop string in the text so far."""
        text = self.tok_decode(generated)
        return generated[-1] == self.eot_token_id or any(s and s in text for s in until)

    def _decoded(self, generated: list[int], until: list[str]) -> str:
        """The response: the text without a final EOS, cut before the first stop string."""
        if generated and generated[-1] == self.eot_token_id:
            generated = generated[:-1]
        return postprocess_generated_text(self.tok_decode(generated), until, None)


def _progress(disabled: bool, **kwargs) -> tqdm:
    """lm-eval's progress bar, on the reporting rank only."""
    return tqdm(disable=disabled or not is_reporting_rank(), **kwargs)
