"""The model interface every evaluation runs on, for megatron_ext checkpoints and Hugging Face causal LMs.

`EvalModel.logits` returns next-token logits over the model's real vocabulary (never megatron's padding
rows) at chosen positions; `attention_probs` the attention distributions of chosen query positions, from the
rotated q and k. megatron and transformers are imported only when a model of their kind is loaded.
"""

from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Protocol

import torch

from megatron_ext.context_parallel import gather_sequence
from megatron_ext.errors import InputError, MissingFile
from megatron_ext.eval.distributed import ALONE, DataParallel, tokens_on_this_cp_rank
from megatron_ext.eval.tokenizers import EvalTokenizer, hf_directory_tokenizer, load_eval_tokenizer

# where the parallel sizes of an evaluation come from, for a layout refusal
PARALLEL_SIZE_SETTINGS = ("--tensor/--pipeline/--context-parallel-size (suite: tensor_parallel_size, "
                          "pipeline_parallel_size, context_parallel_size)")


class EvalModel(Protocol):
    name: str
    tokenizer: EvalTokenizer
    context_window: int | None  # the length it was trained for (PoSE: the target length), for tables
    source: str | None  # where it was loaded from (a checkpoint's iter_ directory, a model directory)
    vocab_size: int  # V, the columns of `logits`: the real vocabulary, without the rows megatron pads it with
    # optional: the data-parallel replicas that split the trials (megatron_ext.eval.distributed.DataParallel);
    # a model without it computes every trial on every rank
    data_parallel: DataParallel

    def logits(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None,
               rows: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [b, s] -> logits [b, s, V], or [b, len(rows), V] at the positions `rows` only, in token order
        (under context parallelism too). position_ids default to 0 .. s-1 (also for PoSE-trained models)."""

    def attention_probs(self, tokens: torch.Tensor, rows: torch.Tensor) -> list[torch.Tensor]:
        """Per layer, the causal attention distribution of the query positions `rows`: [b, heads, r, s] (CPU, fp32)."""


def load_eval_model(path, *, name: str | None = None, precision: str | None = None, tensor_parallel_size: int = 1,
                    pipeline_parallel_size: int = 1, context_parallel_size: int = 1, tokenizer_model=None,
                    setting: str = "--model") -> EvalModel:
    """A Hugging Face model directory (config.json) or a megatron_ext checkpoint (a run directory, a
    checkpoint root or one iter_ directory); errors name `setting`, where the path came from.

    precision: "bf16" | "fp32" | None (bf16 on GPU, fp32 on CPU). TP/PP/CP and tokenizer_model apply to
    megatron checkpoints only (a Hugging Face directory carries its tokenizer); the ranks left over
    (world / (TP x PP x CP)) are data-parallel replicas that split the trials.
    """
    sizes = dict(tensor=tensor_parallel_size, pipeline=pipeline_parallel_size, context=context_parallel_size)
    check_parallel_sizes(sizes)
    source = resolve_eval_model(path, setting=setting)  # the one resolution; what it found is passed along
    check_parallel_sizes(sizes, source, setting)
    if isinstance(source, Path):
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, None: None}[precision]
        return HFCausalLM(source, dtype=dtype, name=name)
    return MegatronExtModel.from_checkpoint(source, tensor_parallel_size=tensor_parallel_size, precision=precision,
                                            pipeline_parallel_size=pipeline_parallel_size,
                                            context_parallel_size=context_parallel_size, name=name,
                                            tokenizer_model=tokenizer_model, setting=setting)


def check_parallel_sizes(sizes: dict, source=None, setting: str = "--model") -> None:
    """TP/PP/CP sizes ({'tensor': .., 'pipeline': .., 'context': ..}) are >= 1, and 1 for a Hugging Face directory
    (`source` as `resolve_eval_model` gives it; None: the sizes alone)."""
    if min(sizes.values()) < 1:
        raise InputError(f"parallel sizes {sizes} must all be >= 1: set {PARALLEL_SIZE_SETTINGS}")
    if isinstance(source, Path) and max(sizes.values()) > 1:
        raise InputError(f"{setting} {source} is a Hugging Face directory: it runs on one device; "
                         "set tensor/pipeline/context parallel sizes to 1")


def resolve_eval_model(path, *, setting: str = "--model"):
    """What a model argument names, resolved once: a Hugging Face model directory (config.json; its Path) or the
    SavedCheckpoint of a megatron_ext checkpoint (run dir, root, `latest`, iter_ dir). An already resolved one
    (what this returned) comes back as it is, so callers can resolve once and pass it to `load_eval_model` and
    `eval_tokenizer`."""
    from megatron_ext.checkpoint.state import SavedCheckpoint

    if isinstance(path, SavedCheckpoint):
        return path
    path = Path(path)
    if not path.exists():
        raise MissingFile(f"{setting} {path} does not exist: pass a megatron_ext checkpoint or a Hugging Face "
                          "model directory")
    if (path / "config.json").is_file():
        return path
    return _read_checkpoint_argument(path, setting)


def eval_tokenizer(source, *, tokenizer_model=None, setting: str = "--model") -> EvalTokenizer:
    """The tokenizer `load_eval_model(source, tokenizer_model=...)` gives its model, read without the weights: what
    checks that count tokens (the prompts of a length) use before any model loads."""
    source = resolve_eval_model(source, setting=setting)
    if isinstance(source, Path):
        from megatron_ext.convert.hf_directory import check_hf_directory

        check_hf_directory(source)  # as HFCausalLM does: a hostile directory is refused before anything is read
        return hf_directory_tokenizer(source)
    return checkpoint_tokenizer(source, tokenizer_model)


def checkpoint_tokenizer(saved, tokenizer_model=None) -> EvalTokenizer:
    """A checkpoint's tokenizer: `tokenizer_model` (--tokenizer) if given, else the checkpoint's own copy."""
    tokenizer_path = tokenizer_model or saved.tokenizer_path  # its own copy, wherever the checkpoint lies
    if not tokenizer_model and not (tokenizer_path and Path(tokenizer_path).exists()):
        raise MissingFile(f"the checkpoint's tokenizer {tokenizer_path} is gone: pass its new path "
                          "(--tokenizer / tokenizer_model)")
    return load_eval_tokenizer(tokenizer_path, setting="--tokenizer" if tokenizer_model else
                               f"the tokenizer of {saved.path}")


def _read_checkpoint_argument(path: Path, setting: str):
    """The SavedCheckpoint `path` names (run dir, root, `latest`, iter_ dir); a path holding no checkpoint at all
    is told it may be a Hugging Face directory too."""
    from megatron_ext.checkpoint.layout import CheckpointError
    from megatron_ext.checkpoint.state import read_checkpoint

    try:
        return read_checkpoint(path, setting=setting)
    except CheckpointError:
        if any(where.is_dir() and (where.name.startswith("iter_") or any(where.glob("iter_*")))
               for where in (path, path / "checkpoints", path.parent if path.name == "latest" else path)):
            raise  # a checkpoint, but not a usable one: the resolver's own reason
        raise MissingFile(f"{setting} {path} is neither a megatron_ext checkpoint (an iter_ directory, a root holding "
                          "them, or a run directory with checkpoints/) nor a Hugging Face model directory "
                          "(config.json): pass one of those") from None


def causal_row_softmax(query_rows: torch.Tensor, key: torch.Tensor, rows: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) of the query positions `rows` over keys 0 .. row, in fp32.

    query_rows [b, h, r, d], key [b, g, s, d] with g dividing h (query head i reads KV group i // (h/g),
    megatron's and Hugging Face's GQA layout) -> [b, h, r, s].
    """
    batch, heads, num_rows, dim = query_rows.shape
    groups, length = key.size(1), key.size(2)
    query = query_rows.float().reshape(batch, groups, heads // groups, num_rows, dim)
    scores = torch.matmul(query, key.float()[:, :, None].transpose(-1, -2)) * scale  # [b, g, h/g, r, s]
    scores = scores.reshape(batch, heads, num_rows, length)
    future = torch.arange(length, device=key.device)[None, :] > rows.to(key.device)[:, None]  # [r, s]
    return scores.masked_fill(future, float("-inf")).softmax(-1)


def check_rows(rows: torch.Tensor | None, length: int) -> None:
    """Refuse rows outside 0 .. length-1: a negative row would index from the end (another position's logits
    under Hugging Face, an IndexError in megatron's output-layer hook) instead of failing at the caller."""
    if rows is not None and len(rows) and not (0 <= int(rows.min()) and int(rows.max()) < length):
        raise ValueError(f"logits rows {int(rows.min())} .. {int(rows.max())} are outside the {length} positions "
                         "of the tokens: ask for rows 0 .. length-1 (row i predicts token i + 1)")


# --- megatron_ext checkpoints ---------------------------------------------------------------


class MegatronExtModel:
    """A LongContextGPTModel (this rank's pipeline stage) with its tokenizer, behind EvalModel.

    `from_checkpoint` loads any saved TP/PP layout into this process's TP/PP/CP layout. Built around a model in
    memory, it evaluates during training too. Data-parallel replicas split the trials (`data_parallel`), the
    ranks of one replica compute them together; every rank ends with the same numbers, rank 0 writes them.
    The model's output layer has megatron's padded vocabulary (a multiple of 128 x TP rows); `vocab_size`
    is the real one (default: the tokenizer's), and logits keep only those columns, so a softmax or argmax
    never sees a padding row, and scores equal those of the Hugging Face export (which drops the padding).
    """

    def __init__(self, model, tokenizer: EvalTokenizer, *, name: str = "model", context_window: int | None = None,
                 source: str | None = None, vocab_size: int | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.context_window = context_window
        self.source = source
        self.vocab_size = min(vocab_size or tokenizer.vocab_size, model.vocab_size)
        self.device = next(model.parameters()).device

    @classmethod
    def from_checkpoint(cls, checkpoint, *, tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                        context_parallel_size: int = 1, precision: str | None = None, tokenizer_model=None,
                        name: str | None = None, setting: str = "--model"):
        """Load a run directory, checkpoint root (its newest checkpoint) or iter_ directory at the given TP/PP/CP;
        `checkpoint` may be the SavedCheckpoint one of those resolved to (`load_eval_model` passes it: not resolved
        or read again).

        Without a process group this starts a one-process one (gloo on CPU, NCCL on GPU); under torchrun or srun,
        pass the TP/PP/CP to evaluate with. Precision: the checkpoint's rule (bf16 on GPU, fp32 on CPU) unless given.
        """
        from megatron_ext.checkpoint.state import SavedCheckpoint, read_checkpoint
        from megatron_ext.config import ParallelConfig
        from megatron_ext.models.builder import load_model

        saved = checkpoint if isinstance(checkpoint, SavedCheckpoint) else read_checkpoint(checkpoint, setting=setting)
        tokenizer = checkpoint_tokenizer(saved, tokenizer_model)  # before the weights: a missing one costs no load
        device = _join_parallel_state(ParallelConfig(tensor_model_parallel_size=tensor_parallel_size,
                                                     pipeline_model_parallel_size=pipeline_parallel_size,
                                                     context_parallel_size=context_parallel_size),
                                      seed=saved.state.config.training.seed)
        model, _, state = load_model(saved, device, precision_override=precision, setting=setting)
        # the vocabulary it was trained with, as training sized it and `convert mcore-to-hf` exports it
        vocab_size = state.config.model.vocab_size or state.tokenizer_vocab_size or tokenizer.vocab_size
        path = saved.path
        return cls(model, tokenizer, context_window=state.context_window, source=str(path), vocab_size=vocab_size,
                   name=name or f"{path.parent.name}/{path.name}")

    @property
    def data_parallel(self) -> DataParallel:
        from megatron.core import parallel_state as ps

        if not ps.model_parallel_is_initialized() or ps.get_data_parallel_world_size() == 1:
            return ALONE
        return DataParallel(ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(),
                            ps.get_data_parallel_group())

    @torch.no_grad()
    def logits(self, tokens, position_ids=None, rows=None):
        from megatron.core import parallel_state as ps

        tokens = tokens.to(self.device)
        if position_ids is None:
            position_ids = torch.arange(tokens.size(1), device=self.device).expand_as(tokens)
        position_ids = position_ids.to(self.device)
        check_rows(rows, tokens.size(1))
        cp_group = _context_parallel_group()
        if cp_group is not None:  # each rank runs its zig-zag share; the last stage gathers the rows asked for
            rows = torch.arange(tokens.size(1)) if rows is None else rows
            tokens, position_ids = tokens_on_this_cp_rank(tokens, position_ids, cp_group)
        hook = None
        if rows is not None and self.model.post_process:  # project only the rows asked for onto the vocabulary
            hook = self.model.output_layer.register_forward_pre_hook(
                partial(_keep_rows, rows.to(self.device), cp_group))
        try:
            if ps.get_pipeline_model_parallel_world_size() == 1:
                logits = self.model(tokens, position_ids, None)
            else:
                logits = self._pipeline_forward(tokens, position_ids, tokens.size(1) if rows is None else len(rows))
        finally:
            if hook is not None:
                hook.remove()
        padded = _gather_tensor_parallel(logits, dim=-1)  # [b, r, padded V / tp] -> [b, r, padded V]
        return padded[..., :self.vocab_size]  # [b, r, V]: the padding rows are no tokens

    def _pipeline_forward(self, tokens, position_ids, num_rows):
        """Run the stages with megatron's schedule; the last stage's logits reach every rank of the pipeline.
        Under context parallelism `tokens` are this rank's share; the schedule takes the whole length."""
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(batches, model):
            batch = next(batches)
            return model(batch["tokens"], batch["position_ids"], None), None

        outputs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([dict(tokens=tokens, position_ids=position_ids)]),
            model=[self.model], num_microbatches=1, micro_batch_size=tokens.size(0),
            seq_length=tokens.size(1) * ps.get_context_parallel_world_size(),
            forward_only=True, collect_non_loss_data=True,
        )
        shape = (tokens.size(0), num_rows, self.model.vocab_size // ps.get_tensor_model_parallel_world_size())
        logits = outputs[0] if ps.is_pipeline_last_stage() else torch.empty(
            shape, dtype=self.model.config.params_dtype, device=self.device)
        torch.distributed.broadcast(logits, src=ps.get_pipeline_model_parallel_last_rank(),
                                    group=ps.get_pipeline_model_parallel_group())
        return logits

    @torch.no_grad()
    def attention_probs(self, tokens, rows):
        from megatron.core import parallel_state as ps

        if ps.get_pipeline_model_parallel_world_size() > 1:
            raise NotImplementedError("attention diagnostics hold every layer on one rank: load the checkpoint "
                                      "with pipeline_parallel_size 1 (any saved layout loads)")
        rows = rows.to(self.device)
        captured, handles = {}, []
        for index, layer in enumerate(self.model.decoder.layers):
            core = layer.self_attention.core_attention
            handles.append(core.register_forward_pre_hook(
                partial(self._capture, index, rows, tokens.size(1), captured), with_kwargs=True))
        try:
            self.logits(tokens, rows=rows[-1:])  # one projected row: the forward is what we need
        finally:
            for handle in handles:
                handle.remove()
        return [captured[i] for i in range(len(captured))]

    def _capture(self, index, rows, length, captured, module, args, kwargs):
        """Pre-hook on core attention: q [s, b, h, d] and k [s, b, g, d] arrive rotated (under context
        parallelism: this rank's share, gathered here into the `length` tokens of the prompt)."""
        query, key = args[0], args[1]
        cp_group = _context_parallel_group()
        if cp_group is not None:
            query, key = (gather_sequence(t, cp_group)[:length] for t in (query, key))
        scale = getattr(module, "softmax_scale", None) or self.model.config.softmax_scale or query.size(-1) ** -0.5
        probs = causal_row_softmax(query.index_select(0, rows).permute(1, 2, 0, 3), key.permute(1, 2, 0, 3),
                                   rows, scale)
        captured[index] = _gather_tensor_parallel(probs, dim=1).cpu()  # TP ranks hold contiguous blocks of heads


def _gather_tensor_parallel(tensor, dim: int):
    """Concatenate the TP ranks' blocks along `dim`, in rank order (heads; vocabulary rows of the logits).

    Used for the logits instead of megatron's runtime_gather_output, whose buffer is allocated on CUDA."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(tp)]
    torch.distributed.all_gather(parts, tensor.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=dim)


def _keep_rows(rows, cp_group, module, args):
    """Pre-hook on the output layer: hidden states [s, b, h] -> [len(rows), b, h], in token order; under context
    parallelism each rank first gathers the whole sequence from the ranks' zig-zag shares."""
    hidden = args[0] if cp_group is None else gather_sequence(args[0], cp_group)
    return (hidden.index_select(0, rows), *args[1:])


def _context_parallel_group():
    """megatron's context-parallel group when CP > 1, else None."""
    from megatron.core import parallel_state as ps

    return ps.get_context_parallel_group() if ps.get_context_parallel_world_size() > 1 else None


def _join_parallel_state(parallel, seed: int) -> torch.device:
    """The process group and megatron's groups as training makes them (megatron_ext.distributed), or the ones this
    process has (they must have these sizes); returns this rank's device."""
    from megatron_ext.distributed import join_parallel_state

    device = join_parallel_state(parallel, setting=PARALLEL_SIZE_SETTINGS)
    if torch.cuda.is_available():  # GPU init draws from megatron's CUDA RNG tracker; the weights are then loaded
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)
    return device


# --- Hugging Face causal LMs ----------------------------------------------------------------


class HFCausalLM:
    """A causal LM from a local Hugging Face directory (no downloads, no remote code), SDPA attention.

    Loaded by megatron_ext.hf's loader: stock `AutoModelForCausalLM`, except that exports whose RoPE
    transformers lacks (rope_type 'harpe': one base per KV group) rotate q and k per group. Its vocabulary
    is the config's `vocab_size` (exports from megatron_ext drop megatron's padding rows).
    """

    data_parallel = ALONE  # one device: in a multi-rank run every rank computes every trial

    def __init__(self, local_dir, *, device: str | None = None, dtype: torch.dtype | None = None,
                 name: str | None = None):
        from megatron_ext.convert.hf_directory import check_hf_directory, unreadable
        from megatron_ext.errors import UserError
        from megatron_ext.hf import load_harpe_model

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        check_hf_directory(local_dir)  # refused by name before anything is read: custom code, pickles, links out
        self.tokenizer = hf_directory_tokenizer(local_dir)  # the cheaper load first: its refusals come before work
        try:
            model = load_harpe_model(str(local_dir), local_files_only=True, dtype=dtype, attn_implementation="sdpa")
        except (UserError, MemoryError):
            raise
        except Exception as error:  # transformers' parsing of config.json and the weights it names
            raise unreadable(local_dir, "model", error) from None
        self.model = model.to(self.device).eval()
        self.name = name or Path(local_dir).name
        self.source = str(local_dir)
        self.context_window = getattr(self.model.config, "max_position_embeddings", None)
        self.vocab_size = self.model.config.vocab_size

    @torch.no_grad()
    def logits(self, tokens, position_ids=None, rows=None):
        tokens = tokens.to(self.device)
        if position_ids is None:
            position_ids = torch.arange(tokens.size(1), device=self.device).expand_as(tokens)
        check_rows(rows, tokens.size(1))
        keep = 0 if rows is None else rows.to(self.device)  # 0: every position
        return self.model(input_ids=tokens, position_ids=position_ids.to(self.device), use_cache=False,
                          logits_to_keep=keep).logits

    @torch.no_grad()
    def attention_probs(self, tokens, rows):
        rows = rows.to(self.device)
        with _capturing_sdpa(rows) as captured:
            self.logits(tokens, rows=rows[-1:])
        return [captured[i] for i in range(len(captured))]


@contextmanager
def _capturing_sdpa(rows):
    """Wrap transformers' "sdpa" attention function: q [b, h, s, d] and k [b, g, s, d] arrive rotated."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    original = ALL_ATTENTION_FUNCTIONS["sdpa"]
    captured = {}

    def capturing(module, query, key, value, attention_mask, *args, **kwargs):
        scale = kwargs.get("scaling") or query.size(-1) ** -0.5
        captured[module.layer_idx] = causal_row_softmax(query[:, :, rows], key, rows, scale).cpu()
        return original(module, query, key, value, attention_mask, *args, **kwargs)

    ALL_ATTENTION_FUNCTIONS["sdpa"] = capturing
    try:
        yield captured
    finally:
        ALL_ATTENTION_FUNCTIONS["sdpa"] = original
