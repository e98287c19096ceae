"""Checkpoints: atomic megatron-core dist_checkpointing saves and loads that reshard.

Imports torch, numpy, megatron.core, megatron_ext.compat and the checkpoint package's layout, integrity,
lock and safe_metadata modules; never the training loop. What `state` holds for megatron_ext's models: megatron_ext/checkpoint/state.py.

On-disk layout (one directory per saved iteration, `iteration` zero-padded to 7 digits):

    root/latest                      text: the name of the newest complete checkpoint, moved in last (a hint:
                                     `--resume auto` takes the newest checkpoint that verifies, see layout.py)
    root/megatron_ext.lock           host and pid of the job saving here (checkpoint/lock.py)
    root/iter_0000010/               megatron `dist_checkpointing.save` (torch_dist backend):
        metadata.json, .metadata, __*.distcp   model + optimizer tensors, resharded on load
        common.pt                    rank 0's plain objects, ours under the key "megatron_ext"
        rng/rank_00000.pt            each rank's python/numpy/torch(/CUDA, megatron tracker) RNG
        megatron_ext.json            the same plain objects, for people (iteration, state, ...)
        manifest.json                size and CRC-32 of every file above (checkpoint/integrity.py)
        complete                     marker: everything above is written
    root/iter_0000020.tmp-<token>/   a save in progress, or one a crash interrupted (ignored)

A save takes the directory's lock, removes what interrupted saves left (their `.tmp-` directories may
be what filled the disk), writes into a fresh `.tmp-` directory, waits for every rank, checksums the
files (each rank a share), then rank 0 writes the manifest and the marker, renames the directory into
place and replaces `latest`; only then are older checkpoints removed (keep_last, never the one just
saved, nor the last older one that verifies: checkpoint/retention.py). A crash at any point leaves the
previous checkpoint and `latest` intact. When only `latest` cannot be written (the disk filled up just
then), the new checkpoint stays in place, keep_last runs and `latest` is tried again; if it still fails,
the stale `latest` is removed and the save raises an error that says so (`--resume auto` takes the new
checkpoint either way). A load verifies the files against the manifest (each rank a share) and vets
`.metadata` with an allow-list unpickler (checkpoint/safe_metadata.py) before megatron reads anything.

The tensors are written by this process (checkpoint/writer.py: no helper process a signal could kill),
either during the call or, with `background=`, on a thread while training goes on; then the steps above
from the checksums on run as the save's finalize step, so a background save completes the same way.

Resharding on load (dist_checkpointing maps the saved global tensors onto the new layout):
- model weights: TP, PP and DP may all change.
- optimizer state: the plain megatron optimizers (FP32Optimizer, Float16OptimizerWithFloat16Params)
  reshard like the weights; the distributed optimizer is saved as 'fully_reshardable' by default
  (TP/PP/DP may all change; the save gathers the state on DP rank 0), or as 'dp_reshardable'
  (no gather, only DP may change: other changes are refused before loading). Plain <->
  distributed optimizer state does not convert (megatron-core fails); that is refused too.
- RNG states are per rank: restored only when the world size and parallel layout match the save.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
import uuid
from pathlib import Path
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.distributed.checkpoint import CheckpointException

from megatron_ext.checkpoint.layout import (
    COMMON_KEY,
    COMPLETE_MARKER,
    DISTRIB_OPTIM_SHARDING_TYPES,
    FORMAT_VERSION,
    JSON_FILE,
    LATEST_FILE,
    RNG_DIR,
    TMP_INFIX,
    CheckpointError,
    checkpoint_name,
    find_checkpoint,
    is_complete_checkpoint,
    latest_target,
    list_checkpoints,
    require_complete,
    validate_checkpoint_dir,
)
from megatron_ext.checkpoint.integrity import (
    checkpoint_files,
    corrupt,
    describe_files,
    verify_checkpoint,
    write_manifest,
)
from megatron_ext.checkpoint.lock import lock_checkpoint_dir, release_checkpoint_dir
from megatron_ext.checkpoint.retention import prune, retire
from megatron_ext.checkpoint.safe_metadata import READ_ERRORS, CheckpointUnreadable, check_dcp_metadata, unreadable
from megatron_ext.compat import prepare_megatron
from megatron_ext.errors import UserError

if TYPE_CHECKING:
    from megatron_ext.checkpoint.writer import BackgroundSaves

log = logging.getLogger("megatron_ext")

__all__ = ["checkpoint_name", "find_checkpoint", "is_complete_checkpoint", "list_checkpoints",
           "load_checkpoint", "save_checkpoint", "validate_checkpoint_dir"]

# --- ranks ---------------------------------------------------------------------------------

def _require_distributed(action: str) -> None:
    if not torch.distributed.is_initialized():
        raise RuntimeError(
            f"{action} uses megatron's dist_checkpointing, which needs torch.distributed: call "
            f"torch.distributed.init_process_group first (a one-process gloo group is enough)")


def _is_rank0() -> bool:
    return torch.distributed.get_rank() == 0


def _barrier() -> None:
    torch.distributed.barrier()


def _on_rank0(action):
    """`action()` on rank 0 (its result there, None elsewhere); if it raises, every rank raises the same
    error, so that nobody waits at a barrier for it."""
    error, result = [None], None
    if _is_rank0():
        try:
            result = action()
        except Exception as raised:  # noqa: BLE001 - handed to every rank, then raised
            error[0] = raised
    if torch.distributed.get_world_size() > 1:
        torch.distributed.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise error[0]
    return result


def _checksum_collectively(staging: Path, known: dict[str, dict] | None = None) -> dict[str, dict]:
    """Size and CRC-32 of every file in the staging directory, on every rank: `known` (this rank's tensor files,
    checksummed by the writer) as they are, the rest each rank reading a share."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    known = dict(known or {})
    every_known = [known]
    if world > 1:
        every_known = [None] * world
        torch.distributed.all_gather_object(every_known, sorted(known))
    described = {name for names in every_known for name in names}
    rest = [name for name in checkpoint_files(staging) if name not in described]
    files = {**known, **describe_files(staging, rest[rank::world])}
    if world == 1:
        return files
    every_rank = [None] * world
    torch.distributed.all_gather_object(every_rank, files)
    return {name: entry for share in every_rank for name, entry in share.items()}


