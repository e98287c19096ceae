"""Property-based fuzz of the checkpoint files users and crashes leave behind (issue 30): a hostile `latest` (garbage,
huge, negative, non-UTF-8, path traversal, a missing or older checkpoint, a directory, a FIFO, /dev/zero) and hostile
manifests (mutated JSON, wrong types, huge sizes, missing entries, paths outside, a huge or non-regular file) in a
checkpoint root that holds two intact checkpoints saved once by `megatron-ext train` (the module fixture). Each case
runs one of `train --resume auto`, `eval passkey` and `convert mcore-to-hf` on a copy, in a forked child bounded by
SECONDS and MEMORY_MB (tests/fuzz_harness.py), until the point where the command's work begins (train: the loop, after
the checkpoint is found, verified and read; eval and convert given the root: the weights' load), which is everything
`latest` and a manifest steer; eval and convert given the iter_ directory itself verify it as they load it, so those
cases run to the end. It must end cleanly (exit 0 there, or exit 2 with one line `megatron-ext <command>: ...`), never with
a traceback, a hang or a memory blow-up; and it must end as the resolver says (`find_checkpoint(root, "auto")` in
this process): the newest checkpoint that verifies, whatever `latest` says; exit 2 when none verifies.

Seeded (derandomize): CI runs the same cases every time. Counts and slowest case per family are printed at the end.
"""

import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.slow

SECONDS = 20  # per case; a case takes 0.3-1 s on the 2-core machine
MEMORY_MB = 1024  # address space a case may add to the harness's zygote (tests/fuzz_harness.py)
EXAMPLES = 10  # per test and command: 60 cases, about 25 s on a quiet 2-core machine (+ the fixture's one save)
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture, HealthCheck.large_base_example])
COMMANDS = ("train", "eval", "convert")
STOP = {"train": "megatron_ext.training.train:train", "eval": "megatron_ext.models.builder:load_model",
        "convert": "megatron_ext.convert.mcore_io:build_skeleton"}
PRELOAD = ("megatron_ext.eval.models", "megatron_ext.eval.passkey", "megatron_ext.convert.to_hf",
           "megatron_ext.models.builder", "megatron_ext.convert.mcore_io")
NEWEST, OLDER = "iter_0000002", "iter_0000001"
ENDINGS: Counter = Counter()  # (family, command, exit code) -> cases; (family, "slowest seconds") -> seconds


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """A checkpoint root with two intact checkpoints (iterations 1 and 2) of a tiny model, written by the CLI."""
    from fuzz_harness import assert_clean_ending, preload, run_cli_bounded

    preload()
    preload(PRELOAD)
    work = tmp_path_factory.mktemp("fuzz_checkpoint")
    config = work / "train.yaml"
    config.write_text(yaml.safe_dump(dict(
        model=dict(num_layers=1, hidden_size=32, num_attention_heads=2, seq_length=32),
        data=dict(tiny_corpus=True, cache_dir=str(work / "cache")),
        training=dict(train_iters=2, micro_batch_size=1, global_batch_size=1, precision="fp32"),
        optimizer=dict(warmup_iters=0),
        checkpoint=dict(dir=str(work / "ckpt"), save_interval=1, keep_last=None),
    )))
    outcome = run_cli_bounded(["train", "--config", config], cwd=work, seconds=300, memory_mb=4096)
    assert_clean_ending(outcome, "train")
    assert outcome.exit_code == 0 and sorted(p.name for p in (work / "ckpt").iterdir()) == [OLDER, NEWEST, "latest"]
    yield dict(work=work, root=work / "ckpt", config=config)
    print("\nfuzz_checkpoint endings (family, command, exit code): cases")
    for key, count in sorted(ENDINGS.items(), key=str):
        print(f"  {key}: {count}")


