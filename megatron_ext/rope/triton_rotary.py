"""Fused RoPE rotation in Triton: cos/sin built in registers from (position id, group's inverse frequency).

Same math and shapes as megatron_ext.rope.apply (the torch reference); must not import megatron.

One launch rotates q and k together in megatron's [s, b, h, d] layout: each is read once and
written once into a fresh output, and no cos/sin table exists in memory. `rotate` has the
signature of apply._rotate: apply.py's autograd function saves only position ids and inverse
frequencies and runs the same kernel with sign=-1 for the backward.
Angles are fp32, as in the reference: angle = float32(position) * float32(inv_freq), then
reduced to [-pi, pi] with a three-part Cody-Waite 2*pi (fused multiply-adds) before sin/cos
(libdevice's __nv_sinf/__nv_cosf, whose fast path ends near 1e5 rad), so positions of 10^5 and
beyond keep fp32 accuracy. Inputs may be fp32, fp16 or bf16; the rotation is done in fp32.
Packed (THD) sequences are the b = 1 case with apply.packed_position_ids.

CUDA tensors run the compiled kernel; CPU tensors run the same kernel in Triton's interpreter
(what TRITON_INTERPRET=1 selects), which is how the test suite checks it without a GPU.
"""

import math

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INTERPRETER_TILE_ELEMENTS = 2048  # tokens x rotary pairs a program handles per head, in the interpreter

# 2*pi split in three fp32 parts (each the fp32 rounding of what the previous ones miss).
_TWO_PI_HI = float(torch.tensor(2 * math.pi, dtype=torch.float32))
_TWO_PI_MID = float(torch.tensor(2 * math.pi - _TWO_PI_HI, dtype=torch.float32))
_TWO_PI_LO = float(torch.tensor(2 * math.pi - _TWO_PI_HI - _TWO_PI_MID, dtype=torch.float32))


