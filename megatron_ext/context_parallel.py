"""Context parallelism's token layout, in one place: which tokens of a sequence each CP rank holds, the slicing
of a batch into this rank's share, the gathering back into token order, and the causal mask over the shares.

The zig-zag (load-balanced) layout, megatron's and Transformer Engine's: the sequence is cut into 2 x CP chunks
and rank r keeps chunks r and 2 x CP - 1 - r. Under a causal mask a late chunk costs more than an early one;
pairing them gives every rank the same work. Every tensor of a batch is sliced alike (tokens, labels, loss
mask, position ids, PoSE's included, document ids), so position ids travel with their tokens.

Used by training (batches), evaluation (prompts and logits) and the SDPA core attention (the mask). Imports
torch; megatron only inside the functions that read its parallel state or pack sequences for Transformer Engine.
"""

import torch

# the field document masking adds (megatron_ext.data.dataset): [L] int64, which document of the window
DOCUMENT_IDS = "document_ids"


def sequence_multiple(cp_size: int) -> int:
    """The multiple a sequence length must be for the zig-zag split: 2 x CP (two chunks per rank)."""
    return 2 * cp_size


def zigzag_token_indices(local_len: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """Global indices of the `local_len` tokens CP rank `cp_rank` holds, in the order it holds them: chunks r and
    2*cp-1-r of 2*cp, each local_len / 2 tokens (the whole sequence is local_len * cp_size tokens)."""
    chunk = local_len // 2
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * chunk, (2 * cp_size - cp_rank) * chunk, device=device)
    return torch.cat([first, second])


def held_token_indices(local_len: int, cp_size: int, device=None) -> torch.Tensor:
    """The global index of each position of the CP ranks' shares laid end to end in rank order (what an all-gather
    of the shares along the sequence holds)."""
    return torch.cat([zigzag_token_indices(local_len, cp_size, rank, device) for rank in range(cp_size)])


