"""keep_last and `latest` when things break (issue 30, cases 1 and 13; megatron_ext/checkpoint/retention.py, store.py,
layout.py): retention never removes the last older checkpoint that verifies while keeping only ones that do not,
and a save whose `latest` write fails leaves a checkpoint that `--resume auto` takes, says so, and is pruned as any.
"""
import errno
import logging
import shutil

import pytest

from megatron_ext.checkpoint import integrity, layout, retention, store
from megatron_ext.checkpoint.integrity import verify_checkpoint
from megatron_ext.checkpoint.layout import CheckpointUnverifiable, find_checkpoint, list_checkpoints
from test_checkpoint import STATE, build_model  # the tiny one-rank model
from test_checkpoint_integrity import a_shard, flip_bits


@pytest.fixture(scope="module", autouse=True)
def parallel_state(single_rank):
    return single_rank


def save(root, iteration, **kwargs):
    return store.save_checkpoint(root, iteration, model=[build_model(seed=iteration)], state=STATE, **kwargs)


def names(root):
    return [path.name for path in list_checkpoints(root)]


@pytest.fixture
def verified(monkeypatch):
    """The checkpoints retention reads (every call of its verification), in order."""
    calls = []
    check = retention._problems_collectively

    def counting(checkpoint):
        calls.append(checkpoint.name)
        return check(checkpoint)

    monkeypatch.setattr(retention, "_problems_collectively", counting)
    return calls


# --- case 1: retention keeps a checkpoint that verifies -------------------------------------------------------

def test_a_damaged_fallback_keeps_the_newest_older_checkpoint_that_verifies(tmp_path, caplog, verified):
    """The issue's fault: keep_last=2, a bit flipped in the retained iter_2, then the newest (iter_3) deleted. Before
    the fix the save of iter_3 had removed the intact iter_1 and --resume auto found nothing that verifies."""
    save(tmp_path, 1, keep_last=2)
    save(tmp_path, 2, keep_last=2)
    flip_bits(a_shard(tmp_path / "iter_0000002"))
    with caplog.at_level(logging.WARNING, logger="megatron_ext"):
        save(tmp_path, 3, keep_last=2)
    assert names(tmp_path) == ["iter_0000001", "iter_0000002", "iter_0000003"]  # iter_1 kept aside
    assert verified == ["iter_0000002", "iter_0000001"]
    assert "iter_0000002 (" in caplog.text and "CRC-32" in caplog.text and "Keeping iter_0000001 as well" in caplog.text

    shutil.rmtree(tmp_path / "iter_0000003")  # the newest lost
    assert find_checkpoint(tmp_path, "auto") == tmp_path / "iter_0000001"

    save(tmp_path, 3, keep_last=2)
    save(tmp_path, 4, keep_last=2)  # iter_3 verifies: a fallback again, so what is beyond keep_last goes
    assert names(tmp_path) == ["iter_0000003", "iter_0000004"]


def test_keep_last_reads_one_older_checkpoint_per_save_and_nothing_when_nothing_goes(tmp_path, verified):
    """The cost: with keep_last=2 each save that removes one reads the previous checkpoint (newest kept older one),
    once; the first two saves remove nothing and read nothing."""
    for iteration in range(1, 5):
        save(tmp_path, iteration, keep_last=2)
    assert verified == ["iter_0000002", "iter_0000003"]
    assert names(tmp_path) == ["iter_0000003", "iter_0000004"]


def test_keep_last_one_asks_for_no_fallback_and_reads_nothing(tmp_path, verified):
    save(tmp_path, 1, keep_last=1)
    flip_bits(a_shard(tmp_path / "iter_0000001"))
    save(tmp_path, 2, keep_last=1)
    save(tmp_path, 3, keep_last=1)
    assert verified == [] and names(tmp_path) == ["iter_0000003"]


def test_when_nothing_older_verifies_the_damaged_ones_beyond_keep_last_go(tmp_path, caplog):
    for iteration in (1, 2):
        save(tmp_path, iteration, keep_last=2)
        flip_bits(a_shard(tmp_path / f"iter_000000{iteration}"))
    with caplog.at_level(logging.WARNING, logger="megatron_ext"):
        save(tmp_path, 3, keep_last=2)
    assert names(tmp_path) == ["iter_0000002", "iter_0000003"]
    assert "None of the ones due for removal verifies either" in caplog.text


def test_a_save_older_than_the_newest_keeps_them_and_needs_one_of_them_to_verify(tmp_path, verified):
    """A resume that skipped a failing newer checkpoint saves below it: kept are the one just saved and the keep_last
    newest."""
    for iteration in (1, 2, 5, 6):
        save(tmp_path, iteration, keep_last=None)
    flip_bits(a_shard(tmp_path / "iter_0000006"))
    save(tmp_path, 3, keep_last=2)
    assert verified == ["iter_0000006", "iter_0000005"]
    assert names(tmp_path) == ["iter_0000003", "iter_0000005", "iter_0000006"]


# --- case 13: only the `latest` write fails ------------------------------------------------------------------

def fail_latest_writes(monkeypatch, times):
    """`latest`'s write fails with ENOSPC (a disk that filled up just then) the first `times` times."""
    failures = {"left": times}
    write = store._write_synced

    def write_or_fail(path, text):
        if path.name.startswith(layout.LATEST_FILE) and failures["left"] > 0:
            failures["left"] -= 1
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return write(path, text)

    monkeypatch.setattr(store, "_write_synced", write_or_fail)


