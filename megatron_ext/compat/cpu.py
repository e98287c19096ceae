"""Running megatron-core 0.16.x without CUDA: the patches a CUDA-less machine needs, and only those.

Applied by `enable_cpu_mode()` (or `prepare_megatron()`) only when CUDA is absent; a GPU runs
megatron-core without them. Imports torch, megatron.core and megatron_ext.compat only.
How a patch reaches into megatron (a stand-in `torch`, scoped Tensor overrides): see cpu_torch.
"""
from __future__ import annotations

import importlib
import logging

import torch

from megatron_ext.compat import requirements
from megatron_ext.compat.cpu_torch import (
    CPU_TORCH,
    cuda_is_identity,
    override_while_running,
    type_named_as_cuda,
    use_cpu_torch_in,
    while_running,
)
from megatron_ext.compat.patches import Patch, PatchGroup

logger = logging.getLogger("megatron_ext")

__all__ = ["CPU_PATCHES", "CpuPatch", "cpu_mode_enabled", "describe_cpu_patches",
           "enable_cpu_mode"]

CpuPatch = Patch  # the name megatron_ext.compat exported before the patch groups were split
CPU_PATCHES = PatchGroup("CUDA absent")
_path_logged = False


# --- module shims: megatron modules whose global `torch` becomes the CPU stand-in ----------

@CPU_PATCHES.patch(
    "shim_pipeline_schedules",
    "pipeline_parallel/schedules.py: forward_backward_{no_pipelining,pipelining_*} "
    "count tokens in torch.zeros(device='cuda')")
def _shim_pipeline_schedules():
    use_cpu_torch_in("megatron.core.pipeline_parallel.schedules")


@CPU_PATCHES.patch(
    "shim_p2p_communication",
    "pipeline_parallel/p2p_communication.py: P2PCommunicator allocates receive buffers "
    "on torch.cuda.current_device() and calls torch.cuda.synchronize()")
def _shim_p2p_communication():
    use_cpu_torch_in("megatron.core.pipeline_parallel.p2p_communication")


@CPU_PATCHES.patch(
    "shim_param_and_grad_buffer",
    "distributed/param_and_grad_buffer.py: _ParamAndGradBuffer allocates DDP param/grad "
    "buffers on torch.cuda.current_device()")
def _shim_param_and_grad_buffer():
    use_cpu_torch_in("megatron.core.distributed.param_and_grad_buffer")


@CPU_PATCHES.patch(
    "shim_optimizer",
    "optimizer/optimizer.py: FP32Optimizer._scale, MixedPrecisionOptimizer.found_inf and "
    "ChainedOptimizer loss scale are torch.tensor(device='cuda')")
def _shim_optimizer():
    use_cpu_torch_in("megatron.core.optimizer.optimizer")


@CPU_PATCHES.patch(
    "shim_clip_grads",
    "optimizer/clip_grads.py: get_grad_norm_fp32, clip_grad_by_total_norm_fp32 and "
    "count_zeros_fp32 build their buffers with device='cuda'")
def _shim_clip_grads():
    use_cpu_torch_in("megatron.core.optimizer.clip_grads")


@CPU_PATCHES.patch(
    "shim_l2_norm",
    "utils.py: local_multi_tensor_l2_norm (clip_grads' norm without Apex/TE) returns "
    "torch.tensor(device='cuda')")
def _shim_l2_norm():
    use_cpu_torch_in("megatron.core.utils")


@CPU_PATCHES.patch(
    "shim_checkpoint_writers",
    "dist_checkpointing/strategies/{filesystem_async,state_dict_saver,async_utils,"
    "fully_parallel}.py: torch.cuda.synchronize() and flags on torch.cuda.current_device()")
def _shim_checkpoint_writers():
    strategies = "megatron.core.dist_checkpointing.strategies"
    use_cpu_torch_in(f"{strategies}.filesystem_async", f"{strategies}.state_dict_saver",
                     f"{strategies}.async_utils", f"{strategies}.fully_parallel")


@CPU_PATCHES.patch(
    "shim_distrib_optimizer",
    "optimizer/distrib_optimizer.py: load_state_dict allocates dummy state and "
    "get_parameter_state_dp_zero receive buffers on torch.cuda.current_device()")
def _shim_distrib_optimizer():
    use_cpu_torch_in("megatron.core.optimizer.distrib_optimizer")


