"""PoSE position ids: the guarantees, determinism across processes, the released code's ranges, coverage."""

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron_ext.rope.pose import (
    POSE_VARIANTS,
    pose_chunks,
    pose_content_indices,
    pose_document_position_ids,
    pose_position_ids,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = [("code", 2), ("paper", 2), ("paper", 3), ("paper", 5)]


@pytest.mark.parametrize("variant, num_chunks", SETTINGS)
@pytest.mark.parametrize("seq_length, target_length", [(5, 5), (5, 6), (64, 1024), (100, 131072)])
def test_ids_increase_strictly_from_zero_and_stay_below_target(variant, num_chunks, seq_length, target_length):
    for seed in (0, 7):
        for sample_index in range(100):
            kwargs = dict(seed=seed, sample_index=sample_index, num_chunks=num_chunks, variant=variant)
            ids = pose_position_ids(seq_length, target_length, **kwargs)
            assert ids.dtype == torch.long and ids.shape == (seq_length,)
            assert ids[0] == 0 and ids[-1] < target_length
            assert (ids[1:] > ids[:-1]).all()


@pytest.mark.parametrize("variant, num_chunks", SETTINGS)
def test_target_equal_to_seq_length_gives_arange(variant, num_chunks):
    ids = pose_position_ids(16, 16, seed=3, sample_index=11, num_chunks=num_chunks, variant=variant)
    assert ids.tolist() == list(range(16))


@pytest.mark.slow
def test_same_ids_in_another_process():
    cases = list(itertools.product((0, 12345), (0, 1, 987654321), POSE_VARIANTS))  # (seed, sample_index, variant)
    script = (
        "import json, sys\n"
        "from megatron_ext.rope.pose import pose_position_ids\n"
        "cases = json.loads(sys.argv[1])\n"
        "print(json.dumps([pose_position_ids(256, 32768, seed=s, sample_index=i, num_chunks=2, variant=v).tolist()"
        " for s, i, v in cases]))\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, "-c", script, json.dumps(cases)], capture_output=True, text=True, env=env, cwd=REPO_ROOT,
        check=True,
    )
    there = json.loads(result.stdout)
    here = [pose_position_ids(256, 32768, seed=s, sample_index=i, variant=v).tolist() for s, i, v in cases]
    assert there == here


@pytest.mark.parametrize("variant, num_chunks", SETTINGS)
def test_different_samples_and_seeds_get_different_ids(variant, num_chunks):
    def ids(seed, sample_index):
        return tuple(
            pose_position_ids(
                2048, 131072, seed=seed, sample_index=sample_index, num_chunks=num_chunks, variant=variant
            ).tolist()
        )

    assert len({ids(0, i) for i in range(50)}) == 50
    assert ids(0, 5) != ids(1, 5)


def test_code_variant_draws_the_released_code_ranges():
    # train_pose.py: r1 = randint(1, (L+1)//2), u = randint(0, L_t - L), both ends included.
    seq_length, target_length = 8, 12
    chunks = [pose_chunks(seq_length, target_length, seed=0, sample_index=i) for i in range(500)]
    assert {c.lengths[0] for c in chunks} == {1, 2, 3, 4}
    assert {c.position_skips for c in chunks} == {(0, u) for u in range(5)}
    assert all(sum(c.lengths) == seq_length for c in chunks)


def test_paper_variant_draws_the_papers_ranges():
    # Appendix Figure 6 (3 chunks): l0 = randint(1, L-2), l1 = randint(1, L-l0-1), l2 = rest;
    # u1 = randint(0, L_t-L), u2 = randint(u1, L_t-L).
    seq_length, target_length = 6, 9
    draw = dict(seed=0, num_chunks=3, variant="paper")
    chunks = [pose_chunks(seq_length, target_length, sample_index=i, **draw) for i in range(2000)]
    assert {c.lengths[0] for c in chunks} == {1, 2, 3, 4}
    assert all(min(c.lengths) >= 1 and sum(c.lengths) == seq_length for c in chunks)
    assert {c.position_skips for c in chunks} == {(0, u1, u2) for u1 in range(4) for u2 in range(u1, 4)}


@pytest.mark.parametrize("variant", ["code", "paper"])
def test_every_relative_distance_bucket_is_covered(variant, record_property):
    seq_length, target_length, bucket_width, num_samples = 64, 1024, 64, 2000
    hits = np.zeros(target_length // bucket_width, dtype=np.int64)
    for sample_index in range(num_samples):
        ids = pose_position_ids(seq_length, target_length, seed=0, sample_index=sample_index, variant=variant)
        ids = ids.numpy()
        distances = (ids[None, :] - ids[:, None])[np.triu_indices(seq_length, k=1)]
        hits[np.unique(distances // bucket_width)] += 1
    print(f"\n{variant}: samples hitting each {bucket_width}-wide distance bucket: {hits.tolist()}")
    record_property(f"bucket_hits_{variant}", hits.tolist())
    assert (hits > 0).all()


@pytest.mark.parametrize("variant, num_chunks", SETTINGS)
def test_content_indices_take_contiguous_spans_per_chunk(variant, num_chunks):
    document_length, seq_length, target_length = 300, 64, 1024
    for sample_index in range(50):
        kwargs = dict(seed=1, sample_index=sample_index, num_chunks=num_chunks, variant=variant)
        indices = pose_content_indices(document_length, seq_length, target_length, **kwargs)
        chunks = pose_chunks(seq_length, target_length, **kwargs)
        assert indices[0] == 0 and indices[-1] < document_length and (indices[1:] > indices[:-1]).all()
        jumps = (indices[1:] - indices[:-1] != 1).nonzero().flatten() + 1
        assert set(jumps.tolist()) <= set(chunks.starts[1:])  # content skips only at chunk starts
    whole_document = pose_content_indices(seq_length, seq_length, target_length, **kwargs)
    assert whole_document.tolist() == list(range(seq_length))


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(seq_length=8192, target_length=4096), r"target_length \(4096\) must be >= seq_length \(8192\)"),
        (dict(seq_length=1, variant="paper", num_chunks=2), r"seq_length \(1\) must be >= num_chunks \(2\)"),
        (dict(num_chunks=0, variant="paper"), r"num_chunks \(0\) must be >= 1"),
        (dict(num_chunks=3), r"num_chunks \(3\) must be 2 for variant='code'.*variant='paper'"),
        (dict(variant="skipos"), "variant 'skipos' is unknown"),
        (dict(seed=-1), r"seed \(-1\)"),
    ],
)
def test_bad_settings_are_named(settings, message):
    call = dict(seq_length=64, target_length=1024, seed=0, sample_index=0) | settings
    with pytest.raises(ValueError, match=message):
        pose_position_ids(call.pop("seq_length"), call.pop("target_length"), **call)


def test_document_shorter_than_window_is_an_error():
    with pytest.raises(ValueError, match=r"document_length \(10\) is shorter than seq_length \(64\)"):
        pose_content_indices(10, 64, 1024, seed=0, sample_index=0)


# ----------------------------------------------------------------------------- packed documents


def document_ids_of(lengths) -> torch.Tensor:
    return torch.cat([torch.full((length,), index) for index, length in enumerate(lengths)])


@pytest.mark.parametrize("variant, num_chunks", SETTINGS)
def test_packed_documents_restart_at_zero_and_stay_below_target(variant, num_chunks):
    rng = np.random.default_rng(0)
    seq_length, target_length = 64, 1024
    for sample_index in range(50):
        cuts = np.sort(rng.choice(np.arange(1, seq_length), size=rng.integers(0, 6), replace=False))
        lengths = np.diff([0, *cuts, seq_length]).tolist()
        ids = pose_document_position_ids(document_ids_of(lengths), target_length, seed=3, sample_index=sample_index,
                                         num_chunks=num_chunks, variant=variant)
        assert ids.shape == (seq_length,)
        for start, length in zip(np.cumsum([0, *lengths[:-1]]), lengths):
            document = ids[start:start + length]
            assert document[0] == 0 and document[-1] < target_length and (document[1:] > document[:-1]).all()
            if length < num_chunks:  # no room for a skip
                assert document.tolist() == list(range(length))


def test_each_document_draws_its_own_skips_whatever_its_neighbours():
    """Keyed by (seed, sample index, document index): the draw of document 2 does not depend on the lengths of
    documents 0 and 1, documents of equal length get different skips, and a one-document window gets the ids
    of an unpacked window."""
    draw = dict(seed=3, sample_index=17)

    def documents(lengths):
        ids = pose_document_position_ids(document_ids_of(lengths), 4096, **draw)
        return torch.split(ids, lengths)

    assert torch.equal(documents([10, 30, 24])[2], documents([20, 20, 24])[2])
    assert len({tuple(ids.tolist()) for ids in documents([16, 16, 16, 16])}) == 4
    assert torch.equal(documents([64])[0], pose_position_ids(64, 4096, **draw))


@pytest.mark.slow
def test_same_document_ids_in_another_process():
    lengths = [100, 3, 1, 152]
    script = (
        "import json, sys, torch\n"
        "from megatron_ext.rope.pose import pose_document_position_ids\n"
        "lengths = json.loads(sys.argv[1])\n"
        "ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])\n"
        "print(json.dumps(pose_document_position_ids(ids, 32768, seed=5, sample_index=987654321).tolist()))\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", script, json.dumps(lengths)], capture_output=True, text=True,
                            env=env, cwd=REPO_ROOT, check=True)
    here = pose_document_position_ids(document_ids_of(lengths), 32768, seed=5, sample_index=987654321)
    assert json.loads(result.stdout) == here.tolist()


@pytest.mark.parametrize("document_ids", [[1, 1, 2], [0, 0, 2], [0, 1, 0], []])
def test_document_ids_must_number_runs_from_zero(document_ids):
    with pytest.raises(ValueError, match="numbered from 0 without gaps"):
        pose_document_position_ids(torch.tensor(document_ids, dtype=torch.long), 1024, seed=0, sample_index=0)
