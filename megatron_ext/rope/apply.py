"""Rotate queries or keys by RoPE angles built from position ids and per-head inverse frequencies.

Pure torch: must not import megatron. Megatron's non-interleaved "rotate-half" convention.

Shapes
    x            [s, b, h, d]   queries or keys, megatron's layout
    position_ids [b, s] or [1, s] (shared by the whole batch)
    inv_freq     [r/2]          one base for every head, or
                 [g, r/2]       one base per KV group; the h heads of x are g groups of h/g
                                consecutive heads (megatron's and HF's GQA order)
The first r = 2 * inv_freq.shape[-1] channels of each head are rotated; the rest
(rotary_percent < 1) pass through unchanged.

For pair j of head-group k at position m, with angle = m * inv_freq[k, j]:
    out[j]       = x[j] * cos - x[j + r/2] * sin
    out[j + r/2] = x[j + r/2] * cos + x[j] * sin
each of cos and sin multiplied by `mscale` (YaRN's attention factor).

Memory. No [s, b, h, d] table is built: the angle table is [c, b', g, 1, r/2] for a chunk
of c tokens, where b' = 1 when positions are shared and g = 1 when heads share a base.
apply_rotary_qk rotates q and k with one table. Peak extra memory in the forward is the
outputs (one copy of each input) plus, per chunk,
  angles, cos, sin in fp32 (+ cos, sin cast to x.dtype) : c * b' * g * r/2 * (12 + 2 * itemsize)
  two products in x.dtype, per rotated tensor           : 2 * c * b * h * r/2 * itemsize
with c chosen so that c * b * h * r/2 <= CHUNK_ELEMENTS (2**24): at most about 64 MiB of
fp32 angles, whatever the sequence length. Nothing of size s is kept for the backward: only
position_ids and inv_freq are saved, and the backward rotates the gradient by the negative
angle (the rotation's inverse is its transpose).
"""

import torch

CHUNK_ELEMENTS = 1 << 24  # per-chunk elements of one rotated half, summed over b and h


def apply_rotary(
    x: torch.Tensor,
    position_ids: torch.Tensor,
    inv_freq: torch.Tensor,
    *,
    mscale: float = 1.0,
) -> torch.Tensor:
    """Rotate x [s, b, h, d] by position_ids [b or 1, s] and inv_freq [r/2] or [g, r/2]."""
    _check_shapes(x, position_ids, inv_freq)
    return _RotaryFunction.apply(position_ids, inv_freq, float(mscale), x)[0]


def apply_rotary_qk(
    query: torch.Tensor,
    key: torch.Tensor,
    position_ids: torch.Tensor,
    inv_freq: torch.Tensor,
    *,
    mscale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rotary on query [s, b, h, d] and key [s, b, g, d] with one cos/sin table for both."""
    _check_shapes(query, position_ids, inv_freq)
    _check_shapes(key, position_ids, inv_freq)
    return _RotaryFunction.apply(position_ids, inv_freq, float(mscale), query, key)


class _RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, position_ids, inv_freq, mscale, *tensors):
        ctx.save_for_backward(position_ids, inv_freq)
        ctx.mscale = mscale
        return tuple(_rotate(tensors, position_ids, inv_freq, mscale, sign=1.0))

    @staticmethod
    def backward(ctx, *grads):
        position_ids, inv_freq = ctx.saved_tensors
        return (None, None, None, *_rotate(grads, position_ids, inv_freq, ctx.mscale, sign=-1.0))


def _rotate(tensors, position_ids, inv_freq, mscale, sign):
    """The rotation itself, chunked over the sequence; sign=-1 rotates backwards.

    Every tensor in `tensors` is [s, b, h_i, d] and shares one cos/sin table per chunk.
    """
    s = tensors[0].shape[0]
    half = inv_freq.shape[-1]
    groups = inv_freq.shape[0] if inv_freq.dim() == 2 else 1
    # Angles in fp32 (as megatron and HF do), or fp64 when x itself is fp64 (reference checks).
    angle_dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    inv_freq = inv_freq.to(angle_dtype).reshape(groups, 1, half)  # [g, 1, r/2]
    positions = position_ids.t()  # [s, b']

    grouped = [x.reshape(s, x.shape[1], groups, x.shape[2] // groups, x.shape[3]) for x in tensors]
    outs = [torch.empty_like(x) for x in grouped]  # [s, b, g, h/g, d]
    for x, out in zip(grouped, outs):
        out[..., 2 * half:] = x[..., 2 * half:]  # channels beyond the rotary dim pass through
    widest = max(x.shape[1] * x.shape[2] * x.shape[3] for x in grouped) * half
    chunk = max(1, CHUNK_ELEMENTS // widest)
    for start in range(0, s, chunk):
        tokens = slice(start, start + chunk)
        angles = positions[tokens, :, None, None, None].to(angle_dtype) * inv_freq  # [c, b', g, 1, r/2]
        cos, sin = torch.cos(angles) * mscale, torch.sin(angles) * (mscale * sign)
        for x, out in zip(grouped, outs):
            x1, x2 = x[tokens, ..., :half], x[tokens, ..., half:2 * half]
            c, sn = cos.to(x.dtype), sin.to(x.dtype)
            torch.sub(x1 * c, x2 * sn, out=out[tokens, ..., :half])
            torch.add(x2 * c, x1 * sn, out=out[tokens, ..., half:2 * half])
    return [out.view(x.shape) for x, out in zip(tensors, outs)]


def _check_shapes(x, position_ids, inv_freq):
    if x.dim() != 4:
        raise ValueError(f"apply_rotary: x must be [s, b, h, d], got shape {tuple(x.shape)}")
    s, b, h, d = x.shape
    if position_ids.dim() != 2 or position_ids.shape[1] != s or position_ids.shape[0] not in (1, b):
        raise ValueError(
            f"apply_rotary: position_ids must be [b, s] = [{b}, {s}] or [1, {s}], "
            f"got {tuple(position_ids.shape)}"
        )
    if inv_freq.dim() not in (1, 2):
        raise ValueError(f"apply_rotary: inv_freq must be [r/2] or [groups, r/2], got {tuple(inv_freq.shape)}")
    if 2 * inv_freq.shape[-1] > d:
        raise ValueError(
            f"apply_rotary: inv_freq rotates {2 * inv_freq.shape[-1]} channels but heads have {d}"
        )
    if inv_freq.dim() == 2 and h % inv_freq.shape[0] != 0:
        raise ValueError(
            f"apply_rotary: {h} heads cannot be split into {inv_freq.shape[0]} base groups; "
            "give one base per KV group with num_heads divisible by num_query_groups"
        )
