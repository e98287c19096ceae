"""Names of a package that load from their module on first use (PEP 562), so importing the package stays light."""

import importlib


def lazy_getattr(package: str, modules: dict[str, str]):
    """A module-level `__getattr__` for `package` that imports `modules[name]` when `name` is first used."""

    def __getattr__(name: str):
        if name not in modules:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(modules[name]), name)

    return __getattr__