def _rotary_kernel(
    q_ptr, q_out_ptr, k_ptr, k_out_ptr, pos_ptr, inv_freq_ptr,
    seq_len, batch_rows, q_heads, k_heads, slots_per_group, half, pass_channels,
    q_stride_s, q_stride_b, q_stride_h, qo_stride_s, qo_stride_b, qo_stride_h,
    k_stride_s, k_stride_b, k_stride_h, ko_stride_s, ko_stride_b, ko_stride_h,
    pos_stride_b, pos_stride_s, inv_freq_stride_g,
    cos_scale, sin_scale,
    INV_TWO_PI: tl.constexpr, TWO_PI_HI: tl.constexpr, TWO_PI_MID: tl.constexpr, TWO_PI_LO: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
):
    """One program: BLOCK_S tokens x one head slot x `batch_rows` batch rows.

    A head slot is q_heads consecutive query heads and the k_heads key heads that share their
    base; all its heads and rows use one cos/sin tile. Grid: (token blocks, slots, row starts).
    The q and k loops are spelled out twice: a shared @triton.jit helper could not serve both the
    compiled kernel and the interpreted one built from this same function.
    """
    token = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)  # [BLOCK_S]
    # int64 indices: offsets into tensors of more than 2**31 elements overflow int32
    slot = tl.program_id(1).to(tl.int64)
    first_row = tl.program_id(2).to(tl.int64)
    pair = tl.arange(0, BLOCK_HALF)  # [BLOCK_HALF]
    token_ok = token < seq_len
    mask = token_ok[:, None] & (pair < half)[None, :]
    token = token.to(tl.int64)

    position = tl.load(pos_ptr + first_row * pos_stride_b + token * pos_stride_s, mask=token_ok, other=0)
    inv_freq = tl.load(inv_freq_ptr + (slot // slots_per_group) * inv_freq_stride_g + pair,
                       mask=pair < half, other=0.0)
    angle = position.to(tl.float32)[:, None] * inv_freq[None, :]  # [BLOCK_S, BLOCK_HALF]
    turns = tl.floor(angle * INV_TWO_PI + 0.5)
    reduced = tl.fma(-turns, TWO_PI_HI, angle)
    reduced = tl.fma(-turns, TWO_PI_MID, reduced)
    reduced = tl.fma(-turns, TWO_PI_LO, reduced)
    cos = tl.cos(reduced) * cos_scale
    sin = tl.sin(reduced) * sin_scale

    rotary = pair[None, :]
    passed = 2 * half + tl.arange(0, BLOCK_PASS)[None, :]
    pass_mask = token_ok[:, None] & (tl.arange(0, BLOCK_PASS) < pass_channels)[None, :]
    for row_index in range(batch_rows):
        row = first_row + row_index
        for i in range(q_heads):
            head = slot * q_heads + i
            src = q_ptr + token[:, None] * q_stride_s + row * q_stride_b + head * q_stride_h
            dst = q_out_ptr + token[:, None] * qo_stride_s + row * qo_stride_b + head * qo_stride_h
            x1 = tl.load(src + rotary, mask=mask).to(tl.float32)
            x2 = tl.load(src + half + rotary, mask=mask).to(tl.float32)
            tl.store(dst + rotary, (x1 * cos - x2 * sin).to(q_out_ptr.dtype.element_ty), mask=mask)
            tl.store(dst + half + rotary, (x2 * cos + x1 * sin).to(q_out_ptr.dtype.element_ty), mask=mask)
            tl.store(dst + passed, tl.load(src + passed, mask=pass_mask), mask=pass_mask)
        for i in range(k_heads):
            head = slot * k_heads + i
            src = k_ptr + token[:, None] * k_stride_s + row * k_stride_b + head * k_stride_h
            dst = k_out_ptr + token[:, None] * ko_stride_s + row * ko_stride_b + head * ko_stride_h
            x1 = tl.load(src + rotary, mask=mask).to(tl.float32)
            x2 = tl.load(src + half + rotary, mask=mask).to(tl.float32)
            tl.store(dst + rotary, (x1 * cos - x2 * sin).to(k_out_ptr.dtype.element_ty), mask=mask)
            tl.store(dst + half + rotary, (x2 * cos + x1 * sin).to(k_out_ptr.dtype.element_ty), mask=mask)
            tl.store(dst + passed, tl.load(src + passed, mask=pass_mask), mask=pass_mask)


# On GPUs the tile height and warp count are tuned once per head layout (not per sequence length,
# which varies with packed sequences); the interpreter takes INTERPRETER_TILE_ELEMENTS directly.
_GPU_CONFIGS = [triton.Config({"BLOCK_S": block_s}, num_warps=warps)
                for block_s, warps in ((4, 2), (8, 4), (16, 4), (32, 4), (32, 8))]
_compiled_kernel = triton.autotune(_GPU_CONFIGS, key=["half", "q_heads", "k_heads", "batch_rows"])(
    triton.jit(_rotary_kernel))
_interpreted_kernel = InterpretedFunction(_rotary_kernel)


def rotate(tensors, position_ids, inv_freq, mscale: float, sign: float):
    """Rotate one or two tensors [s, b, h_i, d] by sign * angle; returns fresh outputs.

    position_ids [b or 1, s]; inv_freq [r/2] or [g, r/2] with every h_i divisible by g.
    """
    if len(tensors) not in (1, 2):
        raise ValueError(f"triton rotary: rotates one or two tensors (q, k), got {len(tensors)}")
    for x in tensors:
        if x.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"triton rotary: dtype {x.dtype} not supported, use one of {SUPPORTED_DTYPES}")
    key = tensors[1] if len(tensors) == 2 else None
    outputs, args, constants, grid = kernel_launch(tensors[0], key, position_ids, inv_freq, mscale, sign)
    if tensors[0].shape[0] == 0:
        return outputs
    if tensors[0].is_cuda:
        # fused multiply-adds in the rotation (Triton 3.10 turns them off by default); the angle
        # itself stays the rounded fp32 product, as in the reference
        _compiled_kernel[grid](*args, **constants, enable_fp_fusion=True)
    else:
        s, block_half = tensors[0].shape[0], constants["BLOCK_HALF"]
        block_s = max(1, min(INTERPRETER_TILE_ELEMENTS // block_half, triton.next_power_of_2(s)))
        _interpreted_kernel[grid](*args, **constants, BLOCK_S=block_s)
    return outputs


def kernel_launch(q, k, position_ids, inv_freq, mscale, sign):
    """(outputs, kernel arguments, constexpr arguments but BLOCK_S, grid) to rotate q and k (k may be None)."""
    q = _last_dim_contiguous(q)
    k = _last_dim_contiguous(k) if k is not None else None
    s, b, q_heads, d = q.shape
    k_heads = k.shape[2] if k is not None else 0
    inv_freq = inv_freq.to(device=q.device, dtype=torch.float32).reshape(-1, inv_freq.shape[-1]).contiguous()
    groups, half = inv_freq.shape
    slots = math.gcd(q_heads, k_heads)  # gcd(h, 0) = h: one query head a slot when k is absent
    position_ids = position_ids.to(q.device)
    shared_rows = position_ids.shape[0] == 1
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device) if k is not None else q_out
    k_in = k if k is not None else q
    args = (
        q, q_out, k_in, k_out, position_ids, inv_freq,
        # rows sharing their positions share one cos/sin tile: one program loops over them
        s, b if shared_rows else 1, q_heads // slots, k_heads // slots, slots // groups, half, d - 2 * half,
        *q.stride()[:3], *q_out.stride()[:3], *k_in.stride()[:3], *k_out.stride()[:3],
        0 if shared_rows else position_ids.stride(0), position_ids.stride(1), inv_freq.stride(0),
        float(mscale), float(mscale * sign),
    )
    constants = dict(INV_TWO_PI=1 / (2 * math.pi), TWO_PI_HI=_TWO_PI_HI, TWO_PI_MID=_TWO_PI_MID,
                     TWO_PI_LO=_TWO_PI_LO, BLOCK_HALF=triton.next_power_of_2(half),
                     BLOCK_PASS=triton.next_power_of_2(max(1, d - 2 * half)))

    def grid(meta):
        return triton.cdiv(s, meta["BLOCK_S"]), slots, 1 if shared_rows else b

    return ([q_out, k_out] if k is not None else [q_out]), args, constants, grid


def _last_dim_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()
