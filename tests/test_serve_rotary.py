"""megatron_ext.serve's rotation (what the vLLM plugin puts in every attention layer), checked without an engine.

Each test compares against an independent computation: megatron_ext.rope applied to one KV group at a
time with that group's base alone, the full (TP 1) table sliced by hand, or vLLM's own rotary module.
"""

import json
import subprocess

import pytest
import torch
from serve_models import SERVE_PYTHON, needs_serve_env

from megatron_ext.rope import RopeConfig, apply_rotary, rope_inv_freq
from megatron_ext.serve.rotary import GroupedRotary, local_kv_groups

HEAD_DIM, HEADS, KV_HEADS = 32, 8, 2
BASES = [500.0, 80000.0]
# Every scaling an export writes (stock and megatron_ext's own), with parameters that move each frequency.
SCALINGS = {
    "default": {},
    "linear": {"factor": 4.0},
    "ntk": {"factor": 4.0},
    "yarn": {"factor": 4.0, "original_max_position_embeddings": 64},
    "yarn_truncate_off_with_mscales": {"factor": 8.0, "original_max_position_embeddings": 64, "truncate": False,
                                       "mscale": 1.0, "mscale_all_dim": 0.5, "beta_fast": 16.0},
    "yarn_pose": {"factor": 4.0, "original_max_position_embeddings": 64},
    "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "abf": {"new_base": 500000.0},
}


def _scaling(case: str) -> str:
    return "yarn" if case.startswith("yarn_truncate") else case


def harpe(case: str, bases=BASES) -> RopeConfig:
    return RopeConfig(scaling=_scaling(case), scaling_params=SCALINGS[case], head_base_strategy="explicit",
                      head_base_params={"bases": list(bases)})


def per_group_reference(case: str, positions, heads: torch.Tensor, groups: list[int]) -> torch.Tensor:
    """megatron_ext.rope on each KV group's heads alone, with that group's base as the only base."""
    out = []
    per_group = heads.shape[1] // len(groups)
    for i, group in enumerate(groups):
        inv_freq, factor = rope_inv_freq(_scaling(case), base=BASES[group], dim=HEAD_DIM, **SCALINGS[case])
        block = heads[:, i * per_group:(i + 1) * per_group]  # [T, n/g, d]
        out.append(apply_rotary(block[:, None], positions[None], inv_freq, mscale=factor)[:, 0])
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("case", SCALINGS)
def test_each_kv_group_rotates_with_its_own_base_under_every_scaling(case):
    torch.manual_seed(0)
    tokens = 37
    positions = torch.cat([torch.arange(20), torch.tensor([100, 4095, 70000]), torch.arange(500, 514)])
    query, key = torch.randn(tokens, HEADS * HEAD_DIM), torch.randn(tokens, KV_HEADS * HEAD_DIM)
    rotary = GroupedRotary(harpe(case), head_dim=HEAD_DIM, num_heads=HEADS, num_kv_heads=KV_HEADS)
    rotated_q, rotated_k = rotary(positions, query, key)
    expected_q = per_group_reference(case, positions, query.view(tokens, HEADS, HEAD_DIM), [0, 1])
    expected_k = per_group_reference(case, positions, key.view(tokens, KV_HEADS, HEAD_DIM), [0, 1])
    torch.testing.assert_close(rotated_q.view(tokens, HEADS, HEAD_DIM), expected_q, rtol=0, atol=2e-6)
    torch.testing.assert_close(rotated_k.view(tokens, KV_HEADS, HEAD_DIM), expected_k, rtol=0, atol=2e-6)


