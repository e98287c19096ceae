"""Weight init that gives the same model whatever the TP / PP layout, and the name/shard maps it needs.

megatron's own init draws from one RNG stream per rank, so a PP=2 stage-2 layer gets other
numbers than the same layer at PP=1. Here every parameter is drawn from its own generator,
keyed by (seed, the parameter's global name), at its full (unsharded) shape, then cut to this
rank's shard the way megatron shards it. Same distributions as megatron: N(0, std) for
weights, N(0, std / sqrt(2 L)) for the two output projections of each layer, ones for norms.
"""

import zlib

import torch
from megatron.core import parallel_state as ps

OUTPUT_PROJECTIONS = ("linear_proj.weight", "linear_fc2.weight")


def global_param_name(name: str, model) -> str:
    """decoder.layers.{local}.x -> decoder.layers.{global}.x (pipeline stages number from 0)."""
    if not name.startswith("decoder.layers."):
        return name
    local = int(name.split(".")[2])
    global_index = model.decoder.layers[local].layer_number - 1
    return name.replace(f"decoder.layers.{local}.", f"decoder.layers.{global_index}.", 1)


def tp_shard(full: torch.Tensor, param, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's piece of a full tensor, cut as megatron cuts it (split by stride, every tp-th piece)."""
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return full
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    pieces = torch.split(full, full.shape[dim] // (tp_size * stride), dim=dim)
    return torch.cat(pieces[tp_rank::tp_size], dim=dim)


def full_shape(param, tp_size: int) -> list[int]:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp_size
    return shape


@torch.no_grad()
def layout_independent_init(model, seed: int) -> None:
    """Re-draw every parameter of an (unwrapped) LongContextGPTModel from (seed, global name)."""
    config = model.config
    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    output_std = config.init_method_std / (2.0 * config.num_layers) ** 0.5
    for name, param in model.named_parameters():
        key = global_param_name(name, model)
        if param.dim() == 1:  # norm weights (no biases: Llama-style layers have none)
            param.fill_(1.0 if key.endswith("weight") else 0.0)
            continue
        std = output_std if key.endswith(OUTPUT_PROJECTIONS) else config.init_method_std
        generator = torch.Generator(device=param.device).manual_seed(zlib.crc32(f"{seed}:{key}".encode()))
        full = torch.empty(full_shape(param, tp_size), dtype=torch.float32, device=param.device)
        full.normal_(0.0, std, generator=generator)
        param.copy_(tp_shard(full, param, tp_rank, tp_size))
