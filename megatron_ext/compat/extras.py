"""The optional GPU extras megatron-core looks for (Transformer Engine, NVIDIA apex), detected once here.

They change megatron's code paths (layer spec, fused optimizers), so every "which path runs"
decision and log line reads them from here. Imports nothing but the extras themselves.
"""
from __future__ import annotations


def transformer_engine_available() -> bool:
    """Whether transformer_engine.pytorch imports (a TE build matching this torch/CUDA)."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or a TE build that does not match the installed torch/CUDA
        return False
    return True


def apex_available() -> bool:
    """Whether NVIDIA apex imports with its fused optimizers (as megatron imports it).

    The PyPI package named apex is unrelated and has no `apex.optimizers`: it counts as absent.
    """
    try:
        from apex.optimizers import FusedAdam  # noqa: F401
    except Exception:  # ImportError, or an apex build whose CUDA extension does not load
        return False
    return True


def fused_kernels_line() -> str:
    """One log line saying which optional GPU extras run (they change megatron's code paths)."""
    te = ("Transformer Engine" if transformer_engine_available()
          else "no Transformer Engine (local layers)")
    apex = "apex" if apex_available() else "no apex (torch optimizers)"
    return f"{te}, {apex}"