def test_the_two_groups_really_differ():
    """Guards the test above: with two bases, rotating everything with the first base must not pass."""
    positions, key = torch.arange(50), torch.randn(50, KV_HEADS * HEAD_DIM)
    _, rotated = GroupedRotary(harpe("default"), head_dim=HEAD_DIM, num_heads=HEADS, num_kv_heads=KV_HEADS)(
        positions, torch.randn(50, HEADS * HEAD_DIM), key)
    one_base = GroupedRotary(harpe("default", bases=[BASES[0]] * 2), head_dim=HEAD_DIM, num_heads=HEADS,
                             num_kv_heads=KV_HEADS)(positions, torch.randn(50, HEADS * HEAD_DIM), key)[1]
    assert torch.equal(rotated[:, :HEAD_DIM], one_base[:, :HEAD_DIM])
    assert (rotated[:, HEAD_DIM:] - one_base[:, HEAD_DIM:]).abs().max() > 0.1


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("case", ["yarn", "llama3"])
def test_tensor_parallel_ranks_hold_slices_of_the_full_tables(tp, case):
    """2 KV groups: TP 2 splits them one per rank, TP 4 replicates each on two ranks (vLLM's layout)."""
    rope, positions = harpe(case), torch.arange(0, 3000, 7)
    full = GroupedRotary(rope, head_dim=HEAD_DIM, num_heads=HEADS, num_kv_heads=KV_HEADS)
    full_cos, full_sin = full.cos_sin(positions)  # [T, 2, r/2]
    query, key = torch.randn(len(positions), HEADS * HEAD_DIM), torch.randn(len(positions), KV_HEADS * HEAD_DIM)
    full_q, full_k = full(positions, query, key)
    heads_per_rank = HEADS // tp
    for rank in range(tp):
        group = rank * KV_HEADS // tp  # the KV head this rank holds: rank // (tp / 2) for TP 4, rank for TP 2
        local = GroupedRotary(rope, head_dim=HEAD_DIM, num_heads=HEADS, num_kv_heads=KV_HEADS, tp_size=tp,
                              tp_rank=rank)
        assert local.groups == [group]
        cos, sin = local.cos_sin(positions)
        assert torch.equal(cos, full_cos[:, [group]]) and torch.equal(sin, full_sin[:, [group]])
        q_cols = slice(rank * heads_per_rank * HEAD_DIM, (rank + 1) * heads_per_rank * HEAD_DIM)
        k_cols = slice(group * HEAD_DIM, (group + 1) * HEAD_DIM)
        local_q, local_k = local(positions, query[:, q_cols], key[:, k_cols])
        assert torch.equal(local_q, full_q[:, q_cols]) and torch.equal(local_k, full_k[:, k_cols])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cos_sin_table_rotates_exactly_as_angles_from_the_positions(dtype):
    """What the plugin serves with (a table of max_model_len rows in the model's dtype, gathered per step) equals
    the table-free rotation bit for bit: the rotation casts cos/sin to the heads' dtype either way."""
    rope, positions = harpe("yarn"), torch.tensor([0, 1, 2, 31, 32, 33, 1000, 4095, 17, 17])
    query = torch.randn(len(positions), HEADS * HEAD_DIM).to(dtype)
    key = torch.randn(len(positions), KV_HEADS * HEAD_DIM).to(dtype)
    plain = GroupedRotary(rope, head_dim=HEAD_DIM, num_heads=HEADS, num_kv_heads=KV_HEADS)
    tabled = GroupedRotary(rope, head_dim=HEAD_DIM, num_heads=HEADS, num_kv_heads=KV_HEADS, max_position=4096,
                           dtype=dtype)
    assert tabled.table.shape == (KV_HEADS * 4096, HEAD_DIM) and tabled.table.dtype == dtype
    for ours, reference in zip(tabled(positions, query, key), plain(positions, query, key)):
        assert torch.equal(ours, reference)