def zigzag_causal_mask(local_len: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """[local_len, local_len * cp_size] bool, True = may attend: this rank's queries against every rank's keys
    gathered in rank order, causal on the global indices."""
    query_index = zigzag_token_indices(local_len, cp_size, cp_rank, device)
    key_index = held_token_indices(local_len, cp_size, device)
    return key_index[None, :] <= query_index[:, None]


def context_parallel_size_and_rank(cp_group=None) -> tuple[int, int]:
    """(size, rank) of `cp_group`, or of megatron's context-parallel group when None."""
    if cp_group is not None:
        from megatron.core.utils import get_pg_rank, get_pg_size

        return get_pg_size(cp_group), get_pg_rank(cp_group)
    from megatron.core import parallel_state

    return parallel_state.get_context_parallel_world_size(), parallel_state.get_context_parallel_rank()


def slice_for_context_parallel(batch: dict, *, cp_group=None) -> dict:
    """This context-parallel rank's zig-zag share of a batch of [b, s] tensors (position ids and document ids
    included; `attention_mask` [b, 1, s, s] on its dim 2, megatron's rule), equal to megatron's
    `get_batch_on_this_cp_rank`. The CP group is `cp_group`, or megatron's parallel state; with CP = 1 the batch
    comes back as it is. `batch` is not changed; None values stay None.
    """
    cp_size, cp_rank = context_parallel_size_and_rank(cp_group)
    if cp_size <= 1:
        return batch
    multiple = sequence_multiple(cp_size)
    local = {}
    for name, value in batch.items():
        if value is None:
            local[name] = None
            continue
        seq_dim = 2 if name == "attention_mask" else 1  # megatron's rule
        if value.dim() <= seq_dim or value.shape[seq_dim] % multiple:
            raise ValueError(
                f"batch['{name}'] has shape {tuple(value.shape)}: its sequence length (dim {seq_dim}) must be a "
                f"multiple of 2 * context parallel size = {multiple}: set seq_length to a multiple of "
                f"{multiple}, or lower the context parallel size"
            )
        held = zigzag_token_indices(value.shape[seq_dim] // cp_size, cp_size, cp_rank, device=value.device)
        local[name] = value.index_select(seq_dim, held)
    return local


def gather_sequence(local: torch.Tensor, cp_group, dim: int = 0) -> torch.Tensor:
    """The whole sequence, in token order, on every rank of `cp_group`, from each rank's zig-zag share along `dim`."""
    from megatron.core.utils import get_pg_size

    cp_size = get_pg_size(cp_group)
    parts = [torch.empty_like(local) for _ in range(cp_size)]
    torch.distributed.all_gather(parts, local.contiguous(), group=cp_group)
    held = held_token_indices(local.size(dim), cp_size)
    # position p of the gathered tensor holds token held[p]; argsort inverts that permutation
    return torch.cat(parts, dim=dim).index_select(dim, torch.argsort(held).to(local.device))


# ----------------------------------------------------------------------------- packed sequences (THD)


def packed_sequences_on_this_cp_rank(batch: dict, *, cp_size: int = 1, cp_rank: int = 0, pad_multiple: int = 1):
    """A document-masked batch in megatron's packed (THD) form, for Transformer Engine attention:
    (batch of [1, T] tensors without document_ids, PackedSeqParams(qkv_format="thd", cu_seqlens...)).

    Every document piece of every row becomes one sequence of the pack (rows are laid end to end, so T = b*s).
    Under context parallelism TE splits each sequence into 2*cp zig-zag chunks: every piece is padded to a
    multiple of 2*cp*pad_multiple (pad tokens: token, label and position 0, no loss; pass pad_multiple = TP size
    under sequence parallelism), then megatron's `get_thd_batch_on_this_cp_rank` (Transformer Engine >= 1.10)
    keeps this rank's part. T then varies from batch to batch, which pipeline parallelism cannot take.
    """
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.utils import get_thd_batch_on_this_cp_rank

    document_ids = batch[DOCUMENT_IDS]
    rows, seq_length = document_ids.shape
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    start_index = starts.reshape(-1).nonzero().squeeze(1)
    total = torch.tensor([rows * seq_length], device=start_index.device)
    lengths = torch.diff(start_index, append=total)
    fields = {name: value.reshape(1, -1) for name, value in batch.items() if name != DOCUMENT_IDS}
    cu_seqlens = _cumulative(lengths)
    if cp_size == 1:
        longest = int(lengths.max())
        return fields, PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                                       max_seqlen_q=longest, max_seqlen_kv=longest)
    multiple = sequence_multiple(cp_size) * pad_multiple
    padded_lengths = (lengths + multiple - 1) // multiple * multiple
    fields = _spread_into_padded_slots(fields, lengths, padded_lengths)
    return get_thd_batch_on_this_cp_rank(fields, cu_seqlens, _cumulative(padded_lengths),
                                         padded_lengths.max().reshape(1), cp_size=cp_size, cp_rank=cp_rank)


def _cumulative(lengths: torch.Tensor) -> torch.Tensor:
    """[n] sequence lengths -> [n + 1] int32 offsets 0, l0, l0 + l1, ... (cu_seqlens)."""
    return torch.nn.functional.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)


def _spread_into_padded_slots(fields: dict, lengths: torch.Tensor, padded_lengths: torch.Tensor) -> dict:
    """[1, T] tensors -> [1, sum(padded_lengths)]: sequence i starts at the i-th padded offset, zeros after it."""
    padded_starts = torch.cumsum(padded_lengths, 0) - padded_lengths
    starts = torch.cumsum(lengths, 0) - lengths
    within = torch.arange(int(lengths.sum()), device=lengths.device) - torch.repeat_interleave(starts, lengths)
    destination = torch.repeat_interleave(padded_starts, lengths) + within
    padded_total = int(padded_lengths.sum())
    spread = {}
    for name, value in fields.items():
        slots = value.new_zeros(1, padded_total)
        slots[0, destination] = value[0]
        spread[name] = slots
    return spread