def run_case(saved: dict, family: str, command: str, mutate, explicit: bool = False, newest: str | None = None) -> None:
    """Copy the root, let `mutate` make it hostile, run `command` on it (the root, or its newest iter_ directory when
    `explicit`): it must end cleanly, and as the resolver in this process decides (asked only after the bounded child
    ended cleanly: the same reads, so they are bounded too); `newest`: the checkpoint the resolver must pick."""
    from fuzz_harness import assert_clean_ending, run_cli_bounded

    from megatron_ext.checkpoint.layout import find_checkpoint
    from megatron_ext.errors import UserError

    with tempfile.TemporaryDirectory(prefix="fuzz_ckpt_", dir=saved["work"]) as scratch:
        case = Path(scratch)
        root = case / "ckpt"
        shutil.copytree(saved["root"], root)
        mutate(root)
        target = root / NEWEST if explicit else root
        if command == "train":
            argv = ["train", "--config", saved["config"], "--set", f"checkpoint.dir={root}",
                    "--resume", str(target) if explicit else "auto"]
        elif command == "eval":
            argv = ["eval", "passkey", "--model", target, "--lengths", "96", "--trials", "1",
                    "--output-dir", case / "eval"]
        else:
            argv = ["convert", "mcore-to-hf", "--ckpt", target, "--out", case / "hf", "--no-progress"]
        # eval and convert verify a checkpoint named directly when they load it: those run to the end
        stop = [] if explicit and command != "train" else [STOP[command]]
        outcome = run_cli_bounded(argv, cwd=case, seconds=SECONDS, memory_mb=MEMORY_MB, stop_before=stop)
        ENDINGS[(family, command, outcome.exit_code)] += 1
        ENDINGS[(family, "slowest seconds")] = round(max(ENDINGS[(family, "slowest seconds")], outcome.seconds), 2)
        assert_clean_ending(outcome, command)

        try:
            expected = find_checkpoint(root, str(target) if explicit else "auto")
        except UserError:  # none verifies (or the one named does not): the command must have refused too
            expected = None
        if newest is not None:
            assert expected == root / newest  # `latest` is a hint: the scan decides
        if expected is None:
            assert outcome.exit_code == 2, f"the resolver refuses, the command did not:\n{outcome.describe()}"
        else:
            assert outcome.exit_code == 0 and outcome.reached == (stop[0] if stop else None), outcome.describe()
            if command == "train":
                assert f"resuming {expected}" in outcome.stderr, outcome.describe()


# --- `latest` ------------------------------------------------------------------------------------------------------

LATEST_NAMES = st.sampled_from([
    NEWEST, OLDER, "iter_0000003", "iter_0000000", "iter_-000001", "iter_-1", "iter_99999999999999999999999999",
    "iter_٠٠٠٠٠٠١", "iter_0000001.tmp-123-abc", "iter_0000002/", "iter_0000002/../iter_0000001", "../iter_0000001",
    "/etc/passwd", "/", ".", "..", "latest", "iter_", "", " ", "\x00", "iter_0000002\x00", "iter_0000001\r\n",
    "\ufeffiter_0000001", "iter_0000001\niter_0000002", "{{ iter }}", "$(touch pwned)", "~/iter_0000001",
])


@st.composite
def latest_contents(draw) -> bytes:
    """What `latest` holds: a name (possibly wrapped in junk), any text, or any bytes."""
    kind = draw(st.sampled_from(["name", "wrapped", "text", "bytes", "long"]))
    if kind == "name":
        return draw(LATEST_NAMES).encode("utf-8")
    if kind == "wrapped":
        junk = st.text(alphabet=" \t\n\r\x0b\x0c\x00/.", max_size=4)
        return (draw(junk) + draw(LATEST_NAMES) + draw(junk)).encode("utf-8")
    if kind == "text":
        return draw(st.text(max_size=64)).encode("utf-8", "surrogatepass")
    if kind == "bytes":
        return draw(st.binary(max_size=256))
    return draw(LATEST_NAMES).encode() * draw(st.sampled_from([300, 5000, 200_000]))


def write_latest(root: Path, how: str, contents: bytes) -> None:
    latest = root / "latest"
    latest.unlink()
    if how == "file":
        latest.write_bytes(contents)
    elif how == "sparse-huge":  # 8 GiB that read back as zeros, written in no time
        latest.write_bytes(contents[:64])
        os.truncate(latest, 8 << 30)
    elif how == "directory":
        (latest / NEWEST).mkdir(parents=True)
    elif how == "fifo":  # opening it for reading would wait for a writer forever
        os.mkfifo(latest)
    elif how == "dev-zero":
        latest.symlink_to("/dev/zero")
    elif how == "symlink-outside":  # to a `latest` of another root, naming a checkpoint there
        outside = root.parent / "elsewhere"
        outside.mkdir()
        (outside / "latest").write_text(f"{NEWEST}\n")
        latest.symlink_to(outside / "latest")
    elif how == "symlink-loop":
        latest.symlink_to(latest)
    elif how == "dangling":
        latest.symlink_to(root / "gone")
    elif how == "missing":
        pass
    elif how == "newest-deleted":  # latest names a checkpoint removed by hand
        latest.write_bytes(contents)
        shutil.rmtree(root / NEWEST)


