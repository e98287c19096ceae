"""megatron_ext checkpoint (any TP/PP it was saved with) -> Hugging Face safetensors directory, one layer at a time.

The output directory appears only once complete: weights, config.json, tokenizer files.
"""

import json
import logging
import stat
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from megatron_ext.convert.adapters import adapter_for_family, adapter_for_hf, exported_context
from megatron_ext.errors import ConversionError
from megatron_ext.convert.hf_io import (
    DTYPE_NAMES,
    SafetensorsWriter,
    parse_size,
    read_config,
    staged_directory,
)
from megatron_ext.convert.hf_tokenizer import export_tokenizer

log = logging.getLogger("megatron_ext")

DEFAULT_SPECIAL_TOKENS = {"bos_token_id": 1, "eos_token_id": 2}  # Llama's sentencepiece layout


def mcore_to_hf(checkpoint, out_dir, *, family: str | None = None, dtype: str | None = None,
                hf_base=None, rope_form: str | None = None, max_shard_size: str | int = "5GB",
                progress: bool = False, tokenizer=None) -> Path:
    """Write a megatron_ext checkpoint as a Hugging Face model directory; returns it.

    checkpoint: an iter_ directory, or a checkpoint root (its newest complete checkpoint).
    family: llama | mistral | qwen2; default: the architecture it was converted from, else
        qwen2 for a model with q/k/v biases and llama otherwise.
    dtype: fp32 | bf16 | fp16; default: the dtype(s) it was converted from, else the saved one.
    hf_base: a Hugging Face directory whose config.json (token ids, ...) and tokenizer files to
        start from, e.g. the model the training began with.
    rope_form: rope_parameters | rope_scaling | both; default: the source's form, else both.
    tokenizer: a tokenizer file or directory to export with it; default: --hf-base's, else the checkpoint's own
        copy (taken out through megatron_ext/convert/carried_tokenizer.py: only from inside the checkpoint).
    """
    with tempfile.TemporaryDirectory(prefix="megatron_ext-tokenizer-") as private:
        return _export(checkpoint, out_dir, family=family, dtype=dtype, hf_base=hf_base, rope_form=rope_form,
                       max_shard_size=max_shard_size, progress=progress, tokenizer=tokenizer, private=Path(private))


