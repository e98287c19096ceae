"""apply_rotary against megatron-core's stock RoPE, the relative-position property, and its memory promise."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_ext.rope import apply_rotary, apply_rotary_qk
from megatron_ext.rope import apply as apply_module


def inv_freq_for(base, dim):
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))


@pytest.fixture(scope="module")
def stock_rope():
    """megatron-core's RotaryEmbedding + apply_rotary_pos_emb, runnable on CPU."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_ext.compat import enable_stock_rope_on_cpu

    enable_stock_rope_on_cpu()
    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4,
                               apply_rope_fusion=False, use_cpu_initialization=True)
    group = torch.distributed.group.WORLD if torch.distributed.is_initialized() else None
    return RotaryEmbedding, partial_apply(apply_rotary_pos_emb, config, group)


def partial_apply(fn, config, group):
    def apply(t, emb):
        return fn(t, emb, config=config, cp_group=group or _SingleRankGroup())
    return apply


class _SingleRankGroup:
    def size(self):
        return 1

    def rank(self):
        return 0


@pytest.mark.parametrize("offset", [0, 100_000])
@pytest.mark.parametrize("rotary_percent", [1.0, 0.5])
def test_equal_bases_match_stock_rope(stock_rope, offset, rotary_percent):
    RotaryEmbedding, stock_apply = stock_rope
    s, b, h, d = 48, 2, 8, 32
    rope = RotaryEmbedding(kv_channels=d, rotary_percent=rotary_percent, rotary_base=500000,
                           use_cpu_initialization=True)
    torch.manual_seed(0)
    x = torch.randn(s, b, h, d)
    expected = stock_apply(x, rope(s, offset=offset))  # emb [s, 1, 1, r]
    positions = torch.arange(offset, offset + s).unsqueeze(0)
    shared = apply_rotary(x, positions, rope.inv_freq)
    per_group = apply_rotary(x, positions.expand(b, s), rope.inv_freq.expand(4, -1))
    assert (shared - expected).abs().max().item() <= 1e-6
    assert (per_group - expected).abs().max().item() <= 1e-6


def test_per_head_scores_depend_only_on_position_difference():
    torch.manual_seed(1)
    h, d = 4, 16
    inv_freq = torch.stack([inv_freq_for(b, d) for b in (1e4, 3e5, 2e6, 5e6)])  # [h, d/2]
    q, k = torch.randn(1, 1, h, d, dtype=torch.float64), torch.randn(1, 1, h, d, dtype=torch.float64)

    def scores(m, n):
        qr = apply_rotary(q, torch.tensor([[m]]), inv_freq)
        kr = apply_rotary(k, torch.tensor([[n]]), inv_freq)
        return (qr * kr).sum(-1).flatten()  # one score per head

    for m, n, shift in [(5, 2, 1000), (70_000, 3, 12_345), (0, 0, 131_071)]:
        torch.testing.assert_close(scores(m + shift, n + shift), scores(m, n), rtol=0, atol=1e-9)
    assert not torch.allclose(scores(9, 2), scores(9, 3))  # and it does depend on the difference