def test_when_latest_cannot_be_written_the_save_says_the_checkpoint_is_there_and_resume_auto_takes_it(tmp_path,
                                                                                                       monkeypatch):
    save(tmp_path, 1, keep_last=2)
    fail_latest_writes(monkeypatch, times=99)
    with pytest.raises(store.LatestNotUpdated) as raised:
        save(tmp_path, 2, keep_last=2)
    message = str(raised.value)
    assert "Nothing else changed" not in message
    assert message.startswith(f"iter_0000002 was saved in checkpoint.dir ('{tmp_path}') and is complete, but "
                              "`latest` could not be pointed at it: [Errno 28] No space left on device")
    assert "The old `latest` (naming iter_0000001) was removed" in message
    assert "--resume auto takes the newest checkpoint that verifies, iter_0000002" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000001", "iter_0000002"]  # no latest.tmp- left
    assert verify_checkpoint(tmp_path / "iter_0000002") == []
    assert find_checkpoint(tmp_path, "auto") == tmp_path / "iter_0000002"

    monkeypatch.undo()  # space again: the next save moves `latest` and keep_last prunes as always
    save(tmp_path, 3, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000003", "latest"]


def test_a_latest_write_that_keep_last_makes_room_for_succeeds_on_the_second_try(tmp_path, monkeypatch, caplog):
    save(tmp_path, 1, keep_last=1)
    fail_latest_writes(monkeypatch, times=1)
    with caplog.at_level(logging.WARNING, logger="megatron_ext"):
        save(tmp_path, 2, keep_last=1)
    assert "could not be written at first" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000002", "latest"]
    assert (tmp_path / "latest").read_text() == "iter_0000002\n"


def test_resume_auto_takes_the_newest_that_verifies_when_latest_lags_behind(tmp_path, caplog):
    """The README's promise. Before the fix `latest` was tried first and won: iter_1, not iter_2."""
    save(tmp_path, 1)
    save(tmp_path, 2)
    (tmp_path / "latest").write_text("iter_0000001\n")  # what a failed `latest` write left before the fix
    with caplog.at_level(logging.WARNING, logger="megatron_ext"):
        assert find_checkpoint(tmp_path, "auto") == tmp_path / "iter_0000002"
        assert layout.resolve_checkpoint(tmp_path, setting="--model") == tmp_path / "iter_0000002"
    assert "latest names iter_0000001, and iter_0000002 is newer and verifies" in caplog.text
    flip_bits(a_shard(tmp_path / "iter_0000002"))
    integrity._verified.clear()  # this process verified it intact a moment ago (a resume reads once per process)
    assert find_checkpoint(tmp_path, "auto") == tmp_path / "iter_0000001"  # newest that verifies
    flip_bits(a_shard(tmp_path / "iter_0000001"))
    integrity._verified.clear()
    with pytest.raises(CheckpointUnverifiable):
        find_checkpoint(tmp_path, "auto")


def test_a_failed_write_says_where_resume_auto_goes_when_latest_lags(tmp_path):
    save(tmp_path, 1)
    save(tmp_path, 2)
    (tmp_path / "latest").write_text("iter_0000001\n")
    error = store.write_failed(tmp_path / "iter_0000003", OSError(errno.ENOSPC, "No space left on device"))
    assert "Nothing else changed: latest names iter_0000001, the newest complete checkpoint is iter_0000002" in str(
        error)


# --- several ranks ---------------------------------------------------------------------------------------------

def fake_checkpoint(root, iteration, files=4):
    """A complete checkpoint of `files` small files with its manifest, as far as retention can tell."""
    from megatron_ext.checkpoint.integrity import describe_files, write_manifest

    path = root / layout.checkpoint_name(iteration)
    path.mkdir(parents=True)
    for index in range(files):
        (path / f"__{index}_0.distcp").write_bytes(bytes([iteration, index]) * 512)
    write_manifest(path, describe_files(path, [f"__{index}_0.distcp" for index in range(files)]))
    (path / layout.COMPLETE_MARKER).write_text(path.name + "\n")
    return path


@pytest.mark.slow  # two torch processes: about 8 s
@pytest.mark.distributed
def test_two_ranks_share_the_verification_and_agree_on_what_to_keep(tmp_path):
    """Each rank reads half of a checkpoint's files; a damaged file in rank 1's half makes both keep iter_1 aside."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from conftest import _free_port

    for iteration in (1, 2, 3):
        fake_checkpoint(tmp_path, iteration)
    damaged = tmp_path / "iter_0000002" / "__1_0.distcp"  # sorted names: rank 1 checks __1 and __3
    damaged.write_bytes(b"\xff" + damaged.read_bytes()[1:])
    port = _free_port()
    worker = Path(__file__).with_name("retention_worker.py")
    ranks = [subprocess.Popen([sys.executable, str(worker), str(rank), "2", str(port), str(tmp_path), "iter_0000003",
                               "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [rank.communicate(timeout=120) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], [err[-2000:] for _, err in outputs]
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert reports[0]["removed"] == [] and reports[1]["removed"] == []  # iter_1 kept aside: nothing else is due
    assert reports[0]["read"] == {"iter_0000002": ["__0_0.distcp", "__2_0.distcp"],
                                  "iter_0000001": ["__0_0.distcp", "__2_0.distcp"]}
    assert reports[1]["read"] == {"iter_0000002": ["__1_0.distcp", "__3_0.distcp"],
                                  "iter_0000001": ["__1_0.distcp", "__3_0.distcp"]}
    assert names(tmp_path) == ["iter_0000001", "iter_0000002", "iter_0000003"]
