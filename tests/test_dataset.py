"""megatron_ext.data.dataset: GPTDataset samples, PoSE position ids, the micro-batch layout, CP slicing.

References are independent of the code under test: the documents read back with megatron-core's IndexedDataset,
`pose_chunks` for where chunks start, hand-written index formulas, and slicing by hand. Run as a script under
torchrun, this file is the worker of the two-rank test."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_ext.data import (
    MicroBatchIterator,
    PoseDataset,
    SentencePieceTokenizer,
    build_gpt_dataset,
    build_tiny_corpus,
    global_sample_indices,
    preprocess,
    train_sentencepiece,
)
from megatron_ext.context_parallel import packed_sequences_on_this_cp_rank, slice_for_context_parallel
from megatron_ext.rope.pose import pose_chunks, pose_position_ids

SEQ_LENGTH = 32
NUM_SAMPLES = 800  # the tiny corpus packs into ~360 samples of 32 tokens: several epochs
TARGET_LENGTH = 1024
DIGITS = "0123456789"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dataset")


@pytest.fixture(scope="module")
def tokenizer(data_dir) -> SentencePieceTokenizer:
    corpus = build_tiny_corpus(data_dir, seed=0, num_documents=12, max_document_chars=2_000,
                               passkey_chars=(500, 2_000))
    return SentencePieceTokenizer(train_sentencepiece([corpus], data_dir / "tok", 500, seed=0))


@pytest.fixture(scope="module")
def prefix(data_dir, tokenizer) -> str:
    preprocess([data_dir / "tiny_corpus.jsonl"], data_dir / "tiny", tokenizer, workers=1, progress=False)
    return str(data_dir / "tiny")


@pytest.fixture(scope="module")
def digits_prefix(data_dir, tokenizer) -> str:
    """A second source whose documents are digits only: a sample made of digit tokens came from it."""
    lines = [json.dumps({"text": DIGITS[i % 10:] + DIGITS * (5 + i)}) for i in range(20)]
    (data_dir / "digits.jsonl").write_text("\n".join(lines) + "\n")
    preprocess([data_dir / "digits.jsonl"], data_dir / "digits", tokenizer, workers=1, progress=False)
    return str(data_dir / "digits")


@pytest.fixture(scope="module")
def documents(prefix) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    indexed = IndexedDataset(prefix)
    return [indexed[i].tolist() for i in range(len(indexed))]


@pytest.fixture(scope="module")
def dataset(prefix, tokenizer):
    return build_gpt_dataset([prefix], SEQ_LENGTH, tokenizer, num_samples=NUM_SAMPLES, seed=1)


def window(sample) -> list[int]:
    """The L + 1 tokens a sample was cut from: its tokens and its last label."""
    return sample["tokens"].tolist() + sample["labels"][-1:].tolist()


def as_text(token_ids) -> str:
    return "," + ",".join(map(str, token_ids)) + ","


# ----------------------------------------------------------------------------- build_gpt_dataset


def test_samples_are_contiguous_slices_of_the_packed_documents(dataset, documents, tokenizer):
    """Each window is: the end of one document, whole documents, the start of another (or a slice of one)."""
    documents_text = [as_text(document) for document in documents]
    assert all(document[-1] == tokenizer.eod and tokenizer.eod not in document[:-1] for document in documents)
    for index in range(len(dataset)):
        tokens = window(dataset[index])
        ends = [position + 1 for position, token in enumerate(tokens) if token == tokenizer.eod]
        pieces = [tokens[start:end] for start, end in zip([0, *ends], [*ends, len(tokens)])]
        first, middle, last = pieces[0], pieces[1:-1], pieces[-1]
        if len(pieces) == 1:
            assert any(as_text(first) in text for text in documents_text), index
            continue
        assert any(text.endswith(as_text(first)) for text in documents_text), index
        assert all(piece in documents for piece in middle), index
        assert not last or any(text.startswith(as_text(last)) for text in documents_text), index


def test_labels_are_tokens_shifted_by_one_and_fields_are_plain(dataset):
    assert len(dataset) == NUM_SAMPLES
    for index in (0, 1, NUM_SAMPLES - 1):
        sample = dataset[index]
        assert sorted(sample) == ["labels", "loss_mask", "position_ids", "tokens"]
        assert sample["labels"][:-1].tolist() == sample["tokens"][1:].tolist()
        assert sample["tokens"].dtype == sample["labels"].dtype == sample["position_ids"].dtype == torch.int64
        assert sample["loss_mask"].dtype == torch.float32 and sample["loss_mask"].tolist() == [1.0] * SEQ_LENGTH
        assert sample["position_ids"].tolist() == list(range(SEQ_LENGTH))


def test_same_seed_same_samples_with_or_without_a_cache(dataset, prefix, tokenizer, tmp_path):
    cached = build_gpt_dataset([prefix], SEQ_LENGTH, tokenizer, num_samples=NUM_SAMPLES, seed=1, cache_dir=tmp_path)
    assert any(tmp_path.rglob("*shuffle_index.npy")), "cache_dir set: megatron saves its indices there"
    from_cache = build_gpt_dataset([prefix], SEQ_LENGTH, tokenizer, num_samples=NUM_SAMPLES, seed=1,
                                   cache_dir=tmp_path)
    other_seed = build_gpt_dataset([prefix], SEQ_LENGTH, tokenizer, num_samples=NUM_SAMPLES, seed=2)
    samples = [window(dataset[i]) for i in range(NUM_SAMPLES)]
    assert [window(cached[i]) for i in range(NUM_SAMPLES)] == samples
    assert [window(from_cache[i]) for i in range(NUM_SAMPLES)] == samples
    assert [window(other_seed[i]) for i in range(NUM_SAMPLES)] != samples


def test_blend_draws_each_source_by_its_weight(prefix, digits_prefix, documents, tokenizer, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    digits = IndexedDataset(digits_prefix)
    digit_ids = {token for i in range(len(digits)) for token in digits[i].tolist()}  # digits, "▁", EOD

    def digit_samples(weights, cache_dir=None) -> int:
        blend = build_gpt_dataset([prefix, digits_prefix], SEQ_LENGTH, tokenizer, num_samples=400, seed=3,
                                  cache_dir=cache_dir, weights=weights)
        assert len(blend) == 400
        return sum(set(window(blend[i])) <= digit_ids for i in range(len(blend)))

    assert abs(digit_samples([1.0, 3.0], cache_dir=tmp_path) - 300) <= 1
    tokens = [sum(len(document) for document in documents), sum(len(digits[i]) for i in range(len(digits)))]
    assert abs(digit_samples(None) - 400 * tokens[1] / sum(tokens)) <= 1


def test_build_errors_name_the_setting(prefix, tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="no .*missing.bin or .*missing.idx.*preprocess"):
        build_gpt_dataset([str(tmp_path / "missing")], SEQ_LENGTH, tokenizer, num_samples=4, seed=0)
    with pytest.raises(ValueError, match="one positive weight per data prefix"):
        build_gpt_dataset([prefix, prefix], SEQ_LENGTH, tokenizer, num_samples=4, seed=0, weights=[1.0])
    with pytest.raises(ValueError, match="non-empty list"):
        build_gpt_dataset(prefix, SEQ_LENGTH, tokenizer, num_samples=4, seed=0)


def test_missing_compiled_helpers_say_how_to_get_them(prefix, tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "megatron.core.datasets.helpers_cpp", None)  # import fails as if never built
    with pytest.raises(ImportError, match="compiled dataset helpers.*pybind11"):
        build_gpt_dataset([prefix], SEQ_LENGTH, tokenizer, num_samples=4, seed=0)


# ----------------------------------------------------------------------------- PoseDataset

POSE_SETTINGS = [("code", 2), ("paper", 3)]


@pytest.mark.parametrize("variant, num_chunks", POSE_SETTINGS)
def test_pose_ids_are_those_of_the_global_sample_index(dataset, variant, num_chunks):
    pose = PoseDataset(dataset, target_length=TARGET_LENGTH, seed=5, num_chunks=num_chunks, variant=variant)
    assert len(pose) == len(dataset)
    for index in (0, 7, 123, NUM_SAMPLES - 1):
        sample, base = pose[index], dataset[index]
        expected = pose_position_ids(SEQ_LENGTH, TARGET_LENGTH, seed=5, sample_index=index, num_chunks=num_chunks,
                                     variant=variant)
        assert torch.equal(sample["position_ids"], expected)
        for name in ("tokens", "labels", "loss_mask"):
            assert torch.equal(sample[name], base[name])
        again = pose[index]
        assert all(torch.equal(again[name], sample[name]) for name in sample)


@pytest.mark.parametrize("variant, num_chunks", POSE_SETTINGS)
def test_mask_chunk_boundary_zeroes_the_labels_that_cross_a_position_skip(dataset, variant, num_chunks):
    pose = PoseDataset(dataset, target_length=TARGET_LENGTH, seed=5, num_chunks=num_chunks, variant=variant,
                       mask_chunk_boundary=True)
    masked_somewhere = False
    for index in range(50):
        chunks = pose_chunks(SEQ_LENGTH, TARGET_LENGTH, seed=5, sample_index=index, num_chunks=num_chunks,
                             variant=variant)
        # the last token of chunk i-1 predicts the first of chunk i; a skip larger than the previous one jumps
        boundaries = {chunks.starts[i] - 1 for i in range(1, num_chunks)
                      if chunks.position_skips[i] > chunks.position_skips[i - 1]}
        expected = [0.0 if position in boundaries else 1.0 for position in range(SEQ_LENGTH)]
        assert pose[index]["loss_mask"].tolist() == expected, index
        assert dataset[index]["loss_mask"].tolist() == [1.0] * SEQ_LENGTH  # the base is left alone
        masked_somewhere |= bool(boundaries)
    assert masked_somewhere


def test_pose_settings_are_checked_when_the_dataset_is_made(dataset):
    with pytest.raises(ValueError, match="target_length .* must be >= seq_length"):
        PoseDataset(dataset, target_length=SEQ_LENGTH - 1, seed=0)
    with pytest.raises(ValueError, match="num_chunks .* must be 2 for variant='code'"):
        PoseDataset(dataset, target_length=TARGET_LENGTH, seed=0, num_chunks=3)


# ----------------------------------------------------------------------------- document masking


@pytest.fixture(scope="module")
def document_dataset(prefix, tokenizer):
    return build_gpt_dataset([prefix], SEQ_LENGTH, tokenizer, num_samples=NUM_SAMPLES, seed=1, document_mask=True,
                             mask_eod_loss=True)


def test_document_mask_matches_megatrons_reset_position_ids_attention_mask_and_eod_loss(
        document_dataset, dataset, tokenizer):
    """The reference: megatron's own reset_position_ids / reset_attention_mask / eod_mask_loss (a loop over EODs)."""
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    samples_with_a_boundary = 0
    for index in range(NUM_SAMPLES):
        sample = document_dataset[index]
        assert torch.equal(sample["tokens"], dataset[index]["tokens"])
        masked_out, loss_mask, position_ids = _get_ltor_masks_and_position_ids(
            sample["tokens"], tokenizer.eod, reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True,
            create_attention_mask=True)
        document_ids = sample["document_ids"]
        may_attend = (document_ids[:, None] == document_ids[None, :]) & torch.ones(SEQ_LENGTH, SEQ_LENGTH).tril().bool()
        assert torch.equal(sample["position_ids"], position_ids), index
        assert torch.equal(may_attend, ~masked_out[0]), index
        assert torch.equal(sample["loss_mask"], loss_mask), index
        samples_with_a_boundary += bool(document_ids[-1] > 0)
    assert samples_with_a_boundary >= 20


