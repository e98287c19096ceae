"""Checkpoint integrity and safe loading (megatron_ext/checkpoint/integrity.py, lock.py, safe_metadata.py):
corrupt files are found by their manifest and skipped, `latest` and stray directories cannot mislead a
resume, two jobs cannot share a directory, and neither a crafted `.metadata` nor a tokenizer symlink makes
a load or a conversion run code or leak files.
"""
import json
import logging
import os
import pickle
import subprocess
import sys
import zlib

import pytest

from megatron_ext.checkpoint import layout, store
from megatron_ext.checkpoint.integrity import MANIFEST_FILE, CheckpointCorrupt, verify_checkpoint
from megatron_ext.checkpoint.layout import CheckpointUnverifiable, find_checkpoint, list_checkpoints
from megatron_ext.checkpoint.lock import LOCK_FILE, CheckpointDirLocked
from megatron_ext.checkpoint.safe_metadata import UnsafeCheckpointMetadata
from megatron_ext.checkpoint.state import CheckpointState
from megatron_ext.config import TrainConfig
from megatron_ext.errors import ConversionError
from test_checkpoint import STATE, build_model, parameters  # noqa: F401  (the tiny one-rank model)


@pytest.fixture(scope="module", autouse=True)
def parallel_state(single_rank):
    return single_rank


def save(root, iteration, **kwargs):
    return store.save_checkpoint(root, iteration, model=[build_model(seed=iteration)], state=STATE, **kwargs)


def flip_bits(path, count=4096):
    """XOR `count` bytes in the middle of a file: its size stays, its content does not."""
    data = bytearray(path.read_bytes())
    start = max(0, len(data) // 2 - count // 2)
    for index in range(start, min(len(data), start + count)):
        data[index] ^= 0xFF
    path.write_bytes(bytes(data))


def a_shard(checkpoint):
    return max(checkpoint.glob("__*.distcp"), key=lambda p: p.stat().st_size)


# --- the manifest ----------------------------------------------------------------------------------

def test_manifest_lists_every_file_with_its_size_and_crc32(tmp_path):
    path = save(tmp_path, 1)
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    on_disk = sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                     if p.is_file() and p.name not in ("complete", MANIFEST_FILE))
    assert manifest["checksum"] == "crc32" and sorted(manifest["files"]) == on_disk
    shard = a_shard(path)
    entry = manifest["files"][shard.name]
    assert entry["size"] == shard.stat().st_size
    assert entry["crc32"] == f"{zlib.crc32(shard.read_bytes()):08x}"  # an independent one-shot CRC


def test_a_bit_flipped_shard_is_refused_and_auto_resumes_from_the_previous_checkpoint(tmp_path, caplog):
    good = save(tmp_path, 1)
    bad = save(tmp_path, 2)
    flip_bits(a_shard(bad))
    assert any("CRC-32" in problem for problem in verify_checkpoint(bad))
    with pytest.raises(CheckpointCorrupt, match="checkpoint.resume .*iter_0000002.*CRC-32"):
        store.load_checkpoint(bad, model=[build_model(seed=9)])
    with pytest.raises(CheckpointCorrupt):
        find_checkpoint(tmp_path, str(bad))
    with caplog.at_level(logging.WARNING, logger="megatron_ext"):
        assert find_checkpoint(tmp_path, "auto") == good
    assert "skipped" in caplog.text and "iter_0000002 (" in caplog.text
    store.load_checkpoint(bad, model=[build_model(seed=9)], verify=False)  # asked for: loads anyway


def test_a_truncated_shard_is_refused(tmp_path):
    path = save(tmp_path, 1)
    shard = a_shard(path)
    shard.write_bytes(shard.read_bytes()[:100])
    assert verify_checkpoint(path) == [f"{shard.name}: 100 bytes, the save wrote "
                                       f"{json.loads((path / MANIFEST_FILE).read_text())['files'][shard.name]['size']}"]


def test_auto_refuses_to_start_from_scratch_while_only_corrupt_checkpoints_exist(tmp_path):
    flip_bits(a_shard(save(tmp_path, 1)))
    with pytest.raises(CheckpointUnverifiable, match="--resume none"):
        find_checkpoint(tmp_path, "auto")
    assert find_checkpoint(tmp_path, "auto", verify=False) == tmp_path / "iter_0000001"


def test_a_checkpoint_without_manifest_loads_with_a_warning(tmp_path, caplog):
    path = save(tmp_path, 1)
    (path / MANIFEST_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="megatron_ext"):
        assert find_checkpoint(tmp_path, "auto") == path
    assert "no manifest.json" in caplog.text


# --- what counts as a checkpoint -------------------------------------------------------------------

def test_a_stray_directory_with_only_megatrons_metadata_is_not_complete(tmp_path):
    good = save(tmp_path, 1)
    stray = tmp_path / "iter_0000009"
    stray.mkdir()
    (stray / "metadata.json").write_text("{}")
    assert not layout.is_complete_checkpoint(stray)
    assert list_checkpoints(tmp_path) == [good]
    assert find_checkpoint(tmp_path, "auto") == good


