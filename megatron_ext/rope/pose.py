"""PoSE (arXiv 2309.10400): position ids drawn from a long target window for a short training window.
Pure python/numpy/torch, deterministic in (seed, sample_index, document_index): must not import megatron."""

import itertools
from dataclasses import dataclass

import numpy as np
import torch

# Two variants:
#   "code"  (default) the released code, dwzhu-pku/PoSE src/train_pose.py,
#           train_preprocess_function_pose (read at commit a3d4ba8). Per document, L = min(n, L_c):
#             r1 = randint(1, (L+1)//2)          chunk 1 = tokens [0, r1), ids 0 .. r1-1
#             r2 = randint(L, n)                 chunk 2 = the L - r1 tokens ending at r2
#             u  = randint(0, L_t - L)           chunk 2 ids = r1 .. L-1, each + u
#           (random.randint includes both ends). Chunk 1 stays at id 0 on purpose: its comment says
#           fixing it "makes the coverage possibility more uniform for large relative positions".
#   "paper" N chunks (paper Sec. 3 and its Appendix Figure 6): lengths by stick-breaking,
#           l_i = randint(1, left - (chunks still to come)), the last takes the rest; skips
#           u_0 = 0, u_i = randint(u_{i-1}, L_t - L_c); chunk i ids = its window indices + u_i.
# So with two chunks they differ only in the first chunk's length: at most (L+1)//2 in the code,
# anything in 1 .. L-1 in the paper. Content, both variants: chunk i holds document tokens
# x[v_i + st_i : v_i + st_i + l_i], v_0 = 0, v_i = randint(v_{i-1}, L_x - L_c) (the code's r2 - L).
#
# Every draw comes from Philox keyed by (seed, sample_index): counter-based, no hidden state, so all
# TP/PP/CP ranks and a resumed run compute the same ids for a sample without communicating. We use
# its raw 64-bit words (a stable stream) rather than Generator methods, whose streams NumPy may
# change between versions. With document masking every document of a packed window draws its own
# chunks from the counter word `document_index` (document 0 draws what an unpacked window draws).

POSE_VARIANTS = ("code", "paper")
_POSITION_STREAM, _CONTENT_STREAM = 0, 1  # separate counters, so ids never depend on document length


def _uniform_ints(seed: int, sample_index: int, stream: int, document_index: int = 0):
    """A function randint(low, high), both ends included, drawing from Philox(key=(seed, sample_index)),
    counter (0, 0, document_index, stream): the first counter word advances with each draw, so documents
    and streams never share a counter."""
    bits = np.random.Philox(key=[seed, sample_index], counter=[0, 0, document_index, stream])

    def randint(low: int, high: int) -> int:
        # modulo bias is below (high - low + 1) / 2**64: nil for any window length
        return low + int(bits.random_raw()) % (high - low + 1)

    return randint


@dataclass(frozen=True)
class PoseChunks:
    """How one training window is cut: chunk i has lengths[i] tokens and its ids are shifted by
    position_skips[i] (u_i: 0 for chunk 0, non-decreasing, at most target_length - seq_length)."""

    lengths: tuple[int, ...]
    position_skips: tuple[int, ...]

    @property
    def starts(self) -> tuple[int, ...]:
        """st_i: where chunk i starts in the window."""
        return tuple(itertools.accumulate(self.lengths[:-1], initial=0))


def _check_settings(seq_length, target_length, seed, sample_index, num_chunks, variant, document_index=0) -> None:
    if variant not in POSE_VARIANTS:
        raise ValueError(
            f"pose: variant {variant!r} is unknown: use 'code' (the released code, 2 chunks) or 'paper' (N chunks)"
        )
    if num_chunks < 1:
        raise ValueError(f"pose: num_chunks ({num_chunks}) must be >= 1: the paper uses 2")
    if variant == "code" and num_chunks != 2:
        raise ValueError(
            f"pose: num_chunks ({num_chunks}) must be 2 for variant='code' (the released code cuts two "
            "chunks): set num_chunks=2 or use variant='paper'"
        )
    if seq_length < num_chunks:
        raise ValueError(
            f"pose: seq_length ({seq_length}) must be >= num_chunks ({num_chunks}): every chunk needs a "
            "token; lower num_chunks"
        )
    if target_length < seq_length:
        raise ValueError(
            f"pose: target_length ({target_length}) must be >= seq_length ({seq_length}): "
            "set target_length >= seq_length"
        )
    for name, value in (("seed", seed), ("sample_index", sample_index), ("document_index", document_index)):
        if not 0 <= value < 2**64:
            raise ValueError(f"pose: {name} ({value}) must be in [0, 2**64): it keys the Philox generator")


