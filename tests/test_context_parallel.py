"""megatron_ext/context_parallel.py, the one place of context parallelism's token layout: its slicing equals
megatron's `get_batch_on_this_cp_rank` bitwise for every field a batch carries, gathering inverts it, and the
mask, the evaluation's shares and the THD padding follow the same indices."""

import pytest
import torch

from megatron_ext.context_parallel import (
    held_token_indices,
    sequence_multiple,
    slice_for_context_parallel,
    zigzag_causal_mask,
    zigzag_token_indices,
)


def training_batch(batch_size: int, seq_length: int, seed: int = 0) -> dict:
    """Every field the training loop slices: tokens, labels, loss mask (float), PoSE position ids, document ids,
    plus a megatron [b, 1, s, s] attention mask (sliced on its dim 2)."""
    from megatron_ext.rope.pose import pose_position_ids

    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 1000, (batch_size, seq_length + 1), generator=generator)
    return dict(
        tokens=tokens[:, :-1].contiguous(), labels=tokens[:, 1:].contiguous(),
        loss_mask=torch.rand(batch_size, seq_length, generator=generator).round(),
        position_ids=torch.stack([pose_position_ids(seq_length, 16 * seq_length, seed=3, sample_index=i)
                                  for i in range(batch_size)]),
        document_ids=torch.randint(0, 3, (batch_size, seq_length), generator=generator).sort(dim=1).values,
        attention_mask=torch.rand(batch_size, 1, seq_length, seq_length, generator=generator) > 0.5,
    )


@pytest.fixture(autouse=True)
def fake_groups_count(monkeypatch):
    """megatron's get_pg_size / get_pg_rank read a group only once torch.distributed is initialized."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)


class FakeGroup:
    """What megatron's get_pg_size / get_pg_rank read of a process group."""

    def __init__(self, size: int, rank: int):
        self._size, self._rank = size, rank

    def size(self):
        return self._size

    def rank(self):
        return self._rank


@pytest.mark.parametrize("cp_size", [2, 3, 4])
@pytest.mark.parametrize("seq_length_per_chunk", [1, 5])
def test_slicing_equals_megatrons_get_batch_on_this_cp_rank_bitwise(cp_size, seq_length_per_chunk):
    from megatron.core.utils import get_batch_on_this_cp_rank

    batch = training_batch(2, 2 * cp_size * seq_length_per_chunk, seed=cp_size)
    original = {name: value.clone() for name, value in batch.items()}
    for rank in range(cp_size):
        ours = slice_for_context_parallel(batch, cp_group=FakeGroup(cp_size, rank))
        theirs = get_batch_on_this_cp_rank(dict(batch), cp_group=FakeGroup(cp_size, rank))
        assert list(ours) == list(theirs)
        for name in batch:
            assert ours[name].dtype == theirs[name].dtype and ours[name].shape == theirs[name].shape, name
            assert torch.equal(ours[name], theirs[name]), (name, rank)
            seq_dim = 2 if name == "attention_mask" else 1
            assert ours[name].shape[seq_dim] * cp_size == batch[name].shape[seq_dim]  # a share, not the whole
            assert ours[name].is_contiguous()
    assert all(torch.equal(batch[name], original[name]) for name in batch)  # the caller's batch is untouched


def test_slicing_reads_megatrons_parallel_state_without_a_group(monkeypatch):
    from megatron.core import parallel_state

    batch = training_batch(1, 8)
    monkeypatch.setattr(parallel_state, "get_context_parallel_world_size", lambda: 2)
    monkeypatch.setattr(parallel_state, "get_context_parallel_rank", lambda: 1)
    assert torch.equal(slice_for_context_parallel(batch)["tokens"],
                       slice_for_context_parallel(batch, cp_group=FakeGroup(2, 1))["tokens"])


def test_none_fields_stay_none():
    local = slice_for_context_parallel(dict(tokens=torch.arange(8)[None], document_ids=None), cp_group=FakeGroup(2, 0))
    assert local["document_ids"] is None and local["tokens"].tolist() == [[0, 1, 6, 7]]


@pytest.mark.parametrize("cp_size", [1, 2, 3, 4])
def test_the_ranks_hold_every_token_once_and_gathering_puts_them_back_in_order(cp_size):
    local_len = 6
    held = held_token_indices(local_len, cp_size)
    assert sorted(held.tolist()) == list(range(local_len * cp_size))
    sequence = torch.arange(local_len * cp_size) * 10
    shares = [slice_for_context_parallel({"tokens": sequence[None]}, cp_group=FakeGroup(cp_size, rank))["tokens"][0]
              for rank in range(cp_size)] if cp_size > 1 else [sequence]
    for rank, share in enumerate(shares):
        assert share.tolist() == (sequence[zigzag_token_indices(local_len, cp_size, rank)]).tolist()
    gathered = torch.cat(shares)  # what the all-gather of gather_sequence holds, in rank order
    assert torch.equal(gathered.index_select(0, torch.argsort(held)), sequence)


def test_the_causal_mask_is_causal_on_the_global_indices():
    cp_size, local_len = 2, 4  # 8 tokens, chunks of 2: rank 0 holds 0 1 6 7, rank 1 holds 2 3 4 5
    mask = zigzag_causal_mask(local_len, cp_size, 0)
    assert mask.shape == (4, 8)
    keys = held_token_indices(local_len, cp_size).tolist()  # 0 1 6 7 2 3 4 5
    for row, query in enumerate([0, 1, 6, 7]):
        assert mask[row].tolist() == [key <= query for key in keys]


def test_a_sequence_the_zig_zag_cannot_split_is_refused_naming_the_fix():
    with pytest.raises(ValueError, match=r"batch\['labels'\].*\(1, 6\).*multiple of 2 \* context parallel size = 4"):
        slice_for_context_parallel({"tokens": torch.zeros(1, 8), "labels": torch.zeros(1, 6)}, cp_group=FakeGroup(2, 0))
    assert sequence_multiple(4) == 8
