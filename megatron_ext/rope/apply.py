"""Rotate queries or keys by RoPE angles built from position ids and per-head inverse frequencies.

Pure torch (Triton on CUDA): must not import megatron. Megatron's non-interleaved "rotate-half" convention.

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
  angles (overwritten by sin) and cos in fp32, both cast to x.dtype : c * b' * g * r/2 * (8 + 2 * itemsize)
and nothing per rotated element: each output half is one multiply into the output and one
in-place multiply-add. c is chosen so that c * b * h * r/2 <= CHUNK_ELEMENTS (2**24; 2**18 on
CPU, where a chunk that stays in cache is faster): at most about 64 MiB of fp32 angles, whatever
the sequence length. Nothing of size s is kept for the backward: only position_ids and inv_freq
are saved, and the backward rotates the gradient by the negative angle (the rotation's inverse
is its transpose).

Implementations (`backend`, see rotary_backend): this torch code is the reference and the CPU
path; on CUDA the fused Triton kernel of triton_rotary.py computes the same rotation without
any table in memory, and is picked automatically when Triton is installed.
"""

import functools

import torch

CHUNK_ELEMENTS = 1 << 24  # per-chunk elements of one rotated half, summed over b and h
CPU_CHUNK_ELEMENTS = 1 << 18  # smaller on CPU: a chunk's temporaries then stay in cache


def apply_rotary(
    x: torch.Tensor,
    position_ids: torch.Tensor,
    inv_freq: torch.Tensor,
    *,
    mscale: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Rotate x [s, b, h, d] by position_ids [b or 1, s] and inv_freq [r/2] or [g, r/2]."""
    _check_shapes(x, position_ids, inv_freq)
    rotate = _rotation(rotary_backend(x, backend))
    return _RotaryFunction.apply(rotate, position_ids, inv_freq, float(mscale), x)[0]


def apply_rotary_qk(
    query: torch.Tensor,
    key: torch.Tensor,
    position_ids: torch.Tensor,
    inv_freq: torch.Tensor,
    *,
    mscale: float = 1.0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rotary on query [s, b, h, d] and key [s, b, g, d] with one cos/sin table for both."""
    _check_shapes(query, position_ids, inv_freq)
    _check_shapes(key, position_ids, inv_freq)
    rotate = _rotation(rotary_backend(query, backend))
    return _RotaryFunction.apply(rotate, position_ids, inv_freq, float(mscale), query, key)


def packed_position_ids(cu_seqlens: torch.Tensor, total_tokens: int) -> torch.Tensor:
    """Position ids [1, t] of packed (THD) sequences: each restarts at 0 at its cu_seqlens offset.

    Rotate packed q [t, h, d] as apply_rotary(q.unsqueeze(1), packed_position_ids(...), ...).
    """
    tokens = torch.arange(total_tokens, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    sequence = torch.searchsorted(cu_seqlens[1:], tokens, right=True)  # which sequence each token is in
    return (tokens - cu_seqlens[sequence]).unsqueeze(0)


BACKENDS = ("auto", "torch", "triton")


def rotary_backend(x: torch.Tensor, backend: str = "auto") -> str:
    """Which implementation rotates x: 'auto' picks 'triton' for CUDA tensors in fp32/fp16/bf16
    when Triton imports, else 'torch' (the reference, and the CPU path). 'triton' on CPU
    tensors runs the kernel in Triton's interpreter (tests only: it is slow)."""
    if backend not in BACKENDS:
        raise ValueError(f"apply_rotary: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        kernel = _triton_rotary() if x.is_cuda else None
        return "triton" if kernel is not None and x.dtype in kernel.SUPPORTED_DTYPES else "torch"
    if backend == "triton" and _triton_rotary() is None:
        raise ValueError("apply_rotary: backend='triton' needs the triton package: pip install triton")
    return backend


@functools.cache
def _triton_rotary():
    """The Triton kernel module, or None when Triton does not import (CPU-only installs)."""
    try:
        from megatron_ext.rope import triton_rotary
    except ImportError:
        return None
    return triton_rotary


def _rotation(backend):
    """The function that rotates (tensors, position_ids, inv_freq, mscale, sign) for a backend."""
    return _triton_rotary().rotate if backend == "triton" else _rotate


class _RotaryFunction(torch.autograd.Function):
    """Forward rotates by +angle; backward rotates the gradients by -angle, from the saved ids."""

    @staticmethod
    def forward(ctx, rotate, position_ids, inv_freq, mscale, *tensors):
        ctx.save_for_backward(position_ids, inv_freq)
        ctx.rotate, ctx.mscale = rotate, mscale
        return tuple(rotate(tensors, position_ids, inv_freq, mscale, sign=1.0))

    @staticmethod
    def backward(ctx, *grads):
        position_ids, inv_freq = ctx.saved_tensors
        return (None, None, None, None, *ctx.rotate(grads, position_ids, inv_freq, ctx.mscale, sign=-1.0))


def _rotate(tensors, position_ids, inv_freq, mscale, sign):
    """The rotation itself, chunked over the sequence; sign=-1 rotates backwards.

    Every tensor in `tensors` is [s, b, h_i, d] and shares one cos/sin table per chunk. Each
    output half is written by one multiply and one in-place multiply-add, so a chunk's only
    temporaries are its angle table, cos and sin.
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
    if 2 * half < tensors[0].shape[-1]:
        for x, out in zip(grouped, outs):
            out[..., 2 * half:] = x[..., 2 * half:]  # channels beyond the rotary dim pass through
    widest = max(x.shape[1] * x.shape[2] * x.shape[3] for x in grouped) * half
    limit = CHUNK_ELEMENTS if tensors[0].is_cuda else min(CHUNK_ELEMENTS, CPU_CHUNK_ELEMENTS)
    chunk = max(1, limit // widest)
    for start in range(0, s, chunk):
        tokens = slice(start, start + chunk)
        angles = positions[tokens, :, None, None, None].to(angle_dtype) * inv_freq  # [c, b', g, 1, r/2]
        cos = torch.cos(angles)
        sin = angles.sin_()
        if mscale != 1.0:
            cos.mul_(mscale)
        if mscale * sign != 1.0:
            sin.mul_(mscale * sign)
        c, sn = cos.to(tensors[0].dtype), sin.to(tensors[0].dtype)
        for x, out in zip(grouped, outs):
            x1, x2 = x[tokens, ..., :half], x[tokens, ..., half:2 * half]
            out1, out2 = out[tokens, ..., :half], out[tokens, ..., half:2 * half]
            torch.mul(x1, c, out=out1).addcmul_(x2, sn, value=-1)
            torch.mul(x2, c, out=out2).addcmul_(x1, sn)
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