def _code_chunks(seq_length: int, target_length: int, randint) -> PoseChunks:
    first = randint(1, (seq_length + 1) // 2)  # r1
    skip = randint(0, target_length - seq_length)  # u
    return PoseChunks(lengths=(first, seq_length - first), position_skips=(0, skip))


def _paper_chunks(seq_length: int, target_length: int, num_chunks: int, randint) -> PoseChunks:
    lengths, left = [], seq_length
    for still_to_come in range(num_chunks - 1, 0, -1):
        lengths.append(randint(1, left - still_to_come))
        left -= lengths[-1]
    lengths.append(left)
    skips = [0]
    for _ in range(num_chunks - 1):
        skips.append(randint(skips[-1], target_length - seq_length))
    return PoseChunks(lengths=tuple(lengths), position_skips=tuple(skips))


def pose_chunks(
    seq_length: int,
    target_length: int,
    *,
    seed: int,
    sample_index: int,
    num_chunks: int = 2,
    variant: str = "code",
    document_index: int = 0,
) -> PoseChunks:
    """Chunk lengths and position skips of one sample (the two variants are described at the top of this file),
    or of document `document_index` of a packed sample (then `seq_length` is that document's length)."""
    _check_settings(seq_length, target_length, seed, sample_index, num_chunks, variant, document_index)
    randint = _uniform_ints(seed, sample_index, _POSITION_STREAM, document_index)
    if variant == "code":
        return _code_chunks(seq_length, target_length, randint)
    return _paper_chunks(seq_length, target_length, num_chunks, randint)


def _shift_chunks(lengths, offsets) -> torch.LongTensor:
    """Window index + its chunk's offset, for every token: [sum(lengths)]."""
    window_index = np.arange(sum(lengths), dtype=np.int64)
    return torch.from_numpy(window_index + np.repeat(np.asarray(offsets, dtype=np.int64), lengths))


def pose_position_ids(
    seq_length: int,
    target_length: int,
    *,
    seed: int,
    sample_index: int,
    num_chunks: int = 2,
    variant: str = "code",
    document_index: int = 0,
) -> torch.LongTensor:
    """Position ids [seq_length] for one training window: strictly increasing, the first 0, the last
    < target_length. Equal to arange(seq_length) when target_length == seq_length."""
    chunks = pose_chunks(
        seq_length, target_length, seed=seed, sample_index=sample_index, num_chunks=num_chunks, variant=variant,
        document_index=document_index,
    )
    return _shift_chunks(chunks.lengths, chunks.position_skips)


def pose_document_position_ids(
    document_ids: torch.Tensor,
    target_length: int,
    *,
    seed: int,
    sample_index: int,
    num_chunks: int = 2,
    variant: str = "code",
) -> torch.LongTensor:
    """Position ids [L] for a packed window whose token i belongs to document document_ids[i] (0, 0, 1, 1, 1, 2,
    ...: non-decreasing from 0). Each document restarts at 0 and gets the ids `pose_position_ids` draws for a
    window of its own length, keyed by (seed, sample_index, its index in the window), as the released code does
    per document. A document shorter than num_chunks has no room for a skip: it keeps 0 .. n-1."""
    steps = document_ids[1:] - document_ids[:-1]
    runs_from_zero = document_ids.numel() > 0 and document_ids[0] == 0 and steps.clamp(0, 1).equal(steps)
    if document_ids.dim() != 1 or not runs_from_zero:
        raise ValueError(
            f"pose: document_ids {document_ids.tolist()[:16]}... must be a 1-d run of 0, 0, .., 1, 1, ..: "
            "each document's tokens together, numbered from 0 without gaps"
        )
    lengths = torch.bincount(document_ids).tolist()
    parts = [
        pose_position_ids(length, target_length, seed=seed, sample_index=sample_index, num_chunks=num_chunks,
                          variant=variant, document_index=index)
        if length >= num_chunks else torch.arange(length)
        for index, length in enumerate(lengths)
    ]
    return torch.cat(parts)


def pose_content_indices(
    document_length: int,
    seq_length: int,
    target_length: int,
    *,
    seed: int,
    sample_index: int,
    num_chunks: int = 2,
    variant: str = "code",
) -> torch.LongTensor:
    """Which document tokens fill the window [seq_length]: chunk i takes x[v_i + st_i : v_i + st_i + l_i]
    with the same chunks as pose_position_ids; use as tokens = document[indices]."""
    if document_length < seq_length:
        raise ValueError(
            f"pose: document_length ({document_length}) is shorter than seq_length ({seq_length}): "
            "call with seq_length = min(document_length, seq_length), as the released code does, or pack documents"
        )
    chunks = pose_chunks(
        seq_length, target_length, seed=seed, sample_index=sample_index, num_chunks=num_chunks, variant=variant
    )
    randint = _uniform_ints(seed, sample_index, _CONTENT_STREAM)
    offsets = [0]
    for _ in range(num_chunks - 1):
        offsets.append(randint(offsets[-1], document_length - seq_length))  # v_i
    return _shift_chunks(chunks.lengths, offsets)
