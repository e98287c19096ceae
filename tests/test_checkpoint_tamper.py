"""Checkpoints whose files were replaced, swapped during the load, or whose megatron_ext.json points elsewhere
(issue 30, cases 7, 11, 12): a replaced file ends in one CheckpointError naming it; a `.metadata` or object blob
swapped after it was vetted never reaches an unpickler that runs code (the vetted bytes load, or the load is
refused); recorded tokenizer paths are copied into an export only from inside the checkpoint, only as regular
files of bounded size.
"""
import io
import json
import pickle
import random

import pytest

from megatron_ext.checkpoint import store
from megatron_ext.checkpoint.integrity import checkpoint_files, describe_files, write_manifest
from megatron_ext.checkpoint.layout import CheckpointError
from megatron_ext.checkpoint.state import CheckpointState
from test_checkpoint import build_model
from test_checkpoint_integrity import _RunsCode, _tiny_config


@pytest.fixture(scope="module", autouse=True)
def parallel_state(single_rank):
    return single_rank


def save(root, seed=0, tokenizer_model=None, hf=None):
    """A one-rank checkpoint of the tiny model that mcore_to_hf can export too."""
    state = CheckpointState.of_run(_tiny_config(), iteration=1, padded_vocab_size=64, tokenizer_model=tokenizer_model,
                                   tokenizer_vocab_size=None, parallel={}, hf=hf)
    return store.save_checkpoint(root, 1, model=[build_model(seed=seed)], state=state.to_json())


def rewrite_manifest(path):
    """What someone with write access does after replacing a file: a manifest that matches it again."""
    write_manifest(path, describe_files(path, checkpoint_files(path)))


