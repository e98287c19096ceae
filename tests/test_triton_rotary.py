"""The fused Triton rotary kernel against the torch reference (apply.py), forward and gradient.

Without a GPU the kernel runs in Triton's interpreter on CPU tensors (slow: shapes stay small).
Tests marked gpu run the compiled kernel where CUDA exists.
"""

import math

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed: pip install triton (CI installs it)")

from megatron_ext.rope import pose_position_ids  # noqa: E402
from megatron_ext.rope.apply import apply_rotary, apply_rotary_qk, packed_position_ids, rotary_backend  # noqa: E402

BASES = (1e4, 3e5, 5e6, 2e4, 8e5, 1e6)


def inv_freq_for(bases, rotary_dim):
    pairs = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
    return torch.stack([1.0 / (base ** pairs) for base in bases])  # [len(bases), r/2]


def rotate_both_ways(query, key, position_ids, inv_freq, mscale, backend):
    """Outputs and input gradients of apply_rotary_qk under one fixed random output gradient."""
    query, key = query.detach().requires_grad_(), key.detach().requires_grad_()
    outs = apply_rotary_qk(query, key, position_ids, inv_freq, mscale=mscale, backend=backend)
    generator = torch.Generator().manual_seed(7)
    grads = [torch.randn(o.shape, generator=generator).to(o) for o in outs]
    return (*outs, *torch.autograd.grad(outs, (query, key), grads))