def _shared_token() -> str:
    """A fresh name suffix chosen by rank 0 and known to every rank."""
    token = [f"{os.getpid()}-{uuid.uuid4().hex[:8]}" if _is_rank0() else None]
    if torch.distributed.get_world_size() > 1:
        torch.distributed.broadcast_object_list(token, src=0)
    return token[0]


def _parallel_layout() -> dict:
    """World size and megatron's parallel sizes: per-rank RNG states only fit the same layout."""
    from megatron.core import parallel_state as ps
    layout = {"world_size": torch.distributed.get_world_size()}
    if ps.model_parallel_is_initialized():
        layout.update(
            tensor=ps.get_tensor_model_parallel_world_size(),
            pipeline=ps.get_pipeline_model_parallel_world_size(),
            context=ps.get_context_parallel_world_size(),
            expert=ps.get_expert_model_parallel_world_size(),
            virtual_pipeline=ps.get_virtual_pipeline_model_parallel_world_size())
    return layout


# --- what goes into the checkpoint ---------------------------------------------------------

def _chunks(model) -> list[torch.nn.Module]:
    """The bare model chunks (through DDP / Float16Module wrappers)."""
    from megatron.core.utils import unwrap_model
    return unwrap_model(list(model) if isinstance(model, (list, tuple)) else [model])


def _chunk_key(index: int, count: int) -> str:
    return "model" if count == 1 else f"model{index}"  # megatron-LM's keys