def object_blobs(path):
    """{relative file: [(fqn, offset, length)]} of the object blobs (megatron's ShardedObjects) `.metadata` lists."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = pickle.loads((path / ".metadata").read_bytes())
    blobs = {}
    for index, info in metadata.storage_data.items():
        if isinstance(metadata.state_dict_metadata[index.fqn], BytesStorageMetadata):
            blobs.setdefault(str(info.relative_path), []).append((index.fqn, info.offset, info.length))
    return blobs


def weights(model):
    return {name: tensor.clone() for name, tensor in model.state_dict().items() if "_extra_state" not in name}


def assert_one_line_naming(error, file):
    message = str(error.value)
    assert str(file) in message and "\n" not in message, message


# --- case 7: a file replaced by another one whose manifest matches it ---------------------------------------------

def test_a_shard_whose_tensors_were_replaced_is_named_in_one_line_by_load_and_convert(tmp_path):
    from megatron_ext.convert.to_hf import mcore_to_hf

    path = save(tmp_path / "ckpt")
    blobs = object_blobs(path)
    shard = path / max(blobs, key=lambda name: (path / name).stat().st_size)
    data = shard.read_bytes()
    tensors_start = max(offset + length for _, offset, length in blobs[shard.name])
    shard.write_bytes(data[:tensors_start] + random.Random(7).randbytes(len(data) - tensors_start))  # objects intact
    rewrite_manifest(path)
    with pytest.raises(CheckpointError, match="cannot be read .*it is damaged or is not the file the save wrote") \
            as error:
        store.load_checkpoint(path, model=[build_model(seed=1)])
    assert_one_line_naming(error, shard)
    with pytest.raises(CheckpointError, match="cannot be read") as error:
        mcore_to_hf(path, tmp_path / "hf")
    assert_one_line_naming(error, shard)
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("name", ["common.pt", "metadata.json", "rng/rank_00000.pt"])
@pytest.mark.parametrize("replacement", ["random bytes", "another checkpoint file"])
def test_a_replaced_common_metadata_or_rng_file_is_named_in_one_line(tmp_path, name, replacement):
    path = save(tmp_path / "ckpt")
    other = {"common.pt": "rng/rank_00000.pt"}.get(name, "common.pt")
    (path / name).write_bytes(random.Random(3).randbytes(4000) if replacement == "random bytes"
                              else (path / other).read_bytes())
    rewrite_manifest(path)
    with pytest.raises(CheckpointError, match="cannot be read|holds no megatron_ext state") as error:
        store.load_checkpoint(path, model=[build_model(seed=1)])
    assert_one_line_naming(error, path / name)


def test_a_shard_replaced_by_another_file_is_refused_in_one_line_naming_it(tmp_path):
    from megatron_ext.convert.to_hf import mcore_to_hf

    path = save(tmp_path / "ckpt")
    shard = path / sorted(object_blobs(path))[0]
    shard.write_bytes((path / "common.pt").read_bytes())
    rewrite_manifest(path)
    for load in (lambda: store.load_checkpoint(path, model=[build_model(seed=1)]),
                 lambda: mcore_to_hf(path, tmp_path / "hf")):
        with pytest.raises(CheckpointError) as error:
            load()
        assert_one_line_naming(error, shard)


def test_metadata_of_allowed_classes_in_another_shape_or_random_bytes_is_refused_in_one_line(tmp_path):
    from collections import OrderedDict

    from megatron_ext.checkpoint.safe_metadata import SafeFileSystemReader, UnsafeCheckpointMetadata

    path = save(tmp_path / "ckpt")
    payloads = [pickle.dumps(OrderedDict(a=1)), pickle.dumps(__import__("torch").Size([3]))]
    payloads += [random.Random(seed).randbytes(256) for seed in range(40)]
    for payload in payloads:
        (path / ".metadata").write_bytes(payload)
        with pytest.raises(UnsafeCheckpointMetadata) as error:
            SafeFileSystemReader(str(path)).read_metadata()
        assert_one_line_naming(error, path / ".metadata")


# --- case 11: files swapped between the vetting and the load -------------------------------------------------------

@pytest.fixture
def swap_metadata_after_vetting(monkeypatch):
    """Replace a checkpoint's `.metadata` with a pickle that runs code right after the allow-list vetted it once:
    the race a writer to the checkpoint directory could win. Returns the list of swaps made."""
    from megatron_ext.checkpoint import safe_metadata

    vet, swaps = safe_metadata.load_dcp_metadata, []

    def vet_then_swap(data, where):
        metadata = vet(data, where)
        if not swaps:
            marker = f"{where}.pwned"
            with open(where, "wb") as handle:
                handle.write(pickle.dumps(_RunsCode(marker)))
            swaps.append(marker)
        return metadata

    monkeypatch.setattr(safe_metadata, "load_dcp_metadata", vet_then_swap)
    return swaps


def test_metadata_swapped_after_vetting_runs_nothing_and_the_vetted_metadata_loads(tmp_path,
                                                                                    swap_metadata_after_vetting):
    import os

    path = save(tmp_path / "ckpt", seed=0)
    model = build_model(seed=1)
    store.load_checkpoint(path, model=[model])
    assert swap_metadata_after_vetting, "the swap never happened: the test does not exercise the race"
    assert not os.path.exists(swap_metadata_after_vetting[0])
    expected = weights(build_model(seed=0))
    assert all((weights(model)[name] == tensor).all() for name, tensor in expected.items())


def test_metadata_swapped_after_vetting_runs_nothing_in_mcore_to_hf(tmp_path, swap_metadata_after_vetting):
    import os

    from megatron_ext.convert.to_hf import mcore_to_hf

    path = save(tmp_path / "ckpt", seed=0)
    out = mcore_to_hf(path, tmp_path / "hf")
    assert swap_metadata_after_vetting and not os.path.exists(swap_metadata_after_vetting[0])
    assert (out / "config.json").is_file()


def _crafted_blob_of_length(length, marker) -> bytes:
    """torch.save of an object that runs code, padded to exactly `length` bytes (the slot `.metadata` gives)."""
    import torch

    class RunsCode:
        def __init__(self, padding):
            self.padding = padding

        def __reduce__(self):
            import os
            return os.system, (f"touch {marker} #{'x' * self.padding}",)

    for padding in range(4 * length):
        blob = io.BytesIO()
        torch.save(RunsCode(padding), blob)
        if len(blob.getvalue()) == length:
            return blob.getvalue()
    raise AssertionError(f"no crafted blob of {length} bytes")


def test_an_object_blob_swapped_after_vetting_runs_nothing(tmp_path, monkeypatch):
    from megatron_ext.checkpoint import safe_metadata

    path = save(tmp_path / "ckpt")
    name, entries = sorted(object_blobs(path).items())[0]
    fqn, offset, length = entries[0]
    monkeypatch.chdir(tmp_path)  # a short command fits the slot of a small blob
    marker = tmp_path / "pwned"
    crafted = _crafted_blob_of_length(length, marker.name)
    vet, swaps = safe_metadata._check_storage, []

    def vet_then_swap(checkpoint, metadata):
        vet(checkpoint, metadata)
        if not swaps:
            with open(path / name, "r+b") as handle:
                handle.seek(offset)
                handle.write(crafted)
            swaps.append(name)

    monkeypatch.setattr(safe_metadata, "_check_storage", vet_then_swap)
    with pytest.raises(safe_metadata.UnsafeCheckpointMetadata, match=f"object '{fqn}' at byte {offset}.* is not plain"):
        store.load_checkpoint(path, model=[build_model(seed=1)], verify=False)
    assert swaps and not marker.exists()


# --- case 12: paths megatron_ext.json records ------------------------------------------------------------------------

TOKENIZER_FILES = {"tokenizer/tokenizer_config.json": b'{"tokenizer_class": "PreTrainedTokenizerFast"}',
                   "tokenizer/tokenizer.json": b'{"model": {"type": "BPE", "vocab": {}, "merges": []}}'}


def save_with_tokenizer(root):
    """A checkpoint carrying its tokenizer in its own tokenizer/ (as trained and converted ones do)."""
    state = CheckpointState.of_run(_tiny_config(), iteration=1, padded_vocab_size=64, tokenizer_model="tokenizer",
                                   tokenizer_vocab_size=None, parallel={}, hf={"tokenizer_dir": "tokenizer"})
    return store.save_checkpoint(root, 1, model=[build_model(seed=0)], state=state.to_json(),
                                 extra_files=TOKENIZER_FILES)


def edit_state(path, **changes):
    """Rewrite megatron_ext.json's state, then the manifest to match it (write access to the checkpoint)."""
    summary = json.loads((path / "megatron_ext.json").read_text())
    for key, value in changes.items():
        owner = summary["state"]
        *parents, name = key.split(".")
        for parent in parents:
            owner = owner[parent]
        owner[name] = value
    (path / "megatron_ext.json").write_text(json.dumps(summary))
    rewrite_manifest(path)