@pytest.mark.parametrize("command", COMMANDS)
@FUZZ
@given(contents=latest_contents(),
       how=st.sampled_from(["file"] * 6 + ["sparse-huge", "directory", "fifo", "dev-zero", "symlink-outside",
                                           "symlink-loop", "dangling", "missing", "newest-deleted"]))
def test_hostile_latest_ends_cleanly_and_never_steers_resume_away_from_the_newest_that_verifies(saved, command,
                                                                                                 contents, how):
    run_case(saved, "latest", command, lambda root: write_latest(root, how, contents),
             newest=OLDER if how == "newest-deleted" else NEWEST)


# --- manifests ------------------------------------------------------------------------------------------------------

JSON_JUNK = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True), st.text(max_size=12)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=6)
SIZES = st.one_of(st.sampled_from([0, -1, 1, 2**31, 2**63, 2**70, 10**30, True, 1.5, float("nan"), "12", None]),
                  JSON_JUNK)
OUTSIDE = st.sampled_from(["../iter_0000001/common.pt", "../../../../etc/passwd", "/etc/passwd", "/dev/zero", "..",
                           ".", "", "rng", "rng/../../latest", "nonexistent.distcp", "common.pt/x", "\x00",
                           "a" * 300, "manifest.json", "complete"])


@st.composite
def manifest_changes(draw, manifest: dict):
    """The manifest (a dict) with 1-3 changes; or bytes for a manifest that is no longer JSON."""
    files = list(manifest["files"])
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["size", "crc", "entry", "drop", "add", "files", "top", "whole", "bytes",
                                     "nested"]))
        if kind == "bytes":
            text = bytearray(json.dumps(manifest).encode())
            for _ in range(draw(st.integers(1, 4))):
                at = draw(st.integers(0, len(text) - 1))
                action = draw(st.sampled_from(["flip", "cut", "insert"]))
                if action == "flip":
                    text[at] = draw(st.integers(0, 255))
                elif action == "cut":
                    del text[at:]
                    break
                else:
                    text[at:at] = draw(st.binary(min_size=1, max_size=8))
            return bytes(text)
        if kind == "nested":  # deeper than any JSON reader recurses
            return b"[" * draw(st.sampled_from([1000, 100_000])) + b"]"
        if kind == "whole":
            manifest = draw(JSON_JUNK)
            continue
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or not files:
            continue
        name = draw(st.sampled_from(files))
        entry = manifest["files"].get(name)
        if kind == "size" and isinstance(entry, dict):
            entry["size"] = draw(SIZES)
        elif kind == "crc" and isinstance(entry, dict):
            entry["crc32"] = draw(st.one_of(st.sampled_from(["", "0", "ffffffff", "zz", "1" * 10_000]), JSON_JUNK))
        elif kind == "entry":
            manifest["files"][name] = draw(JSON_JUNK)
        elif kind == "drop":
            manifest["files"].pop(name, None)
        elif kind == "add":
            manifest["files"][draw(OUTSIDE)] = {"size": draw(SIZES), "crc32": "00000000"}
        elif kind == "files":
            manifest["files"] = draw(JSON_JUNK)
        else:
            manifest[draw(st.sampled_from(["format", "checksum", "extra"]))] = draw(JSON_JUNK)
    return manifest


def write_manifest_as(checkpoint: Path, how: str, changed) -> None:
    manifest = checkpoint / "manifest.json"
    manifest.unlink()
    if how == "content":
        manifest.write_bytes(changed if isinstance(changed, bytes) else json.dumps(changed).encode())
    elif how == "sparse-huge":
        manifest.write_bytes(b" ")
        os.truncate(manifest, 8 << 30)
    elif how == "fifo":
        os.mkfifo(manifest)
    elif how == "dev-zero":
        manifest.symlink_to("/dev/zero")
    elif how == "directory":
        manifest.mkdir()
    elif how == "missing":  # saved before manifests existed: loads unverified, with a warning
        pass


@pytest.mark.parametrize("command", COMMANDS)
@FUZZ
@given(data=st.data(),
       how=st.sampled_from(["content"] * 8 + ["sparse-huge", "fifo", "dev-zero", "directory", "missing"]),
       both=st.booleans(), explicit=st.booleans())
def test_hostile_manifests_end_cleanly(saved, command, data, how, both, explicit):
    changes = [data.draw(manifest_changes(json.loads((saved["root"] / name / "manifest.json").read_text())))
               for name in (NEWEST, OLDER)[:2 if both else 1]]

    def mutate(root):
        for name, changed in zip((NEWEST, OLDER), changes):
            write_manifest_as(root / name, how, changed)

    run_case(saved, "manifest", command, mutate, explicit=explicit)
