"""Hugging Face model directory -> megatron_ext checkpoint, streamed tensor by tensor.

Every check (architecture, RoPE, tensor names, shapes, parallel sizes) runs before anything is
written; the output directory appears only once complete.
"""

import logging
import time
from pathlib import Path

import torch

from megatron_ext.convert.adapters import IGNORED_HF_TENSORS, adapter_for_hf
from megatron_ext.errors import ConversionError
from megatron_ext.convert.hf_io import (
    DTYPE_NAMES,
    SafetensorsCheckpoint,
    present_tokenizer_files,
    read_config,
    staged_directory,
)
from megatron_ext.convert.hf_directory import check_hf_directory
from megatron_ext.convert.hf_tokenizer import carried_tokenizer, has_tokenizer
from megatron_ext.rope.hf_forms import hf_rope_parameters
from megatron_ext.checkpoint.state import TOKENIZER_DIR, CheckpointState
from megatron_ext.config import TrainConfig

log = logging.getLogger("megatron_ext")


def hf_to_mcore(hf_dir, out_dir, *, tp: int = 1, pp: int = 1, dtype: str | None = None,
                progress: bool = False) -> Path:
    """Convert a Llama / Mistral / Qwen2 safetensors directory into a megatron_ext checkpoint.

    `out_dir` becomes a checkpoint root (out_dir/iter_0000000 + latest), loadable at any TP/PP and
    usable as `checkpoint.pretrained: out_dir/iter_0000000`. `tp`/`pp` are the layout you intend
    to train with: divisibility is checked now and the vocabulary padded for that TP, as training
    pads it. `dtype` ('fp32', 'bf16', 'fp16') defaults to the weights' own. Returns the iter_ dir.
    """
    from megatron_ext.checkpoint.layout import checkpoint_name
    from megatron_ext.checkpoint.store import save_checkpoint
    from megatron_ext.sizes import padded_vocab_size

    hf_dir = Path(hf_dir).expanduser().absolute()
    hf_config = read_config(hf_dir)
    adapter = adapter_for_hf(hf_config, str(hf_dir / "config.json"))
    config = adapter.train_config(hf_config)
    dropped = dropped_settings(adapter, hf_config, hf_dir)
    check_layout(config, tp, pp)
    config.parallel.tensor_model_parallel_size, config.parallel.pipeline_model_parallel_size = tp, pp
    check_hf_directory(hf_dir)  # no custom code, no pickles, nothing outside it, headers that fit their files
    source = SafetensorsCheckpoint(hf_dir)
    weights_dtype = DTYPE_NAMES[dtype] if dtype else source.lossless_dtype()
    padded = padded_vocab_size(config.model.vocab_size, tp)

    from megatron_ext.convert.mcore_io import PullingSaveStrategy, build_skeleton
    from megatron_ext.distributed import single_process_group

    started = time.perf_counter()
    with single_process_group():
        skeleton = build_skeleton(config, padded, weights_dtype)
        plan = adapter.bind(config, config.model.vocab_size, padded)
        shapes = {name: p.shape for name, p in skeleton.state_dict().items() if not name.endswith("_extra_state")}
        plan.check_covers(shapes)
        check_tensors(source, plan.hf_shapes(shapes), config)
        with staged_directory(out_dir) as staging:
            final = Path(out_dir).expanduser().absolute() / checkpoint_name(0)
            tokenizer_files = present_tokenizer_files(hf_dir)
            carried, fingerprint = carried_tokenizer(hf_dir, tokenizer_files)
            state = checkpoint_state(config, padded, hf_dir, hf_config, adapter.architecture, source,
                                     tokenizer_files, tp, pp, dropped, fingerprint)
            with _Puller(plan, source, weights_dtype, progress) as pull:
                save_checkpoint(staging, 0, model=[skeleton], state=state.to_json(),
                                sharded_strategy=PullingSaveStrategy(pull),
                                extra_files={f"{TOKENIZER_DIR}/{name}": data for name, data in carried.items()})
    log.info(f"megatron_ext: converted {hf_dir} ({adapter.family}, {source.nbytes() / 2**30:.2f} GiB) -> {final} "
             f"in {time.perf_counter() - started:.1f} s")
    return final


def dropped_settings(adapter, hf_config: dict, hf_dir: Path) -> dict:
    """The source's settings the converted model does not have, each logged: its sliding window."""
    window = adapter.sliding_window(hf_config)
    if window is None:
        return {}
    log.warning(f"megatron_ext: sliding_window ({window}) of {hf_dir} is dropped: the converted model attends to "
                f"the whole context (full causal attention), and mcore-to-hf exports sliding_window: null")
    return {"sliding_window": window}