@pytest.fixture
def secret(tmp_path):
    """A directory outside the checkpoint holding a file nobody meant to export."""
    directory = tmp_path / "secret"
    directory.mkdir()
    (directory / "tokenizer.json").write_text("SECRET")
    (directory / "secret.txt").write_text("SECRET")
    return directory


def exported_anything_secret(out) -> bool:
    return out.exists() and any(b"SECRET" in file.read_bytes() for file in out.rglob("*") if file.is_file())


def test_the_checkpoints_own_tokenizer_is_exported(tmp_path):
    from megatron_ext.convert.to_hf import mcore_to_hf

    out = mcore_to_hf(save_with_tokenizer(tmp_path / "ckpt"), tmp_path / "hf")
    assert (out / "tokenizer.json").read_bytes() == TOKENIZER_FILES["tokenizer/tokenizer.json"]


@pytest.mark.parametrize("key", ["hf.tokenizer_dir", "tokenizer_model"])
def test_a_relative_record_leading_out_of_the_checkpoint_is_refused_by_name(tmp_path, secret, key):
    from megatron_ext.convert.to_hf import mcore_to_hf

    path = save_with_tokenizer(tmp_path / "ckpt")
    edit_state(path, **({"hf.tokenizer_dir": "../../secret"} if key == "hf.tokenizer_dir" else
                        {"tokenizer_model": "../../secret/secret.txt", "hf": None}))
    with pytest.raises(CheckpointError, match=f"records state.{key}: '../../secret.*', outside the checkpoint"):
        mcore_to_hf(path, tmp_path / "hf")
    assert not exported_anything_secret(tmp_path / "hf")


def test_an_absolute_record_outside_the_checkpoint_is_refused_unless_named_on_the_command_line(tmp_path, secret):
    from megatron_ext.convert.to_hf import mcore_to_hf
    from megatron_ext.errors import ConversionError

    path = save_with_tokenizer(tmp_path / "ckpt")
    edit_state(path, tokenizer_model=str(secret / "secret.txt"), hf=None)
    with pytest.raises(ConversionError, match=f"outside the checkpoint.*name it yourself: --tokenizer {secret}"):
        mcore_to_hf(path, tmp_path / "hf")
    assert not exported_anything_secret(tmp_path / "hf")
    out = mcore_to_hf(path, tmp_path / "hf", tokenizer=secret)  # the user's own choice: exported as asked
    assert (out / "tokenizer.json").read_text() == "SECRET"