@pytest.mark.parametrize("variant, num_chunks", POSE_SETTINGS)
def test_pose_with_document_mask_draws_ids_per_document(document_dataset, variant, num_chunks):
    pose = PoseDataset(document_dataset, target_length=TARGET_LENGTH, seed=5, num_chunks=num_chunks, variant=variant,
                       mask_chunk_boundary=True)
    for index in range(0, NUM_SAMPLES, 37):
        sample, base = pose[index], document_dataset[index]
        starts = torch.ones(SEQ_LENGTH, dtype=torch.bool)
        starts[1:] = base["document_ids"][1:] != base["document_ids"][:-1]
        ids = sample["position_ids"]
        assert ((ids == 0) == starts).all() and (ids < TARGET_LENGTH).all(), index
        assert (ids[1:] > ids[:-1])[~starts[1:]].all(), index
        # a skip inside a document masks its label; a document boundary is left to mask_eod_loss
        jumps_inside = (ids[1:] - ids[:-1] != 1) & ~starts[1:]
        expected = base["loss_mask"].clone()
        expected[:-1][jumps_inside] = 0.0
        assert torch.equal(sample["loss_mask"], expected), index


def test_packed_sequences_give_one_sequence_per_document_piece():
    document_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [0, 0, 0, 0, 0, 0, 1, 1]])
    batch = dict(tokens=torch.arange(16).view(2, 8), document_ids=document_ids)
    packed, params = packed_sequences_on_this_cp_rank(batch)
    assert set(packed) == {"tokens"} and packed["tokens"].tolist() == [list(range(16))]
    assert params.qkv_format == "thd"
    assert params.cu_seqlens_q.tolist() == params.cu_seqlens_kv.tolist() == [0, 3, 5, 8, 14, 16]
    assert params.cu_seqlens_q.dtype == torch.int32 and params.max_seqlen_q == params.max_seqlen_kv == 6