def _sharding_metadata(optimizer_sharding: str) -> dict:
    """What both sharded_state_dict calls get; saved so the load asks for the same format."""
    return {"chained_optim_avoid_prefix": True, "singleton_local_shards": False,
            "distrib_optim_sharding_type": optimizer_sharding}


def _sharded_state_dict(model, optimizer, metadata: dict, is_loading: bool) -> dict:
    chunks = _chunks(model)
    # sharded_state_dict adds process groups to the metadata it gets: give each call a copy
    state = {_chunk_key(i, len(chunks)): chunk.sharded_state_dict(metadata=dict(metadata))
             for i, chunk in enumerate(chunks)}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading,
                                                          metadata=dict(metadata))
    return state


def _megatron_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _optimizer_flavor(optimizer) -> str | None:
    """'distributed' (DistributedOptimizer), 'plain' (the others), None without an optimizer."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    if optimizer is None:
        return None
    inner = _megatron_optimizers(optimizer)
    return "distributed" if any(isinstance(o, DistributedOptimizer) for o in inner) else "plain"


def _optimizer_has_state(optimizer) -> bool:
    """False before the first step: there are no moments to save, and a fresh optimizer equals it.

    Decided over all ranks, since every rank must save the same keys (a distributed-optimizer
    rank may own no parameters).
    """
    local = any(len(o.optimizer.state) > 0 for o in _megatron_optimizers(optimizer))
    if torch.distributed.get_world_size() == 1:
        return local
    every_rank = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every_rank, local)
    return any(every_rank)


def _json_round_trip(state: dict) -> dict:
    """`state` as it will read back from megatron_ext.json; a clear error if it is not JSON-able."""
    try:
        return json.loads(json.dumps(state))
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"save_checkpoint(state=...) must be JSON-able (dicts, lists, str, numbers, bool, "
            f"None): {error}. Convert tensors with .tolist() and paths with str()") from error


# --- RNG -----------------------------------------------------------------------------------

def _capture_rng() -> dict:
    """This rank's generator states, in a form torch.load(weights_only=True) accepts."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker
    version, internal, gauss = random.getstate()
    bit_generator, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [bit_generator, keys.tolist(), pos, has_gauss, cached_gaussian],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "megatron_tracker": get_cuda_rng_tracker().get_states(),
    }


