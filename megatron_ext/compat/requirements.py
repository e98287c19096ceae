"""What the installed environment must provide before megatron_ext patches megatron-core.

The megatron-core version is read once, at import of megatron_ext.compat; importing never fails,
applying a patch on an unsupported version does. Standard library and megatron_ext.errors only.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import re

from megatron_ext.errors import UserError

SUPPORTED_MEGATRON_CORE = (0, 16)  # (major, minor): every patch was written against 0.16.x
SUPPORTED_RANGE = ">=0.16,<0.17"
INSTALL_SUPPORTED = f'pip install "megatron-core{SUPPORTED_RANGE}"'


class UnsupportedMegatronCore(UserError):
    """The installed megatron-core is not the version megatron_ext's patches were written for."""


class MissingPsutil(UserError):
    """psutil is absent: megatron's torch_dist checkpoint writer would hang."""


def installed_megatron_core_version() -> str | None:
    """The installed megatron-core's version string, or None when it is not installed."""
    try:
        return importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:
        return None


INSTALLED_MEGATRON_CORE = installed_megatron_core_version()


def _major_minor(version: str) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else None


def require_supported_megatron_core() -> None:
    """Raise UnsupportedMegatronCore unless the megatron-core found at import is 0.16.x."""
    version = INSTALLED_MEGATRON_CORE
    if version is None:
        raise UnsupportedMegatronCore(
            f"megatron-core is not installed; megatron_ext needs megatron-core{SUPPORTED_RANGE}: "
            f"{INSTALL_SUPPORTED}")
    if _major_minor(version) != SUPPORTED_MEGATRON_CORE:
        raise UnsupportedMegatronCore(
            f"megatron-core {version} is installed, but megatron_ext's patches of megatron-core "
            f"are written for megatron-core{SUPPORTED_RANGE}: {INSTALL_SUPPORTED}")


def require_psutil() -> None:
    """Raise MissingPsutil when megatron's checkpoint writer cannot import psutil."""
    filesystem_async = importlib.import_module(
        "megatron.core.dist_checkpointing.strategies.filesystem_async")
    if not filesystem_async.HAVE_PSUTIL:
        raise MissingPsutil(
            "psutil is not installed: megatron-core's torch_dist checkpoint writer "
            "(dist_checkpointing/strategies/filesystem_async.py) calls psutil in its forked "
            "writer, and without it every checkpoint save hangs forever: pip install psutil")


def check_installation() -> None:
    """Both checks, in the order that keeps the psutil probe off an unsupported megatron-core."""
    require_supported_megatron_core()
    require_psutil()