def check_layout(config: TrainConfig, tp: int, pp: int) -> None:
    """The parallel sizes the checkpoint is meant for must split the model evenly."""
    m = config.model
    groups = m.num_query_groups or m.num_attention_heads
    if tp < 1 or pp < 1:
        raise ConversionError(f"--tp ({tp}) and --pp ({pp}) must be >= 1")
    if m.num_attention_heads % tp:
        raise ConversionError(f"--tp {tp} does not divide num_attention_heads ({m.num_attention_heads}): "
                              f"pick a TP size that divides the attention heads")
    if groups % tp:
        raise ConversionError(
            f"--tp {tp} does not divide num_key_value_heads ({groups}): megatron-core gives every TP rank "
            f"whole KV heads; pick a TP size that divides {groups}")
    if m.num_layers % pp:
        raise ConversionError(f"--pp {pp} does not divide num_hidden_layers ({m.num_layers}): "
                              f"pick a PP size that divides the layers")


def check_tensors(source: SafetensorsCheckpoint, expected: dict[str, tuple], config: TrainConfig) -> None:
    """Every tensor the model needs is there with its shape, and nothing else is (it would be lost)."""
    where = source.directory
    missing = [name for name in expected if name not in source.shapes]
    if missing:
        more = f" (and {len(missing) - 1} more, e.g. {missing[1]})" if len(missing) > 1 else ""
        raise ConversionError(f"{where}: tensor {missing[0]} is missing{more}; is the checkpoint complete and "
                              f"its config.json the right one?")
    for name, shape in expected.items():
        if source.shapes[name] != shape:
            raise ConversionError(f"{where}: tensor {name} has shape {list(source.shapes[name])}, but "
                                  f"config.json implies {list(shape)}")
    unexpected = [name for name in source.shapes if name not in expected and not _ignorable(name, config)]
    if unexpected:
        raise ConversionError(f"{where}: tensor(s) {unexpected[:4]} have no place in megatron_ext's model "
                              f"(they would be dropped): is config.json the right one for these weights?")


def _ignorable(name: str, config: TrainConfig) -> bool:
    return name.endswith(IGNORED_HF_TENSORS) or (name == "lm_head.weight" and config.model.tie_embeddings)


def checkpoint_state(config: TrainConfig, padded: int, hf_dir: Path, hf_config: dict, architecture: str,
                     source: SafetensorsCheckpoint, tokenizer_files: list[str], tp: int,
                     pp: int, dropped: dict, tokenizer_fingerprint: str | None = None) -> CheckpointState:
    """The checkpoint's state, as a training checkpoint's at iteration 0, plus the source model
    (its config.json as it was, and the settings of it the model does not have: `dropped`)."""
    main = source.main_dtype()
    # the copied directory, relative to the checkpoint (it stays valid when the checkpoint is moved), whatever kind
    # it holds: every command opens it with megatron_ext.data.tokenizer_files (the resolution preprocess uses)
    tokenizer = TOKENIZER_DIR if has_tokenizer(tokenizer_files) else None
    config.data.tokenizer = None  # the state records it; a path here would name this place only
    return CheckpointState.of_run(
        config, iteration=0, padded_vocab_size=padded, tokenizer_model=tokenizer,
        tokenizer_vocab_size=config.model.vocab_size, tokenizer_fingerprint=tokenizer_fingerprint,
        parallel=dict(tp=tp, pp=pp, cp=1, dp=1),  # the layout it was prepared for (it loads at any)
        hf=dict(source=str(hf_dir), architecture=architecture, config=hf_config,
                dtype=_name(main), rope_form=hf_rope_parameters(hf_config)[1],
                tensor_dtypes={n: _name(d) for n, d in source.dtypes.items() if d != main},  # for the way back
                tokenizer_dir=TOKENIZER_DIR if tokenizer_files else None, tokenizer_files=tokenizer_files,
                dropped=dropped))


def _name(dtype) -> str | None:
    return str(dtype).removeprefix("torch.") if dtype is not None else None


class _Puller:
    """The source PullingSaveStrategy asks: full megatron tensors by name, made from the Hugging Face
    tensors on demand. Keeps the last one, as megatron writes a fused fc1 in two halves."""

    def __init__(self, plan, source: SafetensorsCheckpoint, dtype: torch.dtype, progress: bool):
        from tqdm import tqdm

        self.plan, self.source, self.dtype = plan, source, dtype
        self.last: tuple[str, torch.Tensor] | None = None
        self.bar = tqdm(total=len(plan.entries), desc="hf -> mcore", unit="tensor", disable=not progress)

    def __call__(self, name: str) -> torch.Tensor:
        if self.last is None or self.last[0] != name:
            self.last = None  # let the previous tensor go before reading the next
            self.last = (name, self.plan.to_megatron(name, self.source.read).to(self.dtype))
            self.bar.update(1)
        return self.last[1]

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.last = None
        self.bar.close()
