"""Count the bytes of every tensor storage that torch ops create, while they live, by category.

A TorchDispatchMode sees each op's outputs; a weak reference on each new untyped storage takes its bytes
off again when the storage is freed (the mechanism of torch.distributed._tools.mem_tracker.MemTracker,
which works on fake tensors: a FakeTensor's storage has the bytes a real one would have). Categories are
megatron-aware, which MemTracker's are not (it files weights and gradients by nn.Module hooks and `.grad`,
while megatron keeps both in DDP's contiguous buffers, its gradients in `main_grad`, and the distributed
optimizer's fp32 master shards outside `optimizer.state`):

  parameters, gradients, optimizer state   storages named by the caller (`assign`)
  activations                              storages that autograd saves for the backward (a saved-tensors
                                           hook marks them), while they live
  temporaries                              everything else made during a forward, backward or optimizer step
  other                                    made while building, not named (RoPE frequencies, small buffers)

Imports torch only.
"""

import weakref
from collections import Counter
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

PARAMETERS, GRADIENTS, OPTIMIZER = "parameters", "gradients", "optimizer state"
ACTIVATIONS, TEMPORARIES, OTHER = "activations", "temporaries", "other"
CATEGORIES = (PARAMETERS, GRADIENTS, OPTIMIZER, ACTIVATIONS, TEMPORARIES, OTHER)
NAMED = (PARAMETERS, GRADIENTS, OPTIMIZER)  # what a saved-tensor mark does not re-file


class _Record:
    __slots__ = ("nbytes", "category", "ref")

    def __init__(self, nbytes: int, category: str):
        self.nbytes, self.category, self.ref = nbytes, category, None


class LiveStorages(TorchDispatchMode):
    """Live bytes by category, the peak and its split, and the peak of each phase.

    `phase` names what runs now (the caller sets it: "build", "forward 3", "backward 3", "optimizer step");
    storages made while building count as `other` until assigned, later ones as temporaries until autograd
    saves them. Storage resizes (FSDP's trick, unused by megatron's DDP) are not followed.
    """

    def __init__(self):
        super().__init__()
        self.records: dict[int, _Record] = {}
        self.live = Counter()
        self.total = 0
        self.phase = "build"
        self.peak_total, self.peak, self.peak_phase, self.peak_op = 0, {}, "", ""
        self.phase_peaks: dict[str, int] = {}

    # --- accounting ------------------------------------------------------------------------------------

    def _category_now(self) -> str:
        return OTHER if self.phase == "build" else TEMPORARIES

    def track(self, tensor: torch.Tensor, category: str | None = None) -> _Record | None:
        """Count `tensor`'s storage if it is new (in `category`, or the phase's); returns its record."""
        storage = tensor.untyped_storage()
        key = id(storage)
        record = self.records.get(key)
        if record is not None:
            return record
        record = _Record(storage.nbytes(), category or self._category_now())
        record.ref = weakref.ref(storage, lambda _, key=key: self._free(key))
        self.records[key] = record
        self.live[record.category] += record.nbytes
        self.total += record.nbytes
        return record

    def _free(self, key: int) -> None:
        record = self.records.pop(key, None)
        if record is not None:
            self.live[record.category] -= record.nbytes
            self.total -= record.nbytes

    def assign(self, tensors, category: str) -> int:
        """File the storages of `tensors` under `category` (counted now if they were made outside the mode).
        Returns the bytes of the distinct storages."""
        seen, total = set(), 0
        for tensor in tensors:
            record = self.track(tensor, category)
            if id(record) in seen:
                continue
            seen.add(id(record))
            total += record.nbytes
            self._move(record, category)
        self._update_peak("")
        return total

    def _move(self, record: _Record, category: str) -> None:
        if record.category != category:
            self.live[record.category] -= record.nbytes
            self.live[category] += record.nbytes
            record.category = category

    def _saved(self, tensor):
        """autograd's pack hook: a tensor saved for the backward is an activation (unless it is a weight)."""
        if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
            record = self.track(tensor)
            if record.category not in NAMED:
                self._move(record, ACTIVATIONS)
        return tensor

    def _update_peak(self, op) -> None:
        """op: the torch op that just allocated (named in the report when it set the peak)."""
        if self.total > self.phase_peaks.get(self.phase, -1):
            self.phase_peaks[self.phase] = self.total
        if self.total > self.peak_total:
            self.peak_total, self.peak = self.total, dict(self.live)
            self.peak_phase, self.peak_op = self.phase, str(op)

    def reset_peak(self) -> None:
        """Forget the peaks so far (after a warm-up), keep what lives."""
        self.peak_total, self.peak, self.peak_phase, self.peak_op = 0, {}, "", ""
        self.phase_peaks = {}
        self._update_peak("")

    def snapshot(self) -> dict[str, int]:
        return {category: self.live.get(category, 0) for category in CATEGORIES}

    def peak_split(self) -> dict[str, int]:
        return {category: self.peak.get(category, 0) for category in CATEGORIES}

    # --- the mode --------------------------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self.track(value)
        self._update_peak(func)
        return out

    @contextmanager
    def running(self):
        """The mode and the saved-tensors hook, active together."""
        with self, torch.autograd.graph.saved_tensors_hooks(self._saved, lambda tensor: tensor):
            yield self