def _restore_rng(states: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    bit_generator, keys, pos, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((bit_generator, np.asarray(keys, dtype=np.uint32), pos, has_gauss,
                         cached_gaussian))
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    get_cuda_rng_tracker().set_states(states["megatron_tracker"])


def _rng_file(checkpoint: Path, rank: int) -> Path:
    return checkpoint / RNG_DIR / f"rank_{rank:05d}.pt"


def _save_rng(checkpoint: Path, states: dict) -> None:
    path = _rng_file(checkpoint, torch.distributed.get_rank())
    path.parent.mkdir(exist_ok=True)
    torch.save(states, path)


# --- save ----------------------------------------------------------------------------------

def save_checkpoint(root: str | Path, iteration: int, *, model: list[torch.nn.Module], optimizer=None,
                    scheduler=None, state: dict, keep_last: int | None = None,
                    optimizer_sharding: str = "fully_reshardable", sharded_strategy=None,
                    background: BackgroundSaves | None = None, extra_files: dict[str, bytes] | None = None) -> Path:
    """Save model chunks, optimizer, scheduler, RNG and `state` as root/iter_XXXXXXX; return it.

    Collective: every rank calls it. `state` (config, HARPE bases, data position, ...) must be
    JSON-able and the same on every rank (rank 0's is written). `optimizer_sharding` is the
    distributed optimizer's format ('fully_reshardable' or 'dp_reshardable', see the module
    docstring); other optimizers ignore it. keep_last=K then removes all but the K newest.
    The call leaves every RNG as it found it.

    Weights only: optimizer=None and scheduler=None save the model tensors alone (a converted
    model; load it with optimizer=None). `sharded_strategy` replaces the in-process torch_dist
    writer (checkpoint/writer.py; same format), e.g. the converter's, which pulls each tensor from a
    source as it writes.

    `background` (checkpoint/writer.py's BackgroundSaves): the tensors are copied, the call returns, and
    the files are written while training goes on; the checkpoint is complete (and `latest` moves) when
    `background.poll()` or `background.wait()` finishes it. The returned path exists only from then on.

    `extra_files` ({relative name: bytes}, e.g. the tokenizer the checkpoint carries) are written by rank 0 into
    the checkpoint before its manifest, so they appear with it, atomically, and are verified with it.
    """
    from megatron_ext.checkpoint.writer import InProcessSaveStrategy

    root = Path(root)
    _check_save_arguments(iteration, keep_last, optimizer_sharding)
    validate_checkpoint_dir(root)
    _require_distributed("save_checkpoint")
    prepare_megatron()
    if background is not None:
        background.wait()  # one save at a time: the previous one completes (and keep_last runs) first
    started = time.perf_counter()
    rng_states = _capture_rng()
    common = _common_part(iteration, optimizer, scheduler, state, optimizer_sharding)
    if sharded_strategy is None:
        sharded_strategy = InProcessSaveStrategy(snapshot=background is not None)

    name, token = checkpoint_name(iteration), _shared_token()
    staging, final = root / f"{name}{TMP_INFIX}{token}", root / name
    took_lock = _on_rank0(lambda: _claim_root(root, staging))

    def finish(megatron_steps=()):
        """After every rank's write: megatron's finalize steps (a background save's), then ours."""
        try:
            try:
                for step in megatron_steps:
                    step()
                _complete(root, staging, final, token, keep_last, getattr(sharded_strategy, "written", None))
            except CheckpointWriteFailed:
                raise
            except (OSError, CheckpointException) as error:
                raise write_failed(final, error) from error
        finally:
            if took_lock:
                release_checkpoint_dir(root)
        if _is_rank0():
            log.info(f"megatron_ext: saved {final} in {time.perf_counter() - started:.1f} s"
                     + (" (written in the background)" if background is not None else ""))

    try:
        request = _write_files(staging, model, optimizer, common, rng_states, sharded_strategy,
                               asynchronous=background is not None, extra_files=extra_files)
    except BaseException as error:
        if took_lock:
            release_checkpoint_dir(root)
        if isinstance(error, (OSError, CheckpointException)):
            raise write_failed(final, error) from error
        raise
    finally:
        _restore_rng(rng_states)
    if background is None:
        finish()
    else:
        background.schedule(request._replace(finalize_fns=[partial(finish, request.finalize_fns)]), final)
    return final


class CheckpointWriteFailed(UserError, OSError):
    """A checkpoint could not be written (a full disk, a lost file system); the previous one and `latest` are intact."""


def write_failed(final: Path, error: BaseException) -> CheckpointWriteFailed:
    """The error for a save that failed while writing `final` (the cause is named; every rank raises it)."""
    failures = getattr(error, "failures", None)  # torch DCP's CheckpointException: {rank: (exception, trace)}
    if failures:
        rank, (cause, *_) = next(iter(failures.items()))
        reason = f"rank {rank}: {str(cause).removeprefix('Worker failure: ')}"
    else:
        reason = str(error)
    if "unexpected pos" in reason:  # torch's zip writer, when a write stopped short
        reason += " (a write stopped short: the disk or a quota is full, or a file-size limit was hit)"
    return CheckpointWriteFailed(
        f"{final.name} could not be written in checkpoint.dir ({str(final.parent)!r}): {reason}. Nothing else "
        f"changed: {_where_resume_goes(final.parent)}. Free space (or fix the file system) and resume with "
        f"--resume auto")


class LatestNotUpdated(CheckpointWriteFailed):
    """A checkpoint was saved complete, but `latest` could not be pointed at it (a disk that filled up just then)."""


def _where_resume_goes(root: Path) -> str:
    """What `latest` names and, when that is not it, the newest complete checkpoint (what --resume auto takes if it
    verifies): the state a failed save leaves, in words."""
    latest, complete = latest_target(root), list_checkpoints(root)
    newest = complete[-1] if complete else None
    said = f"latest names {latest.name if latest else 'no checkpoint'}"
    if newest != latest:
        said += f", the newest complete checkpoint is {newest.name if newest else 'none'}"
    return said


def _claim_root(root: Path, staging: Path) -> bool:
    """Rank 0, before writing: take root's lock (True if this save took it), clear what interrupted saves
    left, create the staging directory."""
    root.mkdir(parents=True, exist_ok=True)
    took = lock_checkpoint_dir(root)
    _remove_stale_staging(root)
    staging.mkdir()
    return took


def _write_files(staging, model, optimizer, common, rng_states, sharded_strategy, asynchronous: bool,
                 extra_files: dict[str, bytes] | None = None):
    """Every rank's tensors (or, when `asynchronous`, the request that writes them), RNG file and, on rank 0,
    megatron_ext.json and the extra files into the staging directory."""
    _barrier()  # the staging directory exists
    request = _write_tensors(staging, model, optimizer, common, sharded_strategy, asynchronous)
    _save_rng(staging, rng_states)
    if _is_rank0():
        summary = {**common, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (staging / JSON_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        for name, contents in (extra_files or {}).items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_bytes(contents)
    return request


def _complete(root: Path, staging: Path, final: Path, token: str, keep_last: int | None,
              written: dict[str, dict] | None = None) -> None:
    """Once every rank's files are written: checksums (`written`: those the writer made), manifest, marker,
    rename, `latest`, keep_last (every rank verifies a share of what it keeps before anything goes)."""
    _barrier()  # every rank's files are in
    checksummed = time.perf_counter()
    files = _checksum_collectively(staging, written)

    def put_in_place() -> OSError | None:
        log.debug(f"megatron_ext: manifest of {len(files)} files, CRC-32 in {time.perf_counter() - checksummed:.2f} s")
        latest_failed = _finish(staging, final, files, token)
        _remove_stale_staging(root)
        return latest_failed

    latest_failed = _on_rank0(put_in_place)  # a failure before the rename: every rank raises it
    if keep_last is not None:
        prune(root, keep_last, final, token)
    _on_rank0(lambda: _retry_latest(final, token, latest_failed))
    _barrier()  # nobody returns before the checkpoint is in place


def _check_save_arguments(iteration, keep_last, optimizer_sharding) -> None:
    if not isinstance(iteration, int) or iteration < 0:
        raise ValueError(f"iteration ({iteration!r}) must be an int >= 0")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"checkpoint.keep_last ({keep_last}) must be >= 1, or None to keep all")
    if optimizer_sharding not in DISTRIB_OPTIM_SHARDING_TYPES:
        raise ValueError(f"optimizer_sharding ({optimizer_sharding!r}) must be one of "
                         f"{DISTRIB_OPTIM_SHARDING_TYPES}")


def _common_part(iteration, optimizer, scheduler, state, optimizer_sharding) -> dict:
    """Plain objects, identical on every rank: megatron keeps rank 0's in common.pt."""
    flavor = _optimizer_flavor(optimizer)
    return {
        "format_version": FORMAT_VERSION,
        "iteration": iteration,
        "optimizer": None if optimizer is None else {
            "flavor": flavor, "has_state": _optimizer_has_state(optimizer)},
        # The plain optimizers' format is the distributed optimizer's 'fully_reshardable' one.
        "sharding_metadata": _sharding_metadata(
            optimizer_sharding if flavor == "distributed" else "fully_reshardable"),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "parallel_layout": _parallel_layout(),
        "state": _json_round_trip(state),
    }


def _write_tensors(staging: Path, model, optimizer, common: dict, sharded_strategy, asynchronous: bool = False):
    from megatron.core import dist_checkpointing
    metadata = common["sharding_metadata"]
    with_optimizer = common["optimizer"] is not None and common["optimizer"]["has_state"]
    sharded = _sharded_state_dict(model, optimizer if with_optimizer else None, metadata,
                                  is_loading=False)
    sharded[COMMON_KEY] = common
    return dist_checkpointing.save(sharded, str(staging), sharded_strategy=sharded_strategy,
                                   content_metadata=dict(metadata), async_sharded_save=asynchronous)


def _finish(staging: Path, final: Path, files: dict, token: str) -> OSError | None:
    """Rank 0: write the manifest, mark the staging directory complete, move it into place, then point
    `latest` at it. Returns the error when only that last step failed (the checkpoint is in place, complete)."""
    write_manifest(staging, files)
    _write_synced(staging / COMPLETE_MARKER, final.name + "\n")
    if final.exists():  # the same iteration saved again: the old copy goes first
        retire(final, token)
    os.replace(staging, final)
    try:
        _point_latest(final, token)
    except OSError as error:
        return error
    return None


def _point_latest(final: Path, token: str) -> None:
    """Replace root/latest with one naming `final` (written beside it, then renamed over it)."""
    latest_staging = final.parent / f"{LATEST_FILE}{TMP_INFIX}{token}"
    try:
        _write_synced(latest_staging, final.name + "\n")
        os.replace(latest_staging, final.parent / LATEST_FILE)
    finally:
        latest_staging.unlink(missing_ok=True)
    _sync_directory(final.parent)


def _retry_latest(final: Path, token: str, error: OSError | None) -> None:
    """Rank 0, after keep_last: when `latest` could not be written, try again (the removals may have freed the
    space it needs); if it still fails, remove the stale `latest` (it names an older checkpoint) and raise a
    LatestNotUpdated that says what is on disk."""
    if error is None:
        return
    try:
        _point_latest(final, token)
        log.warning(f"megatron_ext: {final.parent / LATEST_FILE} could not be written at first ({error}); "
                    f"written once keep_last had removed older checkpoints")
        return
    except OSError as again:
        error = again
    stale = latest_target(final.parent)
    try:
        (final.parent / LATEST_FILE).unlink(missing_ok=True)
        now = f"the old `latest` (naming {stale.name if stale else 'nothing usable'}) was removed"
    except OSError:
        now = f"`latest` still names {stale.name if stale else 'nothing usable'}"
    raise LatestNotUpdated(
        f"{final.name} was saved in checkpoint.dir ({str(final.parent)!r}) and is complete, but `latest` could not "
        f"be pointed at it: {error}. {now[0].upper()}{now[1:]}; --resume auto takes the newest checkpoint that "
        f"verifies, {final.name}. Free space (or fix the file system) and resume with --resume auto")


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _sync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _remove_stale_staging(root: Path) -> None:
    """Rank 0, holding root's lock (so no other job's save is in progress): what interrupted saves (or
    deletes) left behind."""
    for path in root.iterdir():
        if TMP_INFIX in path.name and path.name.startswith(("iter_", LATEST_FILE)):
            log.info(f"megatron_ext: removing {path} (left by an interrupted save)")
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


# --- load ----------------------------------------------------------------------------------

def load_checkpoint(path: str | Path, *, model: list[torch.nn.Module], optimizer=None, scheduler=None,
                    restore_rng: bool = True, setting: str = "checkpoint.resume", verify: bool = True) -> dict:
    """Load a checkpoint into `model` (and `optimizer`, `scheduler`), resharding as needed.

    Collective: every rank calls it. optimizer=None loads the weights only (eval, conversion).
    Returns {"iteration", "state" (the dict given to save_checkpoint), "path",
    "rng_restored"}; RNG states are restored when asked and the parallel layout is unchanged.
    Errors name `setting`, the argument the path came from. `verify` checks every file against the
    manifest first (each rank a share); `.metadata` is vetted by the allow-list unpickler regardless, read once,
    and megatron loads through the reader that vetted it (checkpoint/safe_metadata.py). A file that does not read
    back (damaged, or replaced by another file) is named in a CheckpointUnreadable.
    """
    path = require_complete(Path(path).expanduser(), setting)
    _require_distributed("load_checkpoint")
    if verify:
        _verify_collectively(path, setting)
    reader = check_dcp_metadata(path)
    if reader is None:
        raise unreadable(path / ".metadata", FileNotFoundError("missing"))
    prepare_megatron()
    from megatron.core import dist_checkpointing
    started = time.perf_counter()
    common = _read_common(path)
    if common is None:
        raise CheckpointError(
            f"{setting} ({str(path)!r}): its {path / 'common.pt'} holds no megatron_ext state (iteration, "
            f"scheduler, RNG): a megatron checkpoint not written by megatron_ext.checkpoint.store.save_checkpoint, "
            f"or a common.pt replaced by another file. Resume from a checkpoint megatron_ext wrote")
    load_optimizer_state = _check_optimizer_matches(path, common, optimizer)

    sharded = _sharded_state_dict(model, optimizer if load_optimizer_state else None,
                                  common["sharding_metadata"], is_loading=True)
    loaded = _read_tensors(sharded, path, reader)
    chunks = _chunks(model)
    for index, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded[_chunk_key(index, len(chunks))], strict=True)
    if load_optimizer_state:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None and common["scheduler"] is not None:
        scheduler.load_state_dict(common["scheduler"])
    rng_restored, failed = False, None
    try:
        rng_restored = restore_rng and _load_rng(path, common["parallel_layout"])
    except CheckpointUnreadable as error:
        failed = error
    _raise_if_any_rank_failed(failed)  # a rank's own RNG file: no other rank may go on to wait for it
    if _is_rank0():
        log.info(f"megatron_ext: loaded {path} (iteration {common['iteration']}) in "
                 f"{time.perf_counter() - started:.1f} s")
    return {"iteration": common["iteration"], "state": common["state"], "path": path,
            "rng_restored": rng_restored}


_COMMON_KEYS = ("iteration", "optimizer", "sharding_metadata", "scheduler", "parallel_layout", "state")


def _read_common(path: Path) -> dict | None:
    """megatron_ext's part of common.pt (None: a megatron checkpoint without it), after megatron's metadata.json;
    a file that does not read back as megatron wrote it is named."""
    from megatron.core.dist_checkpointing import load_common_state_dict
    from megatron.core.dist_checkpointing.core import CheckpointingException, maybe_load_config

    try:
        maybe_load_config(str(path))
    except READ_ERRORS as error:
        raise unreadable(path / "metadata.json", error) from None
    try:
        common = load_common_state_dict(str(path))
    except (*READ_ERRORS, CheckpointingException) as error:
        raise unreadable(path / "common.pt", error) from None
    if not isinstance(common, dict):
        raise unreadable(path / "common.pt", TypeError(f"holds a {type(common).__name__}, not a dict"))
    ours = common.get(COMMON_KEY)
    if ours is not None and not (isinstance(ours, dict) and all(key in ours for key in _COMMON_KEYS)):
        raise unreadable(path / "common.pt", KeyError(f"its {COMMON_KEY!r} entry lacks some of {_COMMON_KEYS}"))
    return ours


def _read_tensors(sharded: dict, path: Path, reader) -> dict:
    """megatron's load through `reader`, the reader that vetted `.metadata` (never a second read of it); a
    UserError raised while reading (an unreadable file, an object blob that is not plain data) comes out as it is,
    not wrapped in torch's CheckpointException."""
    from megatron.core import dist_checkpointing

    from megatron_ext.checkpoint.safe_metadata import vetted_load_strategy

    try:
        return dist_checkpointing.load(sharded, str(path), sharded_strategy=vetted_load_strategy(reader))
    except CheckpointException as wrapped:
        failures = [failure[0] for failure in (getattr(wrapped, "failures", None) or {}).values()]
        raise next((error for error in failures if isinstance(error, UserError)), wrapped) from None


def _raise_if_any_rank_failed(error: BaseException | None) -> None:
    """Raise on every rank the first rank's error, if any rank had one (collective)."""
    if torch.distributed.get_world_size() > 1:
        every_rank = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(every_rank, error)
        error = next((raised for raised in every_rank if raised is not None), None)
    if error is not None:
        raise error


def _verify_collectively(path: Path, setting: str) -> None:
    """Raise a CheckpointCorrupt on every rank if any file differs from the manifest (each rank checks a share)."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    problems = verify_checkpoint(path, rank, world)
    if world > 1:
        every_rank = [None] * world
        torch.distributed.all_gather_object(every_rank, problems)
        problems = [problem for share in every_rank for problem in share]
    if problems:
        raise corrupt(path, setting, problems)


def _check_optimizer_matches(path: Path, common: dict, optimizer) -> bool:
    """Whether to load optimizer state; an error, before any work, when it cannot be loaded."""
    saved = common["optimizer"]
    if optimizer is None:
        return False
    if saved is None:
        raise CheckpointError(
            f"{path} holds no optimizer state (saved with optimizer=None): load it without the "
            f"optimizer (checkpoint.load_optimizer: false)")
    flavor = _optimizer_flavor(optimizer)
    if saved["flavor"] != flavor:
        raise CheckpointError(
            f"{path} holds {saved['flavor']} optimizer state and the run builds a {flavor} "
            f"optimizer; megatron-core cannot convert between them. Set "
            f"parallel.use_distributed_optimizer: {saved['flavor'] == 'distributed'} to resume, "
            f"or load the weights only (checkpoint.load_optimizer: false)")
    if not saved["has_state"]:
        if _is_rank0():
            log.info(f"megatron_ext: {path} was saved before the first optimizer step; the "
                     f"optimizer starts fresh")
        return False
    _check_dp_reshardable_layout(path, common)
    return True


def _check_dp_reshardable_layout(path: Path, common: dict) -> None:
    """'dp_reshardable' optimizer state is laid out per TP/PP/EP rank: only DP may change."""
    if common["sharding_metadata"]["distrib_optim_sharding_type"] != "dp_reshardable":
        return
    model_parallel = ("tensor", "pipeline", "context", "expert", "virtual_pipeline")
    saved = {k: common["parallel_layout"].get(k) for k in model_parallel}
    now = {k: _parallel_layout().get(k) for k in model_parallel}
    if saved != now:
        raise CheckpointError(
            f"{path} holds distributed-optimizer state in the 'dp_reshardable' format, saved "
            f"with {saved}; this run has {now}, and that format only lets the data-parallel "
            f"size change. Resume with the saved sizes, or load the weights only "
            f"(checkpoint.load_optimizer: false); save with optimizer_sharding="
            f"'fully_reshardable' to change TP/PP later")


def _load_rng(checkpoint: Path, saved_layout: dict) -> bool:
    layout = _parallel_layout()
    rng_file = _rng_file(checkpoint, torch.distributed.get_rank())
    if layout != saved_layout or not rng_file.is_file():
        if _is_rank0():
            log.warning(f"megatron_ext: RNG states not restored from {checkpoint} (saved with "
                        f"{saved_layout}, now {layout}): random draws after resume differ "
                        f"from an uninterrupted run")
        return False
    try:
        _restore_rng(torch.load(rng_file, weights_only=True))
    except READ_ERRORS as error:
        raise unreadable(rng_file, error) from None
    return True
