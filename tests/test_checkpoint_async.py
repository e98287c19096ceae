"""Background checkpoint saves (checkpoint.async_save) on one CPU rank: the files equal a synchronous save's
even when training changes the weights while they are written, a failed write fails the wait and keeps the
previous checkpoint, and nothing of the save runs outside this process."""
import json
import threading

import pytest
import torch

from megatron_ext.checkpoint import writer
from megatron_ext.checkpoint.integrity import verify_checkpoint
from megatron_ext.checkpoint.store import find_checkpoint, load_checkpoint, save_checkpoint
from megatron_ext.checkpoint.writer import BackgroundSaves

from test_checkpoint import STATE, assert_same_parameters, build_training, parameters, train_step


@pytest.fixture(scope="module", autouse=True)
def parallel_state(single_rank):
    return single_rank


def save(root, iteration, training, **kwargs):
    model, optimizer, scheduler = training
    return save_checkpoint(root, iteration, model=model, optimizer=optimizer, scheduler=scheduler, state=STATE,
                           **kwargs)


def held_back_writes(monkeypatch) -> threading.Event:
    """Background writes start only once the returned event is set (training steps run before it)."""
    release = threading.Event()
    write = writer._write_buckets

    def held_back(*args):
        assert release.wait(timeout=60)
        write(*args)
    monkeypatch.setattr(writer, "_write_buckets", held_back)
    return release


@pytest.mark.parametrize("distributed", [False, True], ids=["adam", "distributed-adam"])
def test_a_background_save_writes_the_state_of_its_iteration_while_training_goes_on(tmp_path, monkeypatch,
                                                                                   distributed):
    training = build_training(seed=0, distributed=distributed)
    for index in (0, 1):
        train_step(*training, index)
    synchronous = save(tmp_path / "sync", 2, training)
    at_save = parameters(training[0])

    release = held_back_writes(monkeypatch)
    written_by_the_thread = {}
    describe = writer.describe_files

    def recording(directory, names):
        assert threading.current_thread() is not threading.main_thread()
        entries = describe(directory, names)
        written_by_the_thread.update(entries)
        return entries
    monkeypatch.setattr(writer, "describe_files", recording)
    background = BackgroundSaves()
    promised = save(tmp_path / "async", 2, training, background=background)
    after = [train_step(*training, index) for index in (2, 3)]  # the weights change while nothing is written
    assert background.in_flight and not promised.exists() and find_checkpoint(tmp_path / "async", "auto") is None
    release.set()
    background.wait()
    assert background.last == promised and not background.in_flight
    assert find_checkpoint(tmp_path / "async", "auto") == promised
    for shard in synchronous.glob("__*.distcp"):
        assert (promised / shard.name).read_bytes() == shard.read_bytes(), shard.name
    # the writer thread checksummed the shards: the manifest holds what an independent CRC-32 finds
    manifest = json.loads((promised / "manifest.json").read_text())["files"]
    assert {name: manifest[name] for name in written_by_the_thread} == written_by_the_thread
    assert verify_checkpoint(promised) == [] and set(written_by_the_thread) == {
        p.name for p in promised.glob("__*.distcp")}

    resumed = build_training(seed=1, distributed=distributed)
    load_checkpoint(promised, model=resumed[0], optimizer=resumed[1], scheduler=resumed[2])
    assert_same_parameters(resumed[0], at_save)
    assert [train_step(*resumed, index) for index in (2, 3)] == after


def test_the_next_save_completes_the_one_in_flight_first_and_keep_last_counts_both(tmp_path):
    training = build_training(seed=0, distributed=False)
    background = BackgroundSaves()
    for iteration in (1, 2, 3):
        train_step(*training, iteration)
        save(tmp_path, iteration, training, background=background, keep_last=2)
    assert background.last == tmp_path / "iter_0000002"  # the third is still in flight
    background.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000002", "iter_0000003", "latest"]
    assert (tmp_path / "latest").read_text().strip() == "iter_0000003"


def test_a_failed_background_write_fails_the_wait_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    training = build_training(seed=0, distributed=False)
    train_step(*training, 0)
    good = save(tmp_path, 1, training)
    train_step(*training, 1)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device (simulated)")
    background = BackgroundSaves()
    with monkeypatch.context() as patch:
        patch.setattr(FileSystemWriterAsync, "write_preloaded_data", staticmethod(disk_full))
        save(tmp_path, 2, training, background=background)
        with pytest.raises(OSError, match=r"iter_0000002 could not be written .*rank 0: \[Errno 28\] No space left on device.*latest names iter_0000001"):
            background.wait()
    assert find_checkpoint(tmp_path, "auto") == good
    assert (tmp_path / "latest").read_text().strip() == "iter_0000001"
    assert not (tmp_path / "megatron_ext.lock").exists()  # the save released the lock it took

    save(tmp_path, 3, training, background=background)  # the disk has room again
    background.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000001", "iter_0000003", "latest"]


def test_saves_start_no_process(tmp_path, monkeypatch):
    import multiprocessing

    started = []
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", lambda self: started.append(self))
    training = build_training(seed=0, distributed=False)
    train_step(*training, 0)
    background = BackgroundSaves()
    save(tmp_path / "async", 1, training, background=background)
    background.wait()
    save(tmp_path / "sync", 1, training)
    assert started == []
    assert torch.equal(*(torch.load(root / "iter_0000001" / "rng" / "rank_00000.pt", weights_only=True)["torch"]
                         for root in (tmp_path / "async", tmp_path / "sync")))
