"""Running megatron-core 0.16.1 without CUDA: the one place in megatron_ext that knows how.

Named patches, applied by `enable_cpu_mode()` only when CUDA is absent (a GPU runs
megatron-core untouched). Imports torch and megatron.core only, never other megatron_ext code.

How the patches work. Most of megatron's CUDA assumptions are calls on the module-global
name `torch` (`torch.zeros(device="cuda")`, `torch.cuda.current_device()`,
`torch.cuda.synchronize()`). For each affected megatron module, that module's global `torch`
is replaced by `_CPU_TORCH`, a stand-in that forwards everything to the real torch except:
factory functions move `device="cuda"` (or a bare int ordinal) to the CPU and drop
`pin_memory`, `torch.cuda.current_device()` is "cpu", synchronize/streams/empty_cache are
no-ops and the CUDA RNG calls use the CPU generator. The real `torch` module is never
modified. The few checks on Tensor methods (`t.type() == "torch.cuda.FloatTensor"`,
`t.cuda()`) are overridden on `torch.Tensor` only while the one wrapped megatron function runs.
The distributed optimizer's checkpoint code also has bugs on its torch.optim path (the only
path without Apex/Transformer Engine); those are fixed here too, each as its own patch.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import types
from dataclasses import dataclass
from typing import Callable

import torch

logger = logging.getLogger("megatron_ext")

__all__ = ["CPU_PATCHES", "CpuPatch", "cpu_mode_enabled", "describe_cpu_patches",
           "enable_cpu_mode"]


@dataclass(frozen=True)
class CpuPatch:
    """One workaround: `why` names the megatron file/function and what it hard-codes."""

    name: str
    why: str
    apply: Callable[[], None]


CPU_PATCHES: list[CpuPatch] = []
_applied: set[str] = set()
_enabled = False
_path_logged = False


def _patch(name: str, why: str):
    """Register the decorated function as the `apply` of a named patch (in definition order)."""
    def register(apply: Callable[[], None]) -> Callable[[], None]:
        CPU_PATCHES.append(CpuPatch(name=name, why=why, apply=apply))
        return apply
    return register


# --- the stand-in for `torch` inside patched megatron modules ------------------------------

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


_CPU_TORCH = _CpuTorch()


def _use_cpu_torch_in(*module_names: str) -> None:
    for module_name in module_names:
        importlib.import_module(module_name).torch = _CPU_TORCH


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


def _while_running(function, method_name: str, replacement):
    """`function`, with torch.Tensor.<method_name> replaced only while it runs."""
    @functools.wraps(function)
    def wrapped(*args, **kwargs):
        with _tensor_method(method_name, replacement):
            return function(*args, **kwargs)
    return wrapped


def _override_while_running(owner, attribute: str, method_name: str, replacement):
    """Replace owner.<attribute> by itself run under `_while_running`; return the wrapper."""
    wrapped = _while_running(getattr(owner, attribute), method_name, replacement)
    setattr(owner, attribute, wrapped)
    return wrapped


_ORIGINAL_TENSOR_TYPE = torch.Tensor.type


def _type_named_as_cuda(self, dtype=None, non_blocking=False, **kwargs):
    """Tensor.type() that names a CPU tensor like its CUDA twin ("torch.cuda.FloatTensor")."""
    if dtype is None and not kwargs and self.device.type == "cpu":
        return _ORIGINAL_TENSOR_TYPE(self).replace("torch.", "torch.cuda.", 1)
    return _ORIGINAL_TENSOR_TYPE(self, dtype, non_blocking, **kwargs)


def _cuda_is_identity(self, *args, **kwargs):
    """Tensor.cuda() that leaves a CPU tensor where it is."""
    return self


# --- module shims: megatron modules whose global `torch` becomes the CPU stand-in ----------

@_patch("shim_pipeline_schedules",
        "pipeline_parallel/schedules.py: forward_backward_{no_pipelining,pipelining_*} "
        "count tokens in torch.zeros(device='cuda')")
def _shim_pipeline_schedules():
    _use_cpu_torch_in("megatron.core.pipeline_parallel.schedules")


@_patch("shim_p2p_communication",
        "pipeline_parallel/p2p_communication.py: P2PCommunicator allocates receive buffers "
        "on torch.cuda.current_device() and calls torch.cuda.synchronize()")
def _shim_p2p_communication():
    _use_cpu_torch_in("megatron.core.pipeline_parallel.p2p_communication")


@_patch("shim_param_and_grad_buffer",
        "distributed/param_and_grad_buffer.py: _ParamAndGradBuffer allocates DDP param/grad "
        "buffers on torch.cuda.current_device()")
def _shim_param_and_grad_buffer():
    _use_cpu_torch_in("megatron.core.distributed.param_and_grad_buffer")


@_patch("shim_optimizer",
        "optimizer/optimizer.py: FP32Optimizer._scale, MixedPrecisionOptimizer.found_inf and "
        "ChainedOptimizer loss scale are torch.tensor(device='cuda')")
def _shim_optimizer():
    _use_cpu_torch_in("megatron.core.optimizer.optimizer")


@_patch("shim_clip_grads",
        "optimizer/clip_grads.py: get_grad_norm_fp32, clip_grad_by_total_norm_fp32 and "
        "count_zeros_fp32 build their buffers with device='cuda'")
def _shim_clip_grads():
    _use_cpu_torch_in("megatron.core.optimizer.clip_grads")


@_patch("shim_l2_norm",
        "utils.py: local_multi_tensor_l2_norm (clip_grads' norm without Apex/TE) returns "
        "torch.tensor(device='cuda')")
def _shim_l2_norm():
    _use_cpu_torch_in("megatron.core.utils")


@_patch("shim_checkpoint_writers",
        "dist_checkpointing/strategies/{filesystem_async,state_dict_saver,async_utils,"
        "fully_parallel}.py: torch.cuda.synchronize() and flags on torch.cuda.current_device()")
def _shim_checkpoint_writers():
    strategies = "megatron.core.dist_checkpointing.strategies"
    _use_cpu_torch_in(f"{strategies}.filesystem_async", f"{strategies}.state_dict_saver",
                      f"{strategies}.async_utils", f"{strategies}.fully_parallel")


@_patch("shim_distrib_optimizer",
        "optimizer/distrib_optimizer.py: load_state_dict allocates dummy state and "
        "get_parameter_state_dp_zero receive buffers on torch.cuda.current_device()")
def _shim_distrib_optimizer():
    _use_cpu_torch_in("megatron.core.optimizer.distrib_optimizer")


@_patch("rotary_embedding_on_cpu",
        "models/common/embeddings/{rotary,yarn_rotary}_pos_embedding.py: get_emb moves "
        "inv_freq to torch.cuda.current_device() at the first forward")
def _rotary_embedding_on_cpu():
    embeddings = "megatron.core.models.common.embeddings"
    _use_cpu_torch_in(f"{embeddings}.rotary_pos_embedding",
                      f"{embeddings}.yarn_rotary_pos_embedding")


@_patch("rng_tracker_on_cpu",
        "tensor_parallel/random.py: _get/_set_cuda_rng_state and CudaRNGStatesTracker.add use "
        "the CUDA generator (activation recompute, model_parallel_cuda_manual_seed, fork)")
def _rng_tracker_on_cpu():
    # The CPU default generator plays the role of the CUDA generator. The stock setter queues
    # its work with torch.cuda._lazy_call, which a CPU-only build silently never runs.
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    random.torch = _CPU_TORCH

    def get_rng_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_rng_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    random._get_cuda_rng_state = get_rng_state
    random._set_cuda_rng_state = set_rng_state


# --- Tensor-method checks, overridden only inside the wrapped function ---------------------

@_patch("cuda_type_names_in_optimizer_checks",
        "optimizer/{clip_grads,optimizer,distrib_optimizer}.py: clip_grad_by_total_norm_fp32, "
        "Float16OptimizerWithFloat16Params.__init__ and DistributedOptimizer."
        "_build_model_and_main_param_groups require t.type() == 'torch.cuda.*Tensor'")
def _cuda_type_names_in_optimizer_checks():
    clip_grads = importlib.import_module("megatron.core.optimizer.clip_grads")
    optimizer = importlib.import_module("megatron.core.optimizer.optimizer")
    distrib_optimizer = importlib.import_module("megatron.core.optimizer.distrib_optimizer")

    optimizer.clip_grad_by_total_norm_fp32 = _override_while_running(  # imported by name
        clip_grads, "clip_grad_by_total_norm_fp32", "type", _type_named_as_cuda)
    _override_while_running(optimizer.Float16OptimizerWithFloat16Params, "__init__", "type",
                            _type_named_as_cuda)

    distributed = distrib_optimizer.DistributedOptimizer
    build_groups = distributed.__dict__["_build_model_and_main_param_groups"].__func__
    distributed._build_model_and_main_param_groups = classmethod(
        _while_running(build_groups, "type", _type_named_as_cuda))


@_patch("tied_embeddings_cuda_noop",
        "models/common/language_module/language_module.py: setup_embeddings_and_output_layer "
        "does weight.data.cuda() before the embedding-group all-reduce (tied embeddings, PP>1)")
def _tied_embeddings_cuda_noop():
    language_module = importlib.import_module(
        "megatron.core.models.common.language_module.language_module")
    _override_while_running(language_module.LanguageModule, "setup_embeddings_and_output_layer",
                            "cuda", _cuda_is_identity)


@_patch("rope_cp_slice_on_cpu",
        "models/common/embeddings/rope_utils.py: get_pos_emb_on_this_cp_rank (RoPE with CP>1) "
        "builds its chunk index with pin_memory=True and .cuda()")
def _rope_cp_slice_on_cpu():
    embeddings = "megatron.core.models.common.embeddings"
    rope_utils = importlib.import_module(f"{embeddings}.rope_utils")
    rope_utils.torch = _CPU_TORCH
    cp_slice = _override_while_running(rope_utils, "get_pos_emb_on_this_cp_rank", "cuda",
                                       _cuda_is_identity)
    for importer in ("rotary_pos_embedding", "yarn_rotary_pos_embedding"):  # imported by name
        importlib.import_module(f"{embeddings}.{importer}").get_pos_emb_on_this_cp_rank = cp_slice


# --- not CUDA, but makes every torch_dist save hang ----------------------------------------

@_patch("psutil_free_writer",
        "dist_checkpointing/strategies/filesystem_async.py: the forked writer calls "
        "_process_memory() outside its try; without psutil it raises and save() waits forever")
def _psutil_free_writer():
    filesystem_async = importlib.import_module(
        "megatron.core.dist_checkpointing.strategies.filesystem_async")
    process_memory = filesystem_async._process_memory

    def process_memory_or_zero() -> int:
        return process_memory() if filesystem_async.HAVE_PSUTIL else 0

    filesystem_async._process_memory = process_memory_or_zero


# --- distributed optimizer checkpoints on the torch.optim path (no Apex/TE) -----------------

def _distrib_optimizer_module():
    return importlib.import_module("megatron.core.optimizer.distrib_optimizer")


@_patch("distopt_state_dict_before_first_step",
        "optimizer/distrib_optimizer.py: state_dict asserts one 'step' across an empty "
        "torch.optim state, so loading into an optimizer that has not stepped fails")
def _distopt_state_dict_before_first_step():
    distrib_optimizer = _distrib_optimizer_module()
    distributed = distrib_optimizer.DistributedOptimizer
    stock_state_dict = distributed.state_dict

    def state_dict(self):
        if distrib_optimizer.HAVE_APEX_OR_TE or len(self.optimizer.state) > 0:
            return stock_state_dict(self)
        # What the stock method returns after a step, with step 0 (as on the Apex/TE path).
        inner = self.optimizer.state_dict()
        optimizer_state = {key: value for key, value in inner.items() if key != "state"}
        for param_group in optimizer_state["param_groups"]:
            del param_group["params"]
            param_group["step"] = 0
        result = {"optimizer": optimizer_state}
        if self.grad_scaler:
            result["grad_scaler"] = self.grad_scaler.state_dict()
        return result

    distributed.state_dict = functools.wraps(stock_state_dict)(state_dict)


@_patch("distopt_dp_zero_gather_on_cpu",
        "optimizer/distrib_optimizer.py: get_parameter_state_dp_zero(use_gloo_comm=False), "
        "used by the default fully_reshardable save, moves each shard with send_tensor.cuda()")
def _distopt_dp_zero_gather_on_cpu():
    _override_while_running(_distrib_optimizer_module().DistributedOptimizer,
                            "get_parameter_state_dp_zero", "cuda", _cuda_is_identity)


@_patch("distopt_keep_loaded_step",
        "optimizer/distrib_optimizer.py: _set_main_param_and_optimizer_states copies 'step' "
        "from the loaded shard: KeyError (fully_reshardable) or the pre-load step (dp_reshardable)")
def _distopt_keep_loaded_step():
    # load_state_dict has already set every state['step'] from the checkpoint's param_groups
    # before the per-parameter loaders run; the shard's own 'step' is absent or stale.
    distributed = _distrib_optimizer_module().DistributedOptimizer
    stock_set_states = distributed._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        if not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            live_state = self.optimizer.state[main_param]
            if "step" in live_state:
                tensors = {**tensors, "step": live_state["step"]}
        return stock_set_states(self, model_param, tensors)

    distributed._set_main_param_and_optimizer_states = functools.wraps(stock_set_states)(
        set_states)


@_patch("distopt_dp_reshardable_load_no_grad",
        "optimizer/distrib_optimizer.py: load_parameter_state_from_dp_reshardable lacks "
        "torch.no_grad(), so copy_ into fp32 main params (leaves needing grad) raises")
def _distopt_dp_reshardable_load_no_grad():
    distributed = _distrib_optimizer_module().DistributedOptimizer
    distributed.load_parameter_state_from_dp_reshardable = torch.no_grad()(
        distributed.load_parameter_state_from_dp_reshardable)


@_patch("distopt_unshare_step_tensor",
        "optimizer/distrib_optimizer.py: load_state_dict puts ONE 'step' tensor in every "
        "param's state; torch Adam then adds 1 per param, corrupting bias correction")
def _distopt_unshare_step_tensor():
    distrib_optimizer = _distrib_optimizer_module()
    distributed = distrib_optimizer.DistributedOptimizer
    stock_load_state_dict = distributed.load_state_dict

    def load_state_dict(self, state_dict):
        result = stock_load_state_dict(self, state_dict)
        if distrib_optimizer.HAVE_APEX_OR_TE:
            return result
        seen = set()
        for param_state in self.optimizer.state.values():
            step = param_state.get("step")
            if torch.is_tensor(step):
                if id(step) in seen:
                    param_state["step"] = step = step.clone()
                seen.add(id(step))
        return result

    distributed.load_state_dict = functools.wraps(stock_load_state_dict)(load_state_dict)


# --- public API ----------------------------------------------------------------------------

def enable_cpu_mode(force: bool = False) -> list[str]:
    """Apply every CPU patch once; return the names of the patches in effect.

    Without `force`, does nothing and returns [] when CUDA is available: the GPU path runs
    megatron-core untouched. Safe to call more than once.
    """
    global _enabled, _path_logged
    if torch.cuda.is_available() and not force:
        if not _path_logged:
            logger.info("megatron_ext: CUDA available -> megatron-core runs unpatched")
            _path_logged = True
        return []
    for patch in CPU_PATCHES:
        if patch.name not in _applied:
            patch.apply()
            _applied.add(patch.name)
    _enabled = True
    if not _path_logged:
        reason = "forced" if torch.cuda.is_available() else "CUDA absent"
        logger.info("megatron_ext: %s -> CPU compatibility mode (%d megatron-core patches, "
                    "see megatron_ext.compat.cpu)", reason, len(CPU_PATCHES))
        _path_logged = True
    return [patch.name for patch in CPU_PATCHES]


def cpu_mode_enabled() -> bool:
    """Whether enable_cpu_mode() has applied the patches in this process."""
    return _enabled


def describe_cpu_patches() -> str:
    """The registry as a two-column table: name | why."""
    width = max(len(patch.name) for patch in CPU_PATCHES)
    header = f"{'name':<{width}} | why"
    rows = [f"{patch.name:<{width}} | {patch.why}" for patch in CPU_PATCHES]
    return "\n".join([header, "-" * len(header), *rows])