def test_packed_sequences_under_cp2_pad_every_document_to_a_multiple_of_4(monkeypatch):
    """Transformer Engine's THD CP splits each sequence into 2*cp chunks: pieces are padded to 4 (cp=2) before
    megatron's get_thd_batch_on_this_cp_rank (which needs TE) picks this rank's part."""
    import megatron.core.utils

    seen = {}

    def get_thd_batch_on_this_cp_rank(batch, cu_seqlens, cu_seqlens_padded, max_seqlen, cp_size, cp_rank):
        seen.update(batch=batch, cu_seqlens=cu_seqlens.tolist(), cu_seqlens_padded=cu_seqlens_padded.tolist(),
                    max_seqlen=max_seqlen.tolist(), cp=(cp_size, cp_rank))
        return batch, "params"

    monkeypatch.setattr(megatron.core.utils, "get_thd_batch_on_this_cp_rank", get_thd_batch_on_this_cp_rank)
    batch = dict(tokens=torch.arange(1, 9).view(1, 8), loss_mask=torch.ones(1, 8),
                 document_ids=torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]]))
    packed_sequences_on_this_cp_rank(batch, cp_size=2, cp_rank=1)
    assert seen["cu_seqlens"] == [0, 3, 8] and seen["cu_seqlens_padded"] == [0, 4, 12]
    assert seen["max_seqlen"] == [8] and seen["cp"] == (2, 1)
    assert seen["batch"]["tokens"].tolist() == [[1, 2, 3, 0, 4, 5, 6, 7, 8, 0, 0, 0]]
    assert seen["batch"]["loss_mask"].tolist() == [[1, 1, 1, 0, 1, 1, 1, 1, 1, 0, 0, 0]]