def test_a_device_recorded_as_the_tokenizer_is_refused(tmp_path):
    from megatron_ext.convert.to_hf import mcore_to_hf

    path = save_with_tokenizer(tmp_path / "ckpt")
    edit_state(path, tokenizer_model="/dev/zero", hf=None)  # copied, it filled the disk
    with pytest.raises(CheckpointError, match="state.tokenizer_model: '/dev/zero', which is neither a file nor"):
        mcore_to_hf(path, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_a_symlink_in_the_tokenizer_leading_out_of_the_checkpoint_is_refused(tmp_path, secret):
    from megatron_ext.convert.to_hf import mcore_to_hf
    from megatron_ext.errors import ConversionError

    path = save_with_tokenizer(tmp_path / "ckpt")
    (path / "tokenizer" / "tokenizer.json").unlink()
    (path / "tokenizer" / "tokenizer.json").symlink_to(secret / "tokenizer.json")
    rewrite_manifest(path)
    with pytest.raises(ConversionError, match=f"tokenizer.json .*leads to {secret}.*, outside the checkpoint"):
        mcore_to_hf(path, tmp_path / "hf")
    assert not exported_anything_secret(tmp_path / "hf")


def test_a_pipe_in_the_tokenizer_is_refused_without_blocking(tmp_path):
    import os

    from megatron_ext.convert.to_hf import mcore_to_hf
    from megatron_ext.errors import ConversionError

    path = save_with_tokenizer(tmp_path / "ckpt")
    os.mkfifo(path / "tokenizer" / "added_tokens.json")  # not in the manifest: verification does not look at it
    with pytest.raises(ConversionError, match="added_tokens.json .*is not a regular file"):
        mcore_to_hf(path, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_tokenizer_files_beyond_the_bound_are_refused(tmp_path, monkeypatch):
    from megatron_ext.convert import carried_tokenizer
    from megatron_ext.convert.to_hf import mcore_to_hf
    from megatron_ext.errors import ConversionError

    monkeypatch.setattr(carried_tokenizer, "MAX_TOKENIZER_BYTES", 4096)
    path = save_with_tokenizer(tmp_path / "ckpt")
    (path / "tokenizer" / "tokenizer.json").write_bytes(b" " * 5000)
    rewrite_manifest(path)
    with pytest.raises(ConversionError, match="tokenizer.json .*makes the tokenizer larger than"):
        mcore_to_hf(path, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


# --- the commands a user runs: one line, exit 2 -------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_and_damaged(tmp_path_factory):
    """A tiny trained run (2 iterations, one checkpoint), and a copy whose largest shard's tensors were replaced and
    whose manifest was rewritten to match."""
    import shutil
    import subprocess
    import sys

    import yaml

    from test_train import base_config

    work = tmp_path_factory.mktemp("tamper_cli")
    config = base_config(work / "cache")
    config["training"]["train_iters"] = 2
    config["checkpoint"] = dict(dir=str(work / "run"), save_interval=2, keep_last=None)
    config["logging"] = dict(metrics_file=None, tensorboard_dir=None, progress_bar=False)
    (work / "train.yaml").write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "megatron_ext.cli", "train", "--config", str(work / "train.yaml")],
                          env=CLI_ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    shutil.copytree(work / "run", work / "damaged")
    checkpoint = work / "damaged" / "iter_0000002"
    blobs = object_blobs(checkpoint)
    shard = checkpoint / max(blobs, key=lambda name: (checkpoint / name).stat().st_size)
    data = shard.read_bytes()
    start = max(offset + length for _, offset, length in blobs[shard.name])
    shard.write_bytes(data[:start] + random.Random(11).randbytes(len(data) - start))
    rewrite_manifest(checkpoint)
    config["checkpoint"]["dir"] = str(work / "damaged")
    config["training"]["train_iters"] = 4
    (work / "resume.yaml").write_text(yaml.safe_dump(config))
    (work / "text.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    return work, shard


CLI_ENV = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.mark.slow
@pytest.mark.parametrize("command", ["train --resume auto", "eval perplexity", "eval passkey", "convert mcore-to-hf"])
def test_each_command_names_a_replaced_shard_in_one_line(trained_and_damaged, command):
    import subprocess
    import sys

    work, shard = trained_and_damaged
    damaged = str(work / "damaged")
    argv = {"train --resume auto": ["train", "--config", str(work / "resume.yaml"), "--resume", "auto"],
            "eval perplexity": ["eval", "perplexity", "--model", damaged, "--data", str(work / "text.txt"),
                                "--lengths", "64", "--output-dir", str(work / "eval")],
            "eval passkey": ["eval", "passkey", "--model", damaged, "--lengths", "256", "--trials", "1",
                             "--output-dir", str(work / "eval")],
            "convert mcore-to-hf": ["convert", "mcore-to-hf", "--ckpt", damaged, "--out", str(work / "hf")]}[command]
    done = subprocess.run([sys.executable, "-m", "megatron_ext.cli", *argv], env=CLI_ENV, capture_output=True,
                          text=True, timeout=300)
    name = command.split()[0]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"megatron-ext {name}: {shard} cannot be read"), last