def test_kv_heads_split_in_blocks_or_replicated_like_vllm():
    assert [local_kv_groups(8, 4, r) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [local_kv_groups(2, 8, r) for r in range(8)] == [[0]] * 4 + [[1]] * 4
    with pytest.raises(ValueError, match="multiple of 2"):
        local_kv_groups(2, 3, 0)
    with pytest.raises(ValueError, match="divides 6"):
        local_kv_groups(6, 4, 0)


# --- against vLLM's own rotary modules (serving environment) ----------------------------------------------

# vLLM's name and parameters for each stock scaling (what get_rope reads from rope_parameters).
VLLM_SCALINGS = {
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
}

VLLM_CHECK = """
import json, sys, torch
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.model_executor.layers.rotary_embedding import get_rope
from megatron_ext.rope import RopeConfig
from megatron_ext.serve.rotary import GroupedRotary
cases, bases, head_dim, heads, kv_heads = json.loads(sys.argv[1])
torch.manual_seed(0)
positions = torch.arange(0, 256)  # vLLM's YaRN table ends at original length x factor
query, key = torch.randn(len(positions), heads * head_dim), torch.randn(len(positions), kv_heads * head_dim)
errors = {}
for name, vllm_params in cases.items():
    params = {k: v for k, v in vllm_params.items() if k != "rope_type"}
    ours = GroupedRotary(RopeConfig(scaling=name, scaling_params=params, head_base_strategy="explicit",
                                    head_base_params={"bases": bases}),
                         head_dim=head_dim, num_heads=heads, num_kv_heads=kv_heads)
    q, k = ours(positions, query.clone(), key.clone())
    worst = 0.0
    per_group = heads // kv_heads
    for g, base in enumerate(bases):
        with set_current_vllm_config(VllmConfig()):
            stock = get_rope(head_dim, max_position=8192, rope_parameters={**vllm_params, "rope_theta": base},
                             dtype=torch.float32)
        qg = query.view(-1, heads, head_dim)[:, g * per_group:(g + 1) * per_group].reshape(len(positions), -1)
        kg = key.view(-1, kv_heads, head_dim)[:, g].reshape(len(positions), -1)
        sq, sk = stock.forward_native(positions, qg.clone(), kg.clone())
        ours_q = q.view(-1, heads, head_dim)[:, g * per_group:(g + 1) * per_group].reshape(len(positions), -1)
        ours_k = k.view(-1, kv_heads, head_dim)[:, g].reshape(len(positions), -1)
        worst = max(worst, (sq - ours_q).abs().max().item(), (sk - ours_k).abs().max().item())
    errors[name] = worst
print(json.dumps(errors))
"""


@pytest.mark.slow
@needs_serve_env
def test_each_group_equals_vllms_own_rotary_at_that_base():
    """vLLM's stock module for each scaling, built at one group's base, rotates that group as the plugin does."""
    args = json.dumps([VLLM_SCALINGS, BASES, HEAD_DIM, HEADS, KV_HEADS])
    result = subprocess.run([str(SERVE_PYTHON), "-c", VLLM_CHECK, args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(errors) == set(VLLM_SCALINGS)
    # vLLM derives its frequencies in fp32, megatron_ext (like training) in fp64 then casts: at position 255
    # that moves an angle by ~1e-5 (measured worst 6e-5 on unit-variance heads). A wrong base or scaling: O(1).
    assert all(error < 2e-4 for error in errors.values()), errors


FUSED_CHECK = """
import json, sys, torch
from vllm import _custom_ops
from megatron_ext.rope import RopeConfig
from megatron_ext.serve.rotary import GroupedRotary
scalings, bases, head_dim, heads, kv_heads = json.loads(sys.argv[1])
torch.manual_seed(0)
positions = torch.cat([torch.arange(20), torch.tensor([100, 4095, 3000]), torch.arange(500, 514)])
errors = {}
for name, params in scalings.items():
    scaling = "yarn" if name.startswith("yarn_truncate") else name
    for percent in (1.0, 0.5):  # partial rotary: the kernel's table is narrower than a head
        rope = RopeConfig(scaling=scaling, scaling_params=params, head_base_strategy="explicit",
                          head_base_params={"bases": bases}, rotary_percent=percent)
        for tp, rank in ((1, 0), (2, 1), (4, 2)):
            shape = dict(head_dim=head_dim, num_heads=heads, num_kv_heads=kv_heads, tp_size=tp, tp_rank=rank,
                         max_position=4096)
            plain = GroupedRotary(rope, **shape)
            fused = GroupedRotary(rope, **shape, fused_rotary=_custom_ops.rotary_embedding)
            q_size, kv_size = heads // tp * head_dim, len(fused.groups) * head_dim
            # as vLLM hands them over: strided slices of one qkv projection
            qkv = torch.randn(len(positions), q_size + 2 * kv_size)
            query, key, _ = qkv.split([q_size, kv_size, kv_size], dim=-1)
            expected_q, expected_k = plain(positions, query.clone(), key.clone())
            got_q, got_k = fused(positions, query, key)
            errors[f"{name} rotary_percent={percent} tp={tp} rank={rank}"] = max(
                (got_q - expected_q).abs().max().item(), (got_k - expected_k).abs().max().item())
print(json.dumps(errors))
"""


@pytest.mark.slow
@needs_serve_env
def test_vllms_fused_kernel_rotates_each_group_as_the_torch_ops_do():
    """What the engine runs (vLLM's fused rotary kernel, one call over (token, KV group) pairs on the group-major
    table) equals the torch-op rotation that the tests above hold to megatron_ext.rope: every scaling, partial
    rotary, TP ranks holding one or several groups, q/k as strided slices of the qkv projection."""
    args = json.dumps([SCALINGS, BASES, HEAD_DIM, HEADS, KV_HEADS])
    result = subprocess.run([str(SERVE_PYTHON), "-c", FUSED_CHECK, args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(errors) == len(SCALINGS) * 2 * 3
    assert all(error < 2e-6 for error in errors.values()), {k: v for k, v in errors.items() if v >= 2e-6}