# ----------------------------------------------------------------------------- micro-batches


class IndexDataset(torch.utils.data.Dataset):
    """Sample i is tokens = [i, i, i]: a batch shows which samples it holds."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"tokens": torch.full((3,), index), "position_ids": torch.arange(3)}


def test_global_sample_indices_by_hand():
    # G = 8, mbs = 2, dp = 2: micro-batch m of rank r at iteration i starts at 8i + 4m + 2r
    layout = dict(micro_batch_size=2, global_batch_size=8, dp_size=2)
    assert global_sample_indices(0, 0, dp_rank=0, **layout) == [0, 1]
    assert global_sample_indices(0, 0, dp_rank=1, **layout) == [2, 3]
    assert global_sample_indices(1, 1, dp_rank=1, **layout) == [14, 15]
    assert global_sample_indices(5, 1, dp_rank=0, **layout) == [44, 45]


@pytest.mark.parametrize("micro_batch_size, global_batch_size, dp_size", [(1, 4, 2), (2, 12, 2), (3, 6, 1), (2, 8, 4)])
def test_an_iteration_uses_each_of_its_samples_exactly_once(micro_batch_size, global_batch_size, dp_size):
    for iteration in (0, 1, 9):
        taken = []
        for dp_rank in range(dp_size):
            batches = MicroBatchIterator(IndexDataset(10 * global_batch_size), micro_batch_size=micro_batch_size,
                                         global_batch_size=global_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                                         start_iteration=iteration).next_iteration()
            assert len(batches) == global_batch_size // (micro_batch_size * dp_size)
            taken += [int(index) for batch in batches for index in batch["tokens"][:, 0]]
        assert sorted(taken) == list(range(iteration * global_batch_size, (iteration + 1) * global_batch_size))


def test_batches_stack_the_samples_of_global_sample_indices(dataset):
    pose = PoseDataset(dataset, target_length=TARGET_LENGTH, seed=5)
    iterator = MicroBatchIterator(pose, micro_batch_size=2, global_batch_size=8, dp_rank=1, dp_size=2,
                                  start_iteration=3)
    for micro_batch, batch in enumerate(iterator.next_iteration()):
        indices = global_sample_indices(3, micro_batch, micro_batch_size=2, global_batch_size=8, dp_rank=1,
                                        dp_size=2)
        assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids"}
        for name, stacked in batch.items():
            assert stacked.shape == (2, SEQ_LENGTH)
            assert torch.equal(stacked, torch.stack([pose[index][name] for index in indices]))
    assert iterator.iteration == 4


@pytest.mark.parametrize("base", ["dataset", "document_dataset"])  # the second: PoSE ids per document
def test_resumed_iterator_serves_what_the_uninterrupted_one_would(base, request):
    pose = PoseDataset(request.getfixturevalue(base), target_length=TARGET_LENGTH, seed=5)
    layout = dict(micro_batch_size=2, global_batch_size=12, dp_rank=1, dp_size=2)
    uninterrupted = MicroBatchIterator(pose, **layout)
    for _ in range(4):
        uninterrupted.next_iteration()
    resumed = MicroBatchIterator(pose, start_iteration=uninterrupted.iteration, **layout)
    assert resumed.iteration == 4
    for _ in range(2):
        for a, b in zip(uninterrupted.next_iteration(), resumed.next_iteration(), strict=True):
            assert all(torch.equal(a[name], b[name]) for name in a)


def test_next_serves_micro_batches_one_by_one():
    layout = dict(micro_batch_size=1, global_batch_size=6, dp_rank=0, dp_size=2)
    one_by_one = MicroBatchIterator(IndexDataset(60), **layout)
    whole = MicroBatchIterator(IndexDataset(60), **layout)
    for iteration in range(3):
        expected = [batch["tokens"].tolist() for batch in whole.next_iteration()]
        assert [next(one_by_one)["tokens"].tolist() for _ in range(3)] == expected
        assert one_by_one.iteration == iteration + 1
    next(one_by_one)
    with pytest.raises(RuntimeError, match="half served"):
        one_by_one.next_iteration()


def test_bad_batch_sizes_name_the_settings():
    with pytest.raises(ValueError, match=r"training.global_batch_size \(10\).*training.micro_batch_size \(2\)"
                                         r" \* data-parallel size \(2\) = 4.*multiple of 4"):
        MicroBatchIterator(IndexDataset(100), micro_batch_size=2, global_batch_size=10, dp_rank=0, dp_size=2)
    with pytest.raises(ValueError, match="training.global_batch_size"):
        global_sample_indices(0, 0, micro_batch_size=4, global_batch_size=2, dp_rank=0, dp_size=1)
    with pytest.raises(ValueError, match="dp_rank"):
        global_sample_indices(0, 0, micro_batch_size=1, global_batch_size=2, dp_rank=2, dp_size=2)


def test_running_past_the_dataset_names_num_samples_and_train_iters():
    iterator = MicroBatchIterator(IndexDataset(10), micro_batch_size=2, global_batch_size=4, dp_rank=0, dp_size=1,
                                  start_iteration=2)
    assert next(iterator)["tokens"][:, 0].tolist() == [8, 9]
    with pytest.raises(IndexError, match="iteration 2 needs sample 11.* has 10 samples.*num_samples.*train_iters"):
        next(iterator)


# ----------------------------------------------------------------------------- context parallelism


def zigzag_by_hand(row: list[int], cp_size: int, cp_rank: int) -> list[int]:
    chunk = len(row) // (2 * cp_size)
    kept = (cp_rank, 2 * cp_size - 1 - cp_rank)
    return [value for k in kept for value in row[k * chunk:(k + 1) * chunk]]


def test_cp2_rank_keeps_chunks_r_and_3_minus_r(monkeypatch):
    from megatron.core import parallel_state

    batch = {
        "tokens": torch.arange(24).view(2, 12),
        "position_ids": torch.tensor([[0, 1, 2, 3, 50, 51, 52, 53, 54, 55, 56, 57]] * 2),
        "loss_mask": torch.ones(2, 12),
    }
    original = {name: value.clone() for name, value in batch.items()}
    monkeypatch.setattr(parallel_state, "get_context_parallel_world_size", lambda: 2)
    for cp_rank in (0, 1):
        monkeypatch.setattr(parallel_state, "get_context_parallel_rank", lambda: cp_rank)
        local = slice_for_context_parallel(batch)
        for name, value in original.items():
            assert local[name].tolist() == [zigzag_by_hand(row, 2, cp_rank) for row in value.tolist()]
        assert all(torch.equal(batch[name], original[name]) for name in batch)  # the caller's batch is untouched
    assert local["position_ids"][0].tolist() == [3, 50, 51, 52, 53, 54]  # rank 1: chunks 1 and 2 of 4


def test_cp_slicing_checks_the_sequence_length(monkeypatch):
    from megatron.core import parallel_state

    monkeypatch.setattr(parallel_state, "get_context_parallel_world_size", lambda: 2)
    monkeypatch.setattr(parallel_state, "get_context_parallel_rank", lambda: 0)
    with pytest.raises(ValueError, match=r"batch\['tokens'\].*\(2, 6\).*multiple of 2 \* context parallel size = 4"):
        slice_for_context_parallel({"tokens": torch.zeros(2, 6, dtype=torch.long)})


def test_cp1_returns_the_batch_as_it_is():
    batch = {"tokens": torch.arange(6).view(1, 6)}
    assert slice_for_context_parallel(batch) is batch


# ----------------------------------------------------------------------------- two ranks


@pytest.mark.distributed
def test_two_ranks_build_the_same_samples_as_one_process(dataset, prefix, tokenizer, tmp_path):
    """Both cache modes under a two-rank gloo world (megatron's rank-0-first build and barriers), and CP=2
    slicing over a real process group."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__,
               prefix, str(tokenizer.model_path), str(tmp_path)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    expected = [window(dataset[i]) for i in range(NUM_SAMPLES)]
    tokens = torch.arange(16).view(2, 8).tolist()
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["in_memory"] == expected
        assert result["cached"] == expected
        assert result["cp_tokens"] == [zigzag_by_hand(row, 2, rank) for row in tokens]
    assert any((tmp_path / "cache").rglob("*shuffle_index.npy"))


def _two_rank_worker(prefix: str, tokenizer_path: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    tokenizer = SentencePieceTokenizer(tokenizer_path)
    result = {}
    for mode, cache_dir in (("in_memory", None), ("cached", os.path.join(out_dir, "cache"))):
        built = build_gpt_dataset([prefix], SEQ_LENGTH, tokenizer, num_samples=NUM_SAMPLES, seed=1,
                                  cache_dir=cache_dir)
        result[mode] = [window(built[i]) for i in range(NUM_SAMPLES)]
    batch = {"tokens": torch.arange(16).view(2, 8)}
    result["cp_tokens"] = slice_for_context_parallel(batch, cp_group=torch.distributed.group.WORLD)["tokens"].tolist()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _two_rank_worker(*sys.argv[1:])
