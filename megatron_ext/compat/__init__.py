"""Compatibility layers around megatron-core 0.16.x, one module per cause, and the one entry point.

`prepare_megatron()` applies what this machine needs: `cpu` (CUDA absent) and `torch_optim`
(megatron's distributed optimizer without Apex/TE, GPU or not). `stock_rope` is an explicit
opt-in for tests and benchmarks; `extras` detects TE and apex; `requirements` checks the
installed megatron-core (read once, here, at import) and psutil.
"""
import logging

import torch

from megatron_ext.compat import requirements
from megatron_ext.compat.cpu import (
    CPU_PATCHES,
    CpuPatch,
    cpu_mode_enabled,
    describe_cpu_patches,
    enable_cpu_mode,
)
from megatron_ext.compat.patches import Patch, PatchGroup
from megatron_ext.compat.requirements import MissingPsutil, UnsupportedMegatronCore
from megatron_ext.compat.stock_rope import enable_stock_rope_on_cpu
from megatron_ext.compat.torch_optim import (
    TORCH_OPTIM_FIXES,
    describe_torch_optim_fixes,
    enable_torch_optim_fixes,
)

logger = logging.getLogger("megatron_ext")
_path_logged = False


def prepare_megatron() -> None:
    """Apply what this machine needs before megatron-core builds or loads anything; idempotent.

    CPU patches only without CUDA; torch.optim fixes wherever megatron's distributed optimizer
    falls back to torch.optim. Logs the path once, in one line. Raises UnsupportedMegatronCore
    for a megatron-core other than 0.16.x and MissingPsutil without psutil.
    """
    global _path_logged
    requirements.check_installation()
    cpu_patches = [] if torch.cuda.is_available() else CPU_PATCHES.apply()
    torch_optim_fixes = enable_torch_optim_fixes()
    if not _path_logged:
        logger.info("megatron_ext: megatron-core %s; %s; %s", requirements.INSTALLED_MEGATRON_CORE,
                    _cpu_path(cpu_patches), _optimizer_path(torch_optim_fixes))
        _path_logged = True


def _cpu_path(cpu_patches: list[str]) -> str:
    if cpu_patches:
        return f"CUDA absent -> {len(cpu_patches)} CPU patches (megatron_ext.compat.cpu)"
    return "CUDA available -> no CPU patches"


def _optimizer_path(torch_optim_fixes: list[str]) -> str:
    if torch_optim_fixes:
        return (f"no Apex/TE optimizer -> {len(torch_optim_fixes)} torch.optim fixes "
                "(megatron_ext.compat.torch_optim)")
    return "Apex/TE optimizer -> distributed optimizer unpatched"


__all__ = ["CPU_PATCHES", "CpuPatch", "MissingPsutil", "Patch", "PatchGroup", "TORCH_OPTIM_FIXES",
           "UnsupportedMegatronCore", "cpu_mode_enabled", "describe_cpu_patches",
           "describe_torch_optim_fixes", "enable_cpu_mode", "enable_stock_rope_on_cpu",
           "enable_torch_optim_fixes", "prepare_megatron"]
