"""megatron_ext.compat.prepare_megatron: which patch group each machine gets, and what it refuses.

Machines are simulated by monkeypatching torch.cuda.is_available and megatron's HAVE_APEX_OR_TE;
the group-choice tests record which groups are applied instead of applying them, so they also
run on a GPU. The patches themselves are exercised in test_compat_cpu.py.
"""
import importlib.metadata
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import megatron_ext.compat as compat
from megatron_ext.compat import (
    CPU_PATCHES,
    TORCH_OPTIM_FIXES,
    MissingPsutil,
    UnsupportedMegatronCore,
    enable_torch_optim_fixes,
    prepare_megatron,
    requirements,
)
from megatron_ext.compat.stock_rope import STOCK_ROPE_PATCHES
from megatron_ext.errors import UserError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def applied_groups(monkeypatch):
    """The groups prepare_megatron applies, recorded in order; nothing is patched."""
    applied = []
    for label, group in [("cpu", CPU_PATCHES), ("torch_optim", TORCH_OPTIM_FIXES)]:
        monkeypatch.setattr(group, "apply",
                            lambda label=label, group=group: applied.append(label) or group.names())
    monkeypatch.setattr(compat, "_path_logged", False)
    return applied


def simulate_machine(monkeypatch, *, cuda: bool, apex_or_te: bool):
    from megatron.core.optimizer import distrib_optimizer
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(distrib_optimizer, "HAVE_APEX_OR_TE", apex_or_te)


# --- each group on its own condition ---------------------------------------------------------

@pytest.mark.parametrize("cuda, apex_or_te, expected", [
    (True, False, ["torch_optim"]),  # a GPU without Apex/TE: megatron falls back to torch.optim
    (True, True, []),                # the NGC container: megatron-core untouched
    (False, False, ["cpu", "torch_optim"]),
    (False, True, ["cpu"]),
], ids=["gpu-no-apex-te", "gpu-apex-te", "cpu-no-apex-te", "cpu-apex-te"])
def test_each_group_is_applied_exactly_where_its_cause_is(monkeypatch, applied_groups, cuda,
                                                          apex_or_te, expected):
    simulate_machine(monkeypatch, cuda=cuda, apex_or_te=apex_or_te)
    prepare_megatron()
    assert applied_groups == expected


def test_torch_optim_fixes_follow_megatrons_apex_te_flag_not_cuda(monkeypatch, applied_groups):
    simulate_machine(monkeypatch, cuda=True, apex_or_te=False)
    assert enable_torch_optim_fixes() == [patch.name for patch in TORCH_OPTIM_FIXES]
    simulate_machine(monkeypatch, cuda=True, apex_or_te=True)
    assert enable_torch_optim_fixes() == []
    assert applied_groups == ["torch_optim"]


@pytest.mark.parametrize("cuda, apex_or_te, cpu_part, optimizer_part", [
    (False, False, f"CUDA absent -> {len(CPU_PATCHES)} CPU patches (megatron_ext.compat.cpu)",
     f"no Apex/TE optimizer -> {len(TORCH_OPTIM_FIXES)} torch.optim fixes "
     "(megatron_ext.compat.torch_optim)"),
    (True, True, "CUDA available -> no CPU patches",
     "Apex/TE optimizer -> distributed optimizer unpatched"),
])
def test_logs_the_path_once_in_one_line(monkeypatch, applied_groups, caplog, cuda, apex_or_te,
                                        cpu_part, optimizer_part):
    simulate_machine(monkeypatch, cuda=cuda, apex_or_te=apex_or_te)
    with caplog.at_level(logging.INFO, logger="megatron_ext"):
        prepare_megatron()
        prepare_megatron()
    lines = [record.getMessage() for record in caplog.records if record.name == "megatron_ext"]
    assert lines == [f"megatron_ext: megatron-core {requirements.INSTALLED_MEGATRON_CORE}; "
                     f"{cpu_part}; {optimizer_part}"]


# --- psutil ----------------------------------------------------------------------------------

def test_missing_psutil_stops_preparation_instead_of_a_hanging_save(monkeypatch, applied_groups):
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    assert filesystem_async._process_memory() > 0  # psutil installed: the real RSS
    monkeypatch.setattr(filesystem_async, "HAVE_PSUTIL", False)
    with pytest.raises(MissingPsutil) as error:
        prepare_megatron()
    assert isinstance(error.value, UserError)
    assert "hangs" in str(error.value) and str(error.value).endswith("pip install psutil")
    assert applied_groups == []


# --- the megatron-core version ---------------------------------------------------------------

@pytest.fixture
def installed_megatron_core(monkeypatch):
    """Pretend `version` of megatron-core is installed, read the way importing compat reads it."""
    real_version = importlib.metadata.version

    def install(version):
        def fake_version(name):
            if name == "megatron-core":
                if version is None:
                    raise importlib.metadata.PackageNotFoundError(name)
                return version
            return real_version(name)
        monkeypatch.setattr(importlib.metadata, "version", fake_version)
        monkeypatch.setattr(requirements, "INSTALLED_MEGATRON_CORE",
                            requirements.installed_megatron_core_version())
    return install


@pytest.mark.parametrize("version", ["0.15.3", "0.17.0", "1.16.0"])
def test_another_megatron_core_stops_every_patch_group_with_the_fix(installed_megatron_core,
                                                                    version):
    installed_megatron_core(version)
    for apply in (prepare_megatron, CPU_PATCHES.apply, TORCH_OPTIM_FIXES.apply,
                  STOCK_ROPE_PATCHES.apply):
        with pytest.raises(UnsupportedMegatronCore) as error:
            apply()
        assert isinstance(error.value, UserError)
        assert str(error.value) == (
            f"megatron-core {version} is installed, but megatron_ext's patches of megatron-core "
            'are written for megatron-core>=0.16,<0.17: pip install "megatron-core>=0.16,<0.17"')


@pytest.mark.parametrize("version", ["0.16.0", "0.16.1", "0.16.2rc0"])
def test_any_0_16_release_is_supported(installed_megatron_core, version):
    installed_megatron_core(version)
    requirements.require_supported_megatron_core()


def test_missing_megatron_core_names_the_install_command(installed_megatron_core):
    installed_megatron_core(None)
    with pytest.raises(UnsupportedMegatronCore, match="megatron-core is not installed.*"
                       r'pip install "megatron-core>=0\.16,<0\.17"'):
        prepare_megatron()


def test_import_reads_the_version_once_and_never_fails():
    # 0.17.0 is visible only while megatron_ext.compat is imported; preparing later still refuses.
    script = textwrap.dedent("""
        import importlib.metadata
        real_version = importlib.metadata.version
        importlib.metadata.version = (
            lambda name: "0.17.0" if name == "megatron-core" else real_version(name))
        import megatron_ext.compat as compat
        importlib.metadata.version = real_version
        try:
            compat.prepare_megatron()
        except compat.UnsupportedMegatronCore as error:
            print(error)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                            text=True, check=True, timeout=120)
    assert result.stdout.startswith("megatron-core 0.17.0 is installed")
