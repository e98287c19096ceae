"""The stand-in for `torch` that CUDA-less patches give a megatron module, and scoped Tensor overrides.

Most of megatron's CUDA assumptions are calls on the module-global name `torch`
(`torch.zeros(device="cuda")`, `torch.cuda.current_device()`, `torch.cuda.synchronize()`).
`use_cpu_torch_in` replaces that global, in the named megatron modules only, by `CPU_TORCH`: it
forwards everything to the real torch except that factory functions move `device="cuda"` (or a
bare int ordinal) to the CPU and drop `pin_memory`, `torch.cuda.current_device()` is "cpu",
synchronize/streams/empty_cache are no-ops and the CUDA RNG calls use the CPU generator. The real
`torch` module is never modified. Checks on Tensor methods (`t.type() == "torch.cuda.FloatTensor"`,
`t.cuda()`) are overridden on `torch.Tensor` only while one wrapped megatron function runs.
Imports torch only.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import types

import torch

# --- the stand-in for `torch` inside patched megatron modules ---------------------------------

_FACTORIES = frozenset({
    "zeros", "empty", "ones", "full", "tensor", "as_tensor", "arange", "eye", "linspace",
    "rand", "randn", "randint", "zeros_like", "empty_like", "ones_like", "full_like",
})


def _is_cuda_device(device) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):  # a bare int device is a CUDA ordinal
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


def _on_cpu(factory):
    """`factory(..., device="cuda", pin_memory=True)` -> `factory(..., device="cpu")`."""
    @functools.wraps(factory)
    def cpu_factory(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        kwargs.pop("pin_memory", None)  # pinned memory needs an accelerator
        return factory(*args, **kwargs)
    return cpu_factory


class _NoStream:
    """Stands in for torch.cuda.Stream: CPU work is already ordered."""

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def record_event(self, *args, **kwargs):
        return None


class _CpuCuda(types.ModuleType):
    """`torch.cuda` as seen from a patched megatron module."""

    def __init__(self):
        super().__init__("torch.cuda (megatron_ext CPU stand-in)")

    def current_device(self):
        return "cpu"

    def synchronize(self, *args, **kwargs):
        pass

    def empty_cache(self):
        pass

    def Stream(self, *args, **kwargs):  # noqa: N802 (mirrors torch.cuda.Stream)
        return _NoStream()

    def current_stream(self, *args, **kwargs):
        return _NoStream()

    def default_stream(self, *args, **kwargs):
        return _NoStream()

    def stream(self, *args, **kwargs):
        return contextlib.nullcontext()

    def get_rng_state(self, *args, **kwargs):
        return torch.get_rng_state()

    def manual_seed(self, seed):
        torch.manual_seed(seed)

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _CpuTorch(types.ModuleType):
    """`torch` as seen from a patched megatron module."""

    def __init__(self):
        super().__init__("torch (megatron_ext CPU stand-in)")
        self.cuda = _CpuCuda()

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in _FACTORIES:
            attr = _on_cpu(attr)
        setattr(self, name, attr)  # later look-ups skip __getattr__
        return attr


CPU_TORCH = _CpuTorch()


def use_cpu_torch_in(*module_names: str) -> None:
    """Make CPU_TORCH the global `torch` of each named megatron module (and of no other)."""
    for module_name in module_names:
        importlib.import_module(module_name).torch = CPU_TORCH


# --- Tensor methods overridden only while one megatron function runs ----------------------

_MISSING = object()


@contextlib.contextmanager
def _tensor_method(name: str, replacement):
    """Set torch.Tensor.<name> = replacement for the duration of the block (re-entrant)."""
    previous = torch.Tensor.__dict__.get(name, _MISSING)
    if previous is replacement:  # an enclosing wrapped call already overrides it
        yield
        return
    setattr(torch.Tensor, name, replacement)
    try:
        yield
    finally:
        if previous is _MISSING:
            delattr(torch.Tensor, name)
        else:
            setattr(torch.Tensor, name, previous)


def while_running(function, method_name: str, replacement):
    """`function`, with torch.Tensor.<method_name> replaced only while it runs."""
    @functools.wraps(function)
    def wrapped(*args, **kwargs):
        with _tensor_method(method_name, replacement):
            return function(*args, **kwargs)
    return wrapped


def override_while_running(owner, attribute: str, method_name: str, replacement):
    """Replace owner.<attribute> by itself run under `while_running`; return the wrapper."""
    wrapped = while_running(getattr(owner, attribute), method_name, replacement)
    setattr(owner, attribute, wrapped)
    return wrapped


_ORIGINAL_TENSOR_TYPE = torch.Tensor.type


def type_named_as_cuda(self, dtype=None, non_blocking=False, **kwargs):
    """Tensor.type() that names a CPU tensor like its CUDA twin ("torch.cuda.FloatTensor")."""
    if dtype is None and not kwargs and self.device.type == "cpu":
        return _ORIGINAL_TENSOR_TYPE(self).replace("torch.", "torch.cuda.", 1)
    return _ORIGINAL_TENSOR_TYPE(self, dtype, non_blocking, **kwargs)


def cuda_is_identity(self, *args, **kwargs):
    """Tensor.cuda() that leaves a CPU tensor where it is."""
    return self
