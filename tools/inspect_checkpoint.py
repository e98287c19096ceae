"""Print what a checkpoint holds: layout, parallel sizes, RoPE / HARPE settings, parameter count.

    python tools/inspect_checkpoint.py runs/checkpoints            # newest complete checkpoint
    python tools/inspect_checkpoint.py runs/checkpoints/iter_0000100 --tensors
    python tools/inspect_checkpoint.py path/to/hf-model            # a Hugging Face directory

Reads metadata only (megatron_ext.json, torch.distributed.checkpoint's .metadata, safetensors
headers; `.metadata` with an allow-list unpickler): no weights are loaded and megatron is not imported.
"""

import argparse
import json
import math
import sys
from pathlib import Path

from megatron_ext.checkpoint.state import read_checkpoint
from megatron_ext.rope.hf_forms import hf_rope_parameters, needs_megatron_ext, rope_from_hf
from megatron_ext.errors import UserError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="a megatron_ext checkpoint (iter_ dir or root) or a Hugging Face model directory")
    parser.add_argument("--tensors", action="store_true", help="also list every tensor with its shape and dtype")
    args = parser.parse_args(argv)
    path = Path(args.path)
    try:
        if (path / "config.json").is_file():
            inspect_hf(path, args.tensors)
        else:
            inspect_megatron(path, args.tensors)
    except UserError as error:
        print(f"inspect_checkpoint: {error}", file=sys.stderr)
        return 2
    return 0


def inspect_megatron(argument: Path, list_tensors: bool) -> None:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from megatron_ext.checkpoint.safe_metadata import SafeFileSystemReader

    checkpoint = read_checkpoint(argument, setting="path")
    path, state = checkpoint.path, checkpoint.state
    config, saved = state.config, checkpoint.parallel_layout
    m = config.model
    groups = m.num_query_groups or m.num_attention_heads
    print(f"megatron_ext checkpoint {path}")
    print(f"  iteration {checkpoint.iteration}, saved {checkpoint.saved_at or '?'}, "
          f"format {checkpoint.format_version}")
    print(f"  saved by {saved.get('world_size')} rank(s): TP {saved.get('tensor')}, PP {saved.get('pipeline')}, "
          f"CP {saved.get('context')} (loads at any TP/PP: dist_checkpointing reshards)")
    p = config.parallel
    print(f"  config's layout: TP {p.tensor_model_parallel_size}, PP {p.pipeline_model_parallel_size}, "
          f"CP {p.context_parallel_size}, sequence parallel {p.sequence_parallel}")
    attention = "MHA" if groups == m.num_attention_heads else "MQA" if groups == 1 else "GQA"
    vocab = m.vocab_size or state.tokenizer_vocab_size
    print(f"  model: {m.num_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} heads, "
          f"{groups} KV groups ({attention}), ffn {m.ffn_size}, "
          f"vocab {vocab} (padded {state.padded_vocab_size}), "
          f"{m.normalization}, {'SwiGLU' if m.swiglu else 'GeLU'}, tied embeddings {m.tie_embeddings}, "
          f"q/k/v bias {m.qkv_bias}, seq_length {m.seq_length}")
    print(f"  RoPE: {config.rope.describe(groups)}")
    pose = config.pose
    print("  PoSE: " + (f"on, target_length {pose.target_length}, {pose.num_chunks} chunks ({pose.variant})"
                         if pose.enabled else "off"))
    print(f"  tokenizer: {state.tokenizer_model or 'not recorded'}")
    hf = state.hf
    if hf:
        print(f"  converted from: {hf['architecture']} at {hf['source']} "
              f"({hf['dtype']}, RoPE in {hf['rope_form']} form)")
        for setting, value in (hf.get("dropped") or {}).items():
            print(f"  dropped at conversion: {setting} {value} (the model attends to the whole context)")
    optimizer = checkpoint.optimizer
    print(f"  optimizer state: {'none (weights only)' if not optimizer else optimizer['flavor']}")

    metadata = SafeFileSystemReader(str(path)).read_metadata()  # allow-listed unpickling: runs no code
    tensors = {key: md for key, md in metadata.state_dict_metadata.items()
               if isinstance(md, TensorStorageMetadata) and not key.startswith("optimizer")}
    count = sum(math.prod(md.size) for md in tensors.values())
    padding = (state.padded_vocab_size - (vocab or 0)) * m.hidden_size * (1 if m.tie_embeddings else 2)
    dtypes = sorted({str(md.properties.dtype).removeprefix("torch.") for md in tensors.values()})
    size = sum(math.prod(md.size) * md.properties.dtype.itemsize for md in tensors.values())
    print(f"  parameters: {count:,} ({count - max(padding, 0):,} without vocabulary padding) in {len(tensors)} "
          f"checkpoint tensors, {'/'.join(dtypes)}, {size / 2**20:.1f} MiB")
    if list_tensors:
        for key, md in tensors.items():
            print(f"    {key:60s} {list(md.size)} {str(md.properties.dtype).removeprefix('torch.')}")


def inspect_hf(path: Path, list_tensors: bool) -> None:
    from megatron_ext.convert.hf_io import SafetensorsCheckpoint, present_tokenizer_files

    hf = json.loads((path / "config.json").read_text())
    heads = hf.get("num_attention_heads")
    groups = hf.get("num_key_value_heads") or heads
    print(f"Hugging Face model {path}")
    print(f"  {', '.join(hf.get('architectures') or ['?'])} ({hf.get('model_type')}): {hf.get('num_hidden_layers')} "
          f"layers, hidden {hf.get('hidden_size')}, {heads} heads, {groups} KV heads, "
          f"ffn {hf.get('intermediate_size')}, "
          f"vocab {hf.get('vocab_size')}, tied embeddings {hf.get('tie_word_embeddings', False)}, "
          f"max_position_embeddings {hf.get('max_position_embeddings')}")
    params, form = hf_rope_parameters(hf)
    try:
        rope = rope_from_hf(hf).describe(groups)
    except ValueError as error:
        rope = f"{params} (not readable by megatron_ext: {error})"
    loader = "megatron_ext.hf.load_harpe_model" if needs_megatron_ext(hf) else "stock transformers"
    print(f"  RoPE ({form} form): {rope}; runs with {loader}")
    checkpoint = SafetensorsCheckpoint(path)
    count = sum(math.prod(shape) for shape in checkpoint.shapes.values())
    dtypes = sorted({str(d).removeprefix("torch.") for d in checkpoint.dtypes.values()})
    print(f"  weights: {len(checkpoint.files)} safetensors file(s), {len(checkpoint.shapes)} tensors, {count:,} "
          f"parameters, {'/'.join(dtypes)}, {checkpoint.nbytes() / 2**20:.1f} MiB")
    print(f"  tokenizer files: {', '.join(present_tokenizer_files(path)) or 'none'}")
    if list_tensors:
        for name, shape in checkpoint.shapes.items():
            print(f"    {name:60s} {list(shape)} {str(checkpoint.dtypes[name]).removeprefix('torch.')}")


if __name__ == "__main__":
    sys.exit(main())
