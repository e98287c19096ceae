"""How checkpoint tensors reach the disk: megatron's torch_dist format, written by the training process itself,
either at once or on a background thread while training goes on (`checkpoint.async_save`).

Imports torch and megatron.core (checkpointing strategies only); used by checkpoint/store.py.

megatron-core plans every save as an asynchronous one: `dist_checkpointing.save(..., async_sharded_save=True)`
returns an `AsyncRequest` (a write function, a preload function that stages the tensors, finalize functions),
and a synchronous save is the same request executed in place. Its own writer runs the write in forked
processes that report through a `multiprocessing` Manager. Those helpers die from a SIGTERM sent to the
process group (srun, Ctrl-C) and the save fails with BrokenPipeError, and after a `kill -9` of the trainer
they can outlive it. Here the same request is carried out by the training process:

- `InProcessSaveStrategy` writes each rank's files from the calling process, two threads each writing one
  (megatron's default layout, `__<rank>_0.distcp` and `__<rank>_1.distcp`, and `.metadata`, read by the
  same loader).
- `BackgroundSaves` runs the write on a thread, through megatron's `AsyncCallsQueue`: its finalize step,
  on every rank once every rank's write is done, runs megatron's (`.metadata`, `metadata.json`), then
  megatron_ext's (checksums, manifest, marker, rename, `latest`, keep_last). Before the request is
  scheduled every tensor is copied (device to host on GPU, a clone on CPU), so the steps that follow do not
  change what is written; that copy is the host memory an async save costs (model + optimizer state).
  Python delivers signals to the main thread only, so a signal never reaches the writer; a thread never
  outlives its process, so a killed trainer leaves a `.tmp-` directory (removed by the next save) and
  `latest` on the previous checkpoint.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCaller, AsyncCallsQueue, AsyncRequest
from megatron.core.dist_checkpointing.strategies.filesystem_async import (
    FileSystemWriterAsync,
    _split_by_size_and_type,
)
from megatron.core.dist_checkpointing.strategies.state_dict_saver import save_state_dict_async_plan
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX
from torch.distributed.checkpoint.planner import WriteItemType

from megatron_ext.checkpoint.integrity import describe_files

log = logging.getLogger("megatron_ext")

WRITE_THREADS = 2  # files per rank, written in parallel: megatron's default writer has two processes


class InProcessFileSystemWriter(FileSystemWriterAsync):
    """megatron's async file writer without its helper processes: the buckets of this rank are written one
    after the other by whoever calls the write function, and the results travel through a plain queue."""

    def __init__(self, path, *, snapshot: bool):
        super().__init__(path, single_file_per_rank=True, thread_count=WRITE_THREADS)
        self.snapshot = snapshot  # copy CPU tensors when staging (a background write must not see later steps)
        self.checksums: dict[str, dict] = {}  # the manifest entries of the files written, filled by the writer

    def prepare_write_data(self, plan, planner) -> None:
        prefix = plan.storage_data.prefix
        self.write_buckets = []
        for items in _split_by_size_and_type(self.thread_count, plan.items):
            data = [(item, planner.resolve_data(item)) for item in items]
            byte_items = [(item, value) for item, value in data if item.type == WriteItemType.BYTE_IO]
            tensor_items = [(item, value.detach()) for item, value in data if item.type != WriteItemType.BYTE_IO]
            if byte_items or tensor_items:
                name = f"{prefix}{len(self.write_buckets)}{DEFAULT_SUFFIX}"
                self.write_buckets.append((os.path.join(self.checkpoint_dir, name), name,
                                           (byte_items, tensor_items)))
        self.results_queue = queue.Queue() if self.write_buckets else None

    def get_save_function_and_args(self):
        if not self.write_buckets:
            return None, None, []
        transforms = [self.transforms] if hasattr(self, "transforms") else []
        # megatron's shape: fn(rank, buckets, results), the buckets replaced by what the preload returns
        return (lambda _rank, buckets, results: _write_buckets(transforms, buckets, results, self.checksums),
                lambda: _stage(self.write_buckets, self.snapshot),
                [torch.distributed.get_rank(), self.write_buckets, self.results_queue])


def _stage(buckets: list, snapshot: bool) -> list:
    """The buckets with every tensor on the host: copied from the device, or cloned when `snapshot` asks
    (a view is always compacted, as megatron's writer does, so only its own elements are written)."""
    def host(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type != "cpu":
            return tensor.to("cpu")
        whole = tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
        return tensor.clone() if snapshot or not whole else tensor

    staged = [(path, name, (byte_items, [(item, host(tensor)) for item, tensor in tensor_items]))
              for path, name, (byte_items, tensor_items) in buckets]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return staged


def _write_buckets(transforms: list, buckets: list, results: queue.Queue, checksums: dict) -> None:
    """Write the buckets, one thread each (file writes release the GIL, as megatron's processes write in
    parallel), and add each file's size and CRC-32 to `checksums` (so a background save's checksums are
    off the training loop too); put {bucket index: write results}, or the first exception, in `results`.
    Never raises: megatron's finalize step reads the queue on every rank and fails them all alike."""
    def write(index: int, bucket) -> list:
        bucket_results, done = queue.Queue(), queue.Queue()
        done.put(index)
        FileSystemWriterAsync.write_preloaded_data(transforms, index, bucket, bucket_results, done, use_fsync=True)
        _, outcome = bucket_results.get_nowait()
        if isinstance(outcome, Exception):
            raise outcome
        path = Path(bucket[0])
        checksums.update(describe_files(path.parent, [path.name]))
        return outcome

    try:
        with ThreadPoolExecutor(max_workers=len(buckets), thread_name_prefix="megatron_ext checkpoint") as pool:
            written: dict | Exception = dict(enumerate(pool.map(write, range(len(buckets)), buckets)))
    except Exception as error:  # noqa: BLE001 - reported through the queue, raised on every rank at finalize
        written = error
    results.put(written)


class InProcessSaveStrategy(TorchDistSaveShardedStrategy):
    """megatron's torch_dist save strategy with the in-process writer; `save` writes now, `async_save`
    returns the request for `BackgroundSaves`."""

    def __init__(self, *, snapshot: bool = False):
        super().__init__("torch_dist", 1, thread_count=WRITE_THREADS)
        self.snapshot = snapshot
        self.written: dict[str, dict] = {}

    def async_save(self, sharded_state_dict, checkpoint_dir: Path) -> AsyncRequest:
        sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict,
                                                                            self.keep_only_main_replica)
        writer = InProcessFileSystemWriter(checkpoint_dir, snapshot=self.snapshot)
        self.written = writer.checksums  # this rank's tensor files, once written (store.py's manifest reads it)
        planner = MCoreSavePlanner(dedup_replicated_tensors=not self.keep_only_main_replica, flatten_state_dict=False)
        planned, *_ = save_state_dict_async_plan(mcore_to_pyt_state_dict(sharded_state_dict, False), writer, None, 0,
                                                 planner=planner)
        return self._get_save_and_finalize_callbacks(writer, planned)


class _ThreadCaller(AsyncCaller):
    """Runs one request's write function on a thread of this process."""

    def __init__(self):
        self.thread: threading.Thread | None = None

    def schedule_async_call(self, request: AsyncRequest) -> None:
        if request.async_fn is None:
            return
        args = list(request.async_fn_args)
        if request.preload_fn is not None:
            args[1] = request.preload_fn()
        self.thread = threading.Thread(target=request.async_fn, args=args, kwargs=request.async_fn_kwargs,
                                       name="megatron_ext checkpoint writer", daemon=True)
        self.thread.start()

    def is_current_async_call_done(self, blocking: bool = False, no_dist: bool = False) -> bool:
        if blocking and self.thread is not None:
            self.thread.join()
        alive = int(self.thread is not None and self.thread.is_alive())
        done = not alive if no_dist else bool(self.sync_all_async_calls(alive))
        if done:
            self.close()
        return done

    def close(self, abort: bool = False) -> None:
        if self.thread is not None and not abort:
            self.thread.join()
        self.thread = None

    def __del__(self):
        pass


class _ThreadCallsQueue(AsyncCallsQueue):
    def _get_async_caller(self) -> AsyncCaller:
        return _ThreadCaller()


class BackgroundSaves:
    """At most one checkpoint being written in the background; collective, like the saves themselves.

    `schedule` starts a save (after `wait` for the previous one); `poll` finishes a save whose
    write is done on every rank (call it once per iteration, on every rank); `wait` finishes the one in
    flight. `last` is the newest checkpoint a background save completed.
    """

    def __init__(self):
        self._queue = _ThreadCallsQueue()
        self.last: Path | None = None

    @property
    def in_flight(self) -> bool:
        return self._queue.get_num_unfinalized_calls() > 0

    def schedule(self, request: AsyncRequest, final: Path) -> None:
        """Start writing `request` (the caller has waited for the previous save: store.save_checkpoint does, before
        it captures the state); once written everywhere, its finalize steps complete `final`."""
        def finalize():
            for step in request.finalize_fns:
                step()
            self.last = final

        self._queue.schedule_async_request(request._replace(finalize_fns=[finalize]))

    def poll(self) -> None:
        if self.in_flight:
            self._queue.maybe_finalize_async_calls(blocking=False)

    def wait(self) -> None:
        if self.in_flight:
            self._queue.maybe_finalize_async_calls(blocking=True)
