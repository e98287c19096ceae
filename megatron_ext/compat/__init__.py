"""Compatibility layers around megatron-core; `cpu` makes it run without CUDA."""
from megatron_ext.compat.cpu import (
    CPU_PATCHES,
    CpuPatch,
    cpu_mode_enabled,
    describe_cpu_patches,
    enable_cpu_mode,
)

__all__ = ["CPU_PATCHES", "CpuPatch", "cpu_mode_enabled", "describe_cpu_patches",
           "enable_cpu_mode"]