@CPU_PATCHES.patch(
    "rng_tracker_on_cpu",
    "tensor_parallel/random.py: _get/_set_cuda_rng_state and CudaRNGStatesTracker.add use "
    "the CUDA generator (activation recompute, model_parallel_cuda_manual_seed, fork)")
def _rng_tracker_on_cpu():
    # The CPU default generator plays the role of the CUDA generator. The stock setter queues
    # its work with torch.cuda._lazy_call, which a CPU-only build silently never runs.
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    random.torch = CPU_TORCH

    def get_rng_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_rng_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    random._get_cuda_rng_state = get_rng_state
    random._set_cuda_rng_state = set_rng_state


# --- Tensor-method checks, overridden only inside the wrapped function ---------------------

@CPU_PATCHES.patch(
    "cuda_type_names_in_optimizer_checks",
    "optimizer/{clip_grads,optimizer,distrib_optimizer}.py: clip_grad_by_total_norm_fp32, "
    "Float16OptimizerWithFloat16Params.__init__ and DistributedOptimizer."
    "_build_model_and_main_param_groups require t.type() == 'torch.cuda.*Tensor'")
def _cuda_type_names_in_optimizer_checks():
    clip_grads = importlib.import_module("megatron.core.optimizer.clip_grads")
    optimizer = importlib.import_module("megatron.core.optimizer.optimizer")
    distrib_optimizer = importlib.import_module("megatron.core.optimizer.distrib_optimizer")

    optimizer.clip_grad_by_total_norm_fp32 = override_while_running(  # imported by name
        clip_grads, "clip_grad_by_total_norm_fp32", "type", type_named_as_cuda)
    override_while_running(optimizer.Float16OptimizerWithFloat16Params, "__init__", "type",
                           type_named_as_cuda)

    distributed = distrib_optimizer.DistributedOptimizer
    build_groups = distributed.__dict__["_build_model_and_main_param_groups"].__func__
    distributed._build_model_and_main_param_groups = classmethod(
        while_running(build_groups, "type", type_named_as_cuda))


@CPU_PATCHES.patch(
    "tied_embeddings_cuda_noop",
    "models/common/language_module/language_module.py: setup_embeddings_and_output_layer "
    "does weight.data.cuda() before the embedding-group all-reduce (tied embeddings, PP>1)")
def _tied_embeddings_cuda_noop():
    language_module = importlib.import_module(
        "megatron.core.models.common.language_module.language_module")
    override_while_running(language_module.LanguageModule, "setup_embeddings_and_output_layer",
                           "cuda", cuda_is_identity)


@CPU_PATCHES.patch(
    "distopt_dp_zero_gather_on_cpu",
    "optimizer/distrib_optimizer.py: get_parameter_state_dp_zero(use_gloo_comm=False), "
    "used by the default fully_reshardable save, moves each shard with send_tensor.cuda()")
def _distopt_dp_zero_gather_on_cpu():
    distrib_optimizer = importlib.import_module("megatron.core.optimizer.distrib_optimizer")
    override_while_running(distrib_optimizer.DistributedOptimizer, "get_parameter_state_dp_zero",
                           "cuda", cuda_is_identity)


# --- public API ----------------------------------------------------------------------------

def enable_cpu_mode(force: bool = False) -> list[str]:
    """Apply every CPU patch once; return the names of the patches in effect.

    Without `force`, does nothing and returns [] when CUDA is available: the GPU path needs none
    of them. Safe to call more than once. The torch.optim fixes are not part of it:
    `megatron_ext.compat.prepare_megatron()` applies both groups where each is needed.
    """
    global _path_logged
    if torch.cuda.is_available() and not force:
        if not _path_logged:
            logger.info("megatron_ext: CUDA available -> no CPU patches of megatron-core")
            _path_logged = True
        return []
    requirements.check_installation()
    names = CPU_PATCHES.apply()
    if not _path_logged:
        reason = "forced" if torch.cuda.is_available() else "CUDA absent"
        logger.info("megatron_ext: %s -> CPU compatibility mode (%d megatron-core patches, "
                    "see megatron_ext.compat.cpu)", reason, len(CPU_PATCHES))
        _path_logged = True
    return names


def cpu_mode_enabled() -> bool:
    """Whether the CPU patches are in effect in this process."""
    return CPU_PATCHES.is_applied()


def describe_cpu_patches() -> str:
    """The CPU patches as a two-column table: name | why."""
    return CPU_PATCHES.describe()