CASES = {
    # name: (s, b, query heads, key heads, head dim, bases, rotary dim, shared positions)
    "shared base, MHA": (19, 2, 4, 4, 16, BASES[:1], 16, True),
    "per-head bases, MHA": (19, 1, 3, 3, 16, BASES[:3], 16, True),
    "per-group bases, GQA 6/2": (23, 2, 6, 2, 8, BASES[:2], 8, False),
    "per-group bases, GQA, 2 groups of 3 kv heads": (9, 1, 6, 6, 8, BASES[:2], 8, False),
    "partial rotary, odd pair count": (7, 3, 4, 2, 10, BASES[:2], 6, False),
    "one token": (1, 1, 2, 1, 4, BASES[:1], 4, True),
    "head dim 128, three token blocks": (70, 2, 2, 2, 128, BASES[:2], 128, True),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mscale", [1.0, 1.3])
def test_kernel_matches_torch_reference_forward_and_gradient(case, mscale):
    s, b, heads, kv_heads, head_dim, bases, rotary_dim, shared = CASES[case]
    torch.manual_seed(0)
    query, key = torch.randn(s, b, heads, head_dim), torch.randn(s, b, kv_heads, head_dim)
    position_ids = torch.randint(0, 300_000, (1 if shared else b, s))
    inv_freq = inv_freq_for(bases, rotary_dim)
    inv_freq = inv_freq[0] if len(bases) == 1 else inv_freq
    kernel = rotate_both_ways(query, key, position_ids, inv_freq, mscale, "triton")
    reference = rotate_both_ways(query, key, position_ids, inv_freq, mscale, "torch")
    for name, got, want in zip(("query", "key", "query grad", "key grad"), kernel, reference):
        torch.testing.assert_close(got, want, rtol=0, atol=4e-6, msg=lambda m: f"{case}, {name}: {m}")
    assert torch.equal(kernel[0][..., rotary_dim:], query[..., rotary_dim:])  # untouched channels


def test_pose_ids_per_sample_rotate_each_row_with_its_own_positions():
    torch.manual_seed(1)
    s, heads, head_dim = 24, 4, 8
    position_ids = torch.stack([pose_position_ids(s, 32 * s, seed=0, sample_index=i) for i in range(2)])  # [2, s]
    x = torch.randn(s, 2, heads, head_dim)
    inv_freq = inv_freq_for(BASES[:4], head_dim)
    both = apply_rotary(x, position_ids, inv_freq, backend="triton")
    for row in range(2):
        alone = apply_rotary(x[:, row:row + 1], position_ids[row:row + 1], inv_freq, backend="torch")
        torch.testing.assert_close(both[:, row:row + 1], alone, rtol=0, atol=4e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_rotate_in_fp32_and_round_once(dtype):
    """Within one unit in the last place: the GPU rounds to nearest, the interpreter truncates bf16."""
    torch.manual_seed(2)
    s, b, heads, kv_heads, head_dim = 17, 2, 4, 2, 16
    query, key = torch.randn(s, b, heads, head_dim).to(dtype), torch.randn(s, b, kv_heads, head_dim).to(dtype)
    position_ids = torch.randint(0, 100_000, (1, s))
    inv_freq = inv_freq_for(BASES[:2], head_dim)
    q_out, k_out = apply_rotary_qk(query, key, position_ids, inv_freq, mscale=1.2, backend="triton")
    # The reference in fp32 on the same (rounded) inputs; the kernel only adds its final rounding.
    q_ref, k_ref = apply_rotary_qk(query.float(), key.float(), position_ids, inv_freq, mscale=1.2, backend="torch")
    for got, want in ((q_out, q_ref), (k_out, k_ref)):
        assert got.dtype == dtype
        assert ((got.float() - want).abs() <= want.abs() * torch.finfo(dtype).eps + 1e-6).all()


def test_large_positions_keep_fp32_accuracy():
    """Angles up to ~10^6 rad: the kernel's range reduction must not lose the fp32 result."""
    s, head_dim = 64, 8
    position_ids = torch.arange(1_000_000, 1_000_000 + 16 * s, 16).unsqueeze(0)
    inv_freq = inv_freq_for(BASES[:2], head_dim).float()
    x = torch.randn(s, 1, 2, head_dim)
    out = apply_rotary(x, position_ids, inv_freq, backend="triton").double()
    # Exact cos/sin of the very fp32 angle the reference uses, then the rotation in fp64.
    angle = (position_ids.t()[:, :, None, None].float() * inv_freq).double()  # [s, 1, 2, r/2]
    x1, x2 = x[..., :head_dim // 2].double(), x[..., head_dim // 2:].double()
    exact = torch.cat([x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()], dim=-1)
    assert (out - exact).abs().max().item() < 4e-6


def test_strided_views_of_a_fused_qkv_projection():
    """megatron splits q, k, v out of one [s, b, g, (h/g + 2) * d] tensor: k is a strided view."""
    torch.manual_seed(3)
    s, b, groups, per_group, head_dim = 11, 2, 2, 3, 8
    mixed = torch.randn(s, b, groups, (per_group + 2) * head_dim)
    query, key, _ = mixed.split([per_group * head_dim, head_dim, head_dim], dim=-1)
    query = query[:, :, :, :head_dim]  # the first query head of each group: strided too
    assert not query.is_contiguous() and not key.is_contiguous()
    position_ids = torch.randint(0, 5000, (b, s))
    inv_freq = inv_freq_for(BASES[:2], head_dim)
    kernel = apply_rotary_qk(query, key, position_ids, inv_freq, backend="triton")
    reference = apply_rotary_qk(query.contiguous(), key.contiguous(), position_ids, inv_freq, backend="torch")
    for got, want in zip(kernel, reference):
        torch.testing.assert_close(got, want, rtol=0, atol=4e-6)


def test_packed_sequences_restart_positions_at_each_document():
    cu_seqlens = torch.tensor([0, 3, 8, 12])
    assert packed_position_ids(cu_seqlens, 12).tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2, 3]]
    torch.manual_seed(4)
    packed = torch.randn(12, 4, 8)  # THD: [tokens, heads, d]
    inv_freq = inv_freq_for(BASES[:4], 8)
    out = apply_rotary(packed.unsqueeze(1), packed_position_ids(cu_seqlens, 12), inv_freq, backend="triton")
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        document = apply_rotary(packed[start:end].unsqueeze(1), torch.arange(end - start).unsqueeze(0), inv_freq,
                                backend="torch")
        torch.testing.assert_close(out[start:end], document, rtol=0, atol=4e-6)


def test_cpu_tensors_take_the_torch_path_unless_asked():
    x = torch.zeros(2, 1, 2, 4)
    assert rotary_backend(x) == "torch"
    assert rotary_backend(x, "triton") == "triton"
    assert rotary_backend(x.double()) == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        rotary_backend(x, "cuda")


def test_unsupported_dtype_is_named():
    x = torch.zeros(2, 1, 2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="dtype torch.float64 not supported"):
        apply_rotary(x, torch.zeros(1, 2, dtype=torch.long), torch.ones(2), backend="triton")


@pytest.mark.gpu
def test_cuda_tensors_take_the_kernel_by_default():
    assert rotary_backend(torch.zeros(1, device="cuda")) == "triton"
    assert rotary_backend(torch.zeros(1, device="cuda", dtype=torch.float64)) == "torch"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_kernel_matches_torch_reference_on_gpu(dtype):
    torch.manual_seed(5)
    s, b, heads, kv_heads, head_dim = 4099, 2, 32, 8, 128
    query = torch.randn(s, b, heads, head_dim, device="cuda", dtype=dtype)
    key = torch.randn(s, b, kv_heads, head_dim, device="cuda", dtype=dtype)
    position_ids = torch.stack([pose_position_ids(s, 32 * s, seed=0, sample_index=i) for i in range(b)]).cuda()
    inv_freq = inv_freq_for(torch.linspace(1e4, 5e6, kv_heads).tolist(), head_dim).cuda()
    kernel = rotate_both_ways(query, key, position_ids, inv_freq, 1.1, "triton")
    reference = rotate_both_ways(query.float(), key.float(), position_ids, inv_freq, 1.1, "torch")
    tolerance = 4e-6 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    for got, want in zip(kernel, reference):
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want, rtol=tolerance, atol=tolerance * 4)