def _export(checkpoint, out_dir, *, family, dtype, hf_base, rope_form, max_shard_size, progress, tokenizer,
            private: Path) -> Path:
    from megatron_ext.checkpoint.state import read_checkpoint

    saved = read_checkpoint(Path(checkpoint).expanduser().absolute(), setting="--ckpt")
    path, state, config = saved.path, saved.state, saved.state.config
    converted_from = state.hf or {}
    source = read_config(Path(hf_base)) if hf_base else converted_from.get("config")
    adapter = (adapter_for_family(family) if family else
               adapter_for_hf(source, f"{hf_base or path}'s source config") if source else
               adapter_for_family("qwen2" if config.model.qkv_bias else "llama"))
    padded = state.padded_vocab_size
    tokenizer = _tokenizer_source(saved, hf_base, tokenizer, private)

    from megatron_ext.convert.mcore_io import ParameterReader, build_skeleton
    from megatron_ext.distributed import single_process_group

    started = time.perf_counter()
    with single_process_group():
        skeleton = build_skeleton(config, padded, torch.float32)  # for names and checkpoint keys only
        reader = ParameterReader(path, skeleton.sharded_state_dict(metadata=dict(saved.sharding_metadata)))
        vocab_size = config.model.vocab_size or state.tokenizer_vocab_size or padded
        plan = adapter.bind(config, vocab_size, padded)
        plan.check_covers(reader.chunks)
        out_dtype = (DTYPE_NAMES[dtype] if dtype else _dtype_named(converted_from.get("dtype"))
                     or reader.dtype("embedding.word_embeddings.weight"))
        hf_config = adapter.hf_config(config, vocab_size=vocab_size, dtype=out_dtype, source=source,
                                      rope_form=rope_form,
                                      special_tokens={} if source else _special_tokens(tokenizer))
        _log_context(config, source, path)
        if config.pose.enabled:
            hf_config["megatron_ext"] = {"pose": asdict(config.pose), "trained_seq_length": config.model.seq_length}
        groups = _layer_groups(list(plan.entries), config.model.num_layers)
        kept = None if dtype else converted_from.get("tensor_dtypes")
        layout = _output_layout(plan, groups, reader.shapes, out_dtype, kept)
        with staged_directory(out_dir) as staging:
            files = _write_weights(staging, plan, reader, groups, layout, parse_size(max_shard_size), progress)
            (staging / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
            if tokenizer is not None:
                export_tokenizer(tokenizer, staging)
    out = Path(out_dir).expanduser().absolute()
    log.info(f"megatron_ext: exported {path} ({adapter.family}, {len(files)} shard(s)) -> {out} "
             f"in {time.perf_counter() - started:.1f} s")
    return out


def _log_context(config, source: dict | None, path: Path) -> None:
    """Say where config.json's max_position_embeddings comes from, and what the source said if that differs."""
    context, where = exported_context(config)
    before = (source or {}).get("max_position_embeddings")
    note = f"; the source config.json said {before}" if before not in (None, context) else ""
    log.info(f"megatron_ext: max_position_embeddings {context}: {where} of {path}{note}")


def _output_layout(plan, groups, megatron_shapes, out_dtype, kept_dtypes: dict | None) -> list[tuple]:
    """(name, shape, dtype) of every Hugging Face tensor in writing order. A tensor the source
    kept in another dtype (e.g. fp32 norms in a bf16 model) goes back to it."""
    hf_shapes = plan.hf_shapes(megatron_shapes)
    kept = {name: _dtype_named(kind) for name, kind in (kept_dtypes or {}).items()}
    return [(hf_name, hf_shapes[hf_name], kept.get(hf_name) or out_dtype)
            for names in groups for name in names for hf_name in plan.entries[name][0]]


def _write_weights(directory: Path, plan, reader, groups, layout, max_shard_bytes: int, progress: bool) -> list[Path]:
    """Read one group (a layer) at a time, write its Hugging Face tensors straight into their shards."""
    from tqdm import tqdm

    writer = SafetensorsWriter(directory, layout, max_shard_bytes)
    dtypes = {name: kind for name, _, kind in layout}
    for names in tqdm(groups, desc="mcore -> hf", unit="layer", disable=not progress):
        loaded = reader.read(names)
        for name in names:
            for hf_name, tensor in plan.to_hf(name, loaded.pop(name)).items():
                writer.add(hf_name, tensor.to(dtypes[hf_name]))
    return writer.close()


def _dtype_named(name: str | None) -> torch.dtype | None:
    dtype = getattr(torch, name, None) if name else None
    return dtype if isinstance(dtype, torch.dtype) else None


def _layer_groups(names: list[str], num_layers: int) -> list[list[str]]:
    """Embedding first, then each layer's tensors, then the final norm and output layer (HF's order)."""
    layers = [[n for n in names if n.startswith(f"decoder.layers.{i}.")] for i in range(num_layers)]
    rest = [n for n in names if not n.startswith("decoder.layers.")]
    first = [n for n in rest if n.startswith("embedding.")]
    return [first, *layers, [n for n in rest if n not in first]]


def _tokenizer_source(saved, hf_base, tokenizer, private: Path) -> Path | None:
    """Where the model's tokenizer files are: --tokenizer, else --hf-base, else a private copy of the checkpoint's
    own (a converted or trained checkpoint carries one; megatron_ext.json's record is not trusted to stay inside)."""
    from megatron_ext.convert.carried_tokenizer import checkpoint_tokenizer

    if tokenizer:
        tokenizer = Path(tokenizer).expanduser()
        if not tokenizer.exists() or not (tokenizer.is_dir() or stat.S_ISREG(tokenizer.stat().st_mode)):
            raise ConversionError(f"--tokenizer {tokenizer} is not a file or directory: pass the tokenizer file "
                                  "(sentencepiece .model, tiktoken) or a Hugging Face tokenizer directory")
        return tokenizer
    if hf_base:
        return Path(hf_base)
    return checkpoint_tokenizer(saved, private)


def _special_tokens(tokenizer: Path | None) -> dict:
    """BOS/EOS ids for a config.json written from scratch: the tokenizer's, else Llama's."""
    from megatron_ext.data.tokenizer_files import open_encoder
    from megatron_ext.errors import UserError

    if tokenizer is None:
        return dict(DEFAULT_SPECIAL_TOKENS)
    try:
        encoder = open_encoder(tokenizer, setting="the checkpoint's tokenizer")
    except UserError as error:
        log.warning(f"megatron_ext: config.json gets Llama's BOS/EOS ids: {error}")
        return dict(DEFAULT_SPECIAL_TOKENS)
    return {"bos_token_id": encoder.bos if encoder.bos >= 0 else None, "eos_token_id": encoder.eos}