@pytest.mark.parametrize("latest", ["binary", "directory", "outside", "parent"])
def test_a_bad_latest_is_ignored_with_a_warning(tmp_path, caplog, latest):
    save(tmp_path, 1)
    newest = save(tmp_path, 2)
    (tmp_path / "latest").unlink()
    outside = tmp_path.parent / f"{tmp_path.name}-elsewhere" / "iter_0000005"
    if latest == "binary":
        (tmp_path / "latest").write_bytes(b"\xff\xfe\x00garbage\x80")
    elif latest == "directory":
        (tmp_path / "latest").mkdir()
    elif latest == "outside":
        (tmp_path / "latest").write_text(str(outside))
    else:
        (tmp_path / "latest").write_text("../iter_0000001")
    with caplog.at_level(logging.WARNING, logger="megatron_ext"):
        assert find_checkpoint(tmp_path, "auto") == newest
        assert layout.resolve_checkpoint(tmp_path, setting="--model") == newest
    assert "ignoring" in caplog.text and "latest" in caplog.text


# --- saving ----------------------------------------------------------------------------------------

def test_stale_staging_is_removed_before_the_save_writes(tmp_path, monkeypatch):
    stale = tmp_path / "iter_0000001.tmp-12345-deadbeef"
    stale.mkdir()
    (stale / "__0_0.distcp").write_bytes(os.urandom(1 << 20))  # what filled the disk last time
    present_while_writing = []
    write_tensors = store._write_tensors

    def recording(*args, **kwargs):
        present_while_writing.append(stale.exists())
        return write_tensors(*args, **kwargs)
    monkeypatch.setattr(store, "_write_tensors", recording)
    save(tmp_path, 2)
    assert present_while_writing == [False]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000002", "latest"]


def _finished_process_id() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_second_job_is_refused_and_a_dead_jobs_lock_is_taken_over(tmp_path, caplog):
    import socket
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": live.pid}))
        with pytest.raises(CheckpointDirLocked, match=f"in use by process {live.pid}"):
            save(tmp_path, 1)
        assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]  # nothing written, nothing removed
    finally:
        live.kill()
        live.wait()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": _finished_process_id()}))
    with caplog.at_level(logging.WARNING, logger="megatron_ext"):
        save(tmp_path, 1)
    assert "taking over" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000001", "latest"]  # released after the save


# --- crafted .metadata runs nothing ----------------------------------------------------------------

class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _tiny_config() -> TrainConfig:
    config = TrainConfig()
    m = config.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups, m.ffn_hidden_size = 2, 32, 4, 2, 48
    m.vocab_size, m.seq_length = 64, 16
    return config


def crafted_checkpoint(root, marker):
    """A complete-looking iter_ directory (marker, megatron_ext.json, no manifest) whose .metadata runs code."""
    path = root / "iter_0000001"
    path.mkdir(parents=True)
    state = CheckpointState.of_run(_tiny_config(), iteration=1, padded_vocab_size=64, tokenizer_model=None,
                                   tokenizer_vocab_size=None, parallel={})
    summary = {"format_version": 1, "iteration": 1, "optimizer": None, "scheduler": None,
               "sharding_metadata": {"chained_optim_avoid_prefix": True, "singleton_local_shards": False,
                                     "distrib_optim_sharding_type": "fully_reshardable"},
               "parallel_layout": {"world_size": 1}, "state": state.to_json()}
    (path / "megatron_ext.json").write_text(json.dumps(summary))
    (path / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    (path / "complete").write_text(path.name)
    return path


def test_crafted_metadata_runs_nothing_in_load_checkpoint(tmp_path):
    marker = tmp_path / "pwned"
    path = save(tmp_path / "ckpt", 1)
    (path / MANIFEST_FILE).unlink()  # as an old checkpoint: loads unverified, so only the unpickler stands guard
    (path / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(UnsafeCheckpointMetadata, match="posix.system is not a checkpoint metadata class"):
        store.load_checkpoint(path, model=[build_model(seed=0)])
    assert not marker.exists()


def test_crafted_metadata_runs_nothing_in_mcore_to_hf_and_inspect(tmp_path, capsys):
    import runpy

    from megatron_ext.convert.to_hf import mcore_to_hf

    marker = tmp_path / "pwned"
    path = crafted_checkpoint(tmp_path / "ckpt", marker)
    with pytest.raises(UnsafeCheckpointMetadata):
        mcore_to_hf(path, tmp_path / "hf")
    assert not marker.exists() and not (tmp_path / "hf").exists()
    inspect = runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "tools", "inspect_checkpoint.py"))["main"]
    assert inspect([str(path)]) == 2
    assert "not plain checkpoint metadata" in capsys.readouterr().err
    assert not marker.exists()


