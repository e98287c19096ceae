"""The registry shape every group of megatron-core patches shares: named patches, one-line whys.

A group is applied whole and each patch at most once per process. Imports compat.requirements only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

from megatron_ext.compat import requirements


@dataclass(frozen=True)
class Patch:
    """One workaround: `why` names the megatron file/function and what it gets wrong."""

    name: str
    why: str
    apply: Callable[[], None]


class PatchGroup:
    """Patches that share one cause, registered in definition order by `@group.patch(...)`."""

    def __init__(self, cause: str):
        self.cause = cause
        self._patches: list[Patch] = []
        self._applied: set[str] = set()

    def patch(self, name: str, why: str):
        """Register the decorated function as the `apply` of a named patch."""
        def register(apply: Callable[[], None]) -> Callable[[], None]:
            self._patches.append(Patch(name=name, why=why, apply=apply))
            return apply
        return register

    def __iter__(self) -> Iterator[Patch]:
        return iter(self._patches)

    def __len__(self) -> int:
        return len(self._patches)

    def names(self) -> list[str]:
        return [patch.name for patch in self._patches]

    def apply(self) -> list[str]:
        """Apply every patch not yet applied; return all names. Refuses other megatron-cores."""
        requirements.require_supported_megatron_core()
        for patch in self._patches:
            if patch.name not in self._applied:
                patch.apply()
                self._applied.add(patch.name)
        return self.names()

    def is_applied(self) -> bool:
        return len(self._applied) == len(self._patches)

    def describe(self) -> str:
        """The group as a two-column table: name | why."""
        width = max(len(patch.name) for patch in self._patches)
        header = f"{'name':<{width}} | why"
        rows = [f"{patch.name:<{width}} | {patch.why}" for patch in self._patches]
        return "\n".join([header, "-" * len(header), *rows])
