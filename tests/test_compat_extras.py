"""megatron_ext.compat.extras: which optional GPU extras count as present, and the line that says so."""
import sys
import types

import pytest

from megatron_ext.compat import extras


def fake_module(name, **attributes):
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    return module


@pytest.fixture
def installed(monkeypatch):
    """Make `import <name>` find the given fake modules (and only those of the extras)."""
    def install(**modules):
        for name in ("apex", "apex.optimizers", "transformer_engine", "transformer_engine.pytorch"):
            monkeypatch.setitem(sys.modules, name, None)  # None: import raises ImportError
        for name, module in modules.items():
            monkeypatch.setitem(sys.modules, name.replace("__", "."), module)
    return install


def test_nothing_installed_is_the_local_torch_path(installed):
    installed()
    assert not extras.transformer_engine_available() and not extras.apex_available()
    assert extras.fused_kernels_line() == (
        "no Transformer Engine (local layers), no apex (torch optimizers)")


def test_the_pypi_package_named_apex_counts_as_absent(installed):
    installed(apex=fake_module("apex", __version__="0.9.10dev"))  # no apex.optimizers
    assert not extras.apex_available()


def test_nvidia_apex_and_transformer_engine_are_named(installed):
    optimizers = fake_module("apex.optimizers", FusedAdam=object)
    installed(apex=fake_module("apex", optimizers=optimizers, __path__=[]),
              apex__optimizers=optimizers,
              transformer_engine=fake_module("transformer_engine", __path__=[]),
              transformer_engine__pytorch=fake_module("transformer_engine.pytorch"))
    assert extras.transformer_engine_available() and extras.apex_available()
    assert extras.fused_kernels_line() == "Transformer Engine, apex"


def test_specs_still_exports_the_transformer_engine_check():
    from megatron_ext.models.specs import transformer_engine_available
    assert transformer_engine_available is extras.transformer_engine_available