def with_crafted_object_blob(path, marker):
    """Point one of the checkpoint's object blobs (a layer's _extra_state) at a pickle that runs code, appended
    to its .distcp file; .metadata stays plain metadata."""
    import io

    import torch
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = pickle.loads((path / ".metadata").read_bytes())
    index, info = next((i, v) for i, v in metadata.storage_data.items()
                       if isinstance(metadata.state_dict_metadata[i.fqn], BytesStorageMetadata))
    blob = io.BytesIO()
    torch.save(_RunsCode(marker), blob)
    shard = path / info.relative_path
    offset = shard.stat().st_size
    with open(shard, "ab") as handle:
        handle.write(blob.getvalue())
    metadata.storage_data[index] = type(info)(relative_path=info.relative_path, offset=offset,
                                              length=len(blob.getvalue()))
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    return index.fqn, blob.getvalue()


def test_a_crafted_object_blob_runs_nothing_in_load_checkpoint_and_mcore_to_hf(tmp_path):
    import io

    import torch

    from megatron_ext.convert.to_hf import mcore_to_hf

    marker = tmp_path / "pwned"
    state = CheckpointState.of_run(_tiny_config(), iteration=1, padded_vocab_size=64, tokenizer_model=None,
                                   tokenizer_vocab_size=None, parallel={})
    path = store.save_checkpoint(tmp_path / "ckpt", 1, model=[build_model(seed=0)], state=state.to_json())
    fqn, blob = with_crafted_object_blob(path, marker)
    (path / MANIFEST_FILE).unlink()  # as an old checkpoint: loads unverified, so only the vetting stands guard
    for load in (lambda: store.load_checkpoint(path, model=[build_model(seed=0)]),
                 lambda: mcore_to_hf(path, tmp_path / "hf")):
        with pytest.raises(UnsafeCheckpointMetadata, match=f"object '{fqn}' at byte .* is not plain data"):
            load()
        assert not marker.exists()
    torch.load(io.BytesIO(blob), weights_only=False)  # what torch's load planner would have done with it
    assert marker.exists()


def test_metadata_pointing_outside_the_checkpoint_is_refused(tmp_path):
    path = save(tmp_path / "ckpt", 1)
    metadata = pickle.loads((path / ".metadata").read_bytes())
    index, info = next(iter(metadata.storage_data.items()))
    metadata.storage_data[index] = type(info)(relative_path="../../secret", offset=0, length=8)
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(UnsafeCheckpointMetadata, match="outside the checkpoint directory"):
        store.load_checkpoint(path, model=[build_model(seed=0)], verify=False)


def test_real_metadata_reads_through_the_allow_list(tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    from megatron_ext.checkpoint.safe_metadata import SafeFileSystemReader

    path = save(tmp_path, 1)
    ours, torchs = SafeFileSystemReader(str(path)).read_metadata(), FileSystemReader(str(path)).read_metadata()
    assert ours.state_dict_metadata == torchs.state_dict_metadata


def test_enum_members_pickled_by_name_read_through_the_allow_list():
    """Python 3.11.2 (Debian 12, the CPU image) pickles WriteItemType.TENSOR as getattr(WriteItemType, 'TENSOR'):
    such metadata loads, and getattr reaches nothing but members of allowed enums."""
    from pathlib import PosixPath

    from torch.distributed.checkpoint.planner import WriteItemType

    from megatron_ext.checkpoint.safe_metadata import load_dcp_metadata

    class ByName:
        def __init__(self, owner, name):
            self.owner, self.name = owner, name

        def __reduce__(self):
            return getattr, (self.owner, self.name)

    assert load_dcp_metadata(pickle.dumps([ByName(WriteItemType, "TENSOR")]), "m") == [WriteItemType.TENSOR]
    for owner, name in ((PosixPath, "home"), (WriteItemType, "__class__"), (WriteItemType, "_missing_")):
        with pytest.raises(UnsafeCheckpointMetadata, match="is not a member of an enum"):
            load_dcp_metadata(pickle.dumps(ByName(owner, name)), "m")


# --- tokenizer symlinks ------------------------------------------------------------------------------

def test_a_tokenizer_symlink_leaving_the_source_is_refused(tmp_path):
    from megatron_ext.convert.hf_io import copy_tokenizer_files
    from megatron_ext.convert.hf_tokenizer import export_tokenizer

    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0")
    source = tmp_path / "model"
    source.mkdir()
    (source / "tokenizer_config.json").write_text("{}")
    (source / "tokenizer.json").symlink_to(secret)
    with pytest.raises(ConversionError, match="outside"):
        copy_tokenizer_files(source, tmp_path / "out")
    with pytest.raises(ConversionError, match="outside"):
        export_tokenizer(source / "tokenizer.json", tmp_path)
    assert not (tmp_path / "out").exists() and not (tmp_path / "tokenizer.model").exists()
    (source / "tokenizer.json").unlink()
    (source / "tokenizer.json").symlink_to(source / "tokenizer_config.json")  # inside: fine
    assert copy_tokenizer_files(source, tmp_path / "out") == ["tokenizer.json", "tokenizer_config.json"]