@pytest.mark.gpu
def test_kernel_allocates_only_its_outputs_on_gpu():
    s, heads, head_dim = 32768, 32, 128
    query = torch.randn(s, 1, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    key = torch.randn(s, 1, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    position_ids = torch.arange(s, device="cuda").unsqueeze(0)
    inv_freq = inv_freq_for(torch.linspace(1e4, 5e6, heads).tolist(), head_dim).cuda()
    apply_rotary_qk(query, key, position_ids, inv_freq)  # compile first
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    outs = apply_rotary_qk(query, key, position_ids, inv_freq)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    outputs = sum(o.numel() * o.element_size() for o in outs)
    assert extra <= outputs + (1 << 20), f"{extra} bytes allocated for {outputs} bytes of outputs"
    assert math.isfinite(outs[0].float().sum().item())


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_compiles_for_a100_and_h100_with_16_byte_accesses(dtype):
    """No GPU needed: Triton's own specialization of a Llama-shaped call, compiled to cubin for
    sm_80 and sm_90. Loads and stores of q and k must be vectorized (the bandwidth depends on it)
    and sin/cos must be libdevice's (accurate, given the kernel's range reduction)."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, make_backend
        from triton.runtime.jit import JITFunction, create_function_from_signature
    except ImportError as error:
        pytest.skip(f"this Triton's compiler internals differ: {error}")
    from megatron_ext.rope import triton_rotary

    kernel = triton_rotary._compiled_kernel.fn
    if not isinstance(kernel, JITFunction):
        pytest.skip("TRITON_INTERPRET=1 replaces the compiled kernel by the interpreter")

    s, heads, kv_heads, head_dim = 4096, 32, 8, 128
    query, key = torch.randn(s, 1, heads, head_dim, dtype=dtype), torch.randn(s, 1, kv_heads, head_dim, dtype=dtype)
    _, args, constants, _ = triton_rotary.kernel_launch(
        query, key, torch.arange(s).unsqueeze(0), torch.rand(kv_heads, head_dim // 2), 1.0, 1.0)
    for capability in (80, 90):
        target = GPUTarget("cuda", capability, 32)
        backend = make_backend(target)
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        kwargs = dict(constants, BLOCK_S=16, num_warps=4, enable_fp_fusion=True)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
        ptx = compiled.asm["ptx"]
        assert "cubin" in compiled.asm
        assert "ld.global.v4" in ptx and "st.global.v4" in ptx, f"sm_{capability}: scalar q/k accesses"
        assert "__nv_sinf" in ptx and "__nv_cosf" in ptx