def test_query_heads_of_a_group_share_their_kv_groups_base():
    torch.manual_seed(2)
    s, b, h, groups, d = 10, 2, 8, 2, 16
    per_group = torch.stack([inv_freq_for(1e4, d), inv_freq_for(1e6, d)])  # [g, d/2]
    per_head = per_group.repeat_interleave(h // groups, dim=0)  # heads 0-3 group 0, 4-7 group 1
    x = torch.randn(s, b, h, d, dtype=torch.float64)
    positions = torch.randint(0, 50_000, (b, s))
    torch.testing.assert_close(apply_rotary(x, positions, per_group), apply_rotary(x, positions, per_head),
                               rtol=0, atol=0)


def test_matches_the_formula_with_mscale_and_partial_rotary():
    torch.manual_seed(3)
    s, b, h, d, r = 6, 1, 2, 12, 8
    x = torch.randn(s, b, h, d, dtype=torch.float64)
    inv_freq = torch.stack([inv_freq_for(1e4, r), inv_freq_for(2e4, r)])
    positions = torch.tensor([[0, 1, 2, 40, 41, 42]])
    out = apply_rotary(x, positions, inv_freq, mscale=1.25)
    for t in range(s):
        for head in range(h):
            for j in range(r // 2):
                angle = positions[0, t].item() * inv_freq[head, j].item()
                c, sn = 1.25 * math.cos(angle), 1.25 * math.sin(angle)
                a, bb = x[t, 0, head, j].item(), x[t, 0, head, j + r // 2].item()
                assert out[t, 0, head, j].item() == pytest.approx(a * c - bb * sn, abs=1e-12)
                assert out[t, 0, head, j + r // 2].item() == pytest.approx(bb * c + a * sn, abs=1e-12)
    torch.testing.assert_close(out[..., r:], x[..., r:], rtol=0, atol=0)


def test_gradient_is_the_inverse_rotation():
    torch.manual_seed(4)
    x = torch.randn(7, 2, 4, 8, dtype=torch.float64, requires_grad=True)
    positions = torch.randint(0, 1000, (2, 7))
    inv_freq = torch.stack([inv_freq_for(b, 6) for b in (1e4, 1e5)])  # partial rotary, 2 groups
    assert torch.autograd.gradcheck(lambda t: apply_rotary(t, positions, inv_freq, mscale=1.1), (x,))


def test_chunking_does_not_change_the_result(monkeypatch):
    torch.manual_seed(5)
    x = torch.randn(33, 2, 4, 16)
    positions = torch.randint(0, 10_000, (1, 33))
    inv_freq = torch.stack([inv_freq_for(b, 16).float() for b in (1e4, 5e5)])
    whole = apply_rotary(x, positions, inv_freq)
    monkeypatch.setattr(apply_module, "CHUNK_ELEMENTS", 2 * 4 * 8 * 5)  # 5 tokens a chunk
    torch.testing.assert_close(apply_rotary(x, positions, inv_freq), whole, rtol=0, atol=0)


class _LargestFloat32(TorchDispatchMode):
    """Records the largest fp32 tensor any aten op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


def test_no_fp32_table_of_the_size_of_q_and_nothing_of_length_s_saved(monkeypatch):
    s, b, h, groups, d = 4096, 2, 8, 2, 64
    monkeypatch.setattr(apply_module, "CHUNK_ELEMENTS", 1 << 16)
    x = torch.randn(s, b, h, d, dtype=torch.bfloat16, requires_grad=True)
    positions = torch.arange(s).unsqueeze(0)  # shared by the batch
    inv_freq = torch.stack([inv_freq_for(b_, d).float() for b_ in (1e4, 1e6)])
    saved = []
    with _LargestFloat32() as mode, torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = apply_rotary(x, positions, inv_freq)
    chunk = (1 << 16) // (b * h * d // 2)
    assert mode.largest == chunk * 1 * groups * (d // 2)  # the angle table of one chunk
    assert mode.largest * 64 < s * b * h * d
    assert sum(saved) == s + groups * d // 2  # only position ids and inverse frequencies
    out.float().sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("bad, message", [
    (dict(x=torch.zeros(4, 2, 3)), "x must be"),
    (dict(position_ids=torch.zeros(3, 4, dtype=torch.long)), "position_ids must be"),
    (dict(inv_freq=torch.zeros(4, 2)), "cannot be split"),
    (dict(inv_freq=torch.zeros(20)), "rotates 40 channels"),
])
def test_bad_shapes_are_named(bad, message):
    args = dict(x=torch.zeros(4, 2, 6, 8), position_ids=torch.zeros(2, 4, dtype=torch.long),
                inv_freq=torch.zeros(2, 4))
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        apply_rotary(args["x"], args["position_ids"], args["inv_freq"])


def test_query_and_key_together_equal_each_alone():
    torch.manual_seed(6)
    q = torch.randn(9, 2, 8, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(9, 2, 2, 16, dtype=torch.float64, requires_grad=True)
    positions = torch.randint(0, 5000, (2, 9))
    inv_freq = torch.stack([inv_freq_for(1e4, 16), inv_freq_for(1e6, 16)])
    q_out, k_out = apply_rotary_qk(q, k, positions, inv_freq, mscale=1.2)
    torch.testing.assert_close(q_out, apply_rotary(q, positions, inv_freq, mscale=1.2), rtol=0, atol=0)
    torch.testing.assert_close(k_out, apply_rotary(k, positions, inv_freq, mscale=1.2), rtol=0, atol=0)
    assert torch.autograd.gradcheck(
        lambda a, b: apply_rotary_qk(a, b, positions, inv_freq, mscale=1.2), (q, k))
