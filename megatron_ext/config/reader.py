"""The YAML reader every config of megatron_ext uses: a file plus `key.sub=value` overrides -> a dataclass.

Unknown keys and values of the wrong type are refused by name, with the known key it is a slip of (never a
merely similar other setting). Imports nothing of ours but megatron_ext.errors: the training, eval-suite and
reproduction configs build on it.
"""

import dataclasses
import difflib
import logging
import re
import types
import typing
from pathlib import Path

import yaml

from megatron_ext.errors import UserError

log = logging.getLogger(__name__)

# A dataclass renames a setting by listing it in a class attribute of this name: {old name: new name}.
# The old name keeps working for one release, with a one-line warning; "did you mean" knows both.
RENAMED = "RENAMED_SETTINGS"


class ConfigError(UserError, ValueError):
    """A bad setting: the message names the key, the value and the fix."""


class _Loader(yaml.SafeLoader):
    """YAML as people write numbers: `1e6` and `1.0e6` are floats (YAML 1.1 wants `1.0e+6`; YAML 1.2 does not)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def load_yaml(text: str):
    """The YAML document in `text`, with safe types only."""
    return yaml.load(text, Loader=_Loader)


def read_raw(path: str | Path, overrides: list[str] = (), *, example: str) -> dict:
    """The YAML mapping of `path` with the overrides applied (no dataclass yet)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file; see {example}")
    raw = load_yaml(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of settings")
    for item in overrides:
        apply_override(raw, item)
    return raw


def read_config(path: str | Path, cls, overrides: list[str] = (), *, example: str):
    """YAML file + `key.sub=value` overrides -> dataclass `cls` (unknown keys and wrong types rejected).

    `example` is named when the file is missing; validation is the caller's."""
    return from_dict(cls, read_raw(path, overrides, example=example), prefix="")


def apply_override(raw: dict, item: str) -> None:
    """`optimizer.lr=1e-4` -> raw['optimizer']['lr'] = 1e-4 (the value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: write it as section.key=value, e.g. optimizer.lr=1e-4")
    key, value = item.split("=", 1)
    *sections, last = key.strip().split(".")
    node = raw
    for name in sections:
        node = node.setdefault(name, {})
    node[last] = load_yaml(value)


def from_dict(cls, raw: dict, prefix: str):
    """Build dataclass `cls` from `raw`, rejecting unknown keys and values of the wrong type."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    raw = _rename_old_keys(cls, raw, prefix)
    renamed = getattr(cls, RENAMED, {})
    for key in raw:
        if key not in known:
            close = likely_meant(str(key), [*known, *renamed])
            close = renamed.get(close, close)
            hint = f"did you mean '{prefix}{close}'?" if close else f"known keys: {', '.join(sorted(known))}"
            raise ConfigError(f"unknown key '{prefix}{key}': {hint}")
    values = {}
    for key, value in raw.items():
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            values[key] = from_dict(kind, value, prefix=f"{prefix}{key}.")
        else:
            values[key] = _coerce(value, kind, f"{prefix}{key}")
    return cls(**values)


def _rename_old_keys(cls, raw: dict, prefix: str) -> dict:
    """`raw` with the old names of renamed settings replaced by their new names (a warning each)."""
    renamed = getattr(cls, RENAMED, {})
    if not any(key in renamed for key in raw):
        return raw
    raw = dict(raw)
    for old, new in renamed.items():
        if old not in raw:
            continue
        if new in raw:
            raise ConfigError(f"'{prefix}{old}' and '{prefix}{new}' are both set: '{prefix}{old}' is the old name "
                              f"of '{prefix}{new}'; keep only '{prefix}{new}'")
        log.warning("config: '%s%s' is renamed '%s%s'; the old name still works in this release, then it is "
                    "refused: rename it in your config", prefix, old, prefix, new)
        raw[new] = raw.pop(old)
    return raw


def likely_meant(key: str, known) -> str | None:
    """The known key that `key` is a slip of: at most two edits away (one for short keys; swapping neighbours
    is one edit), or cut short of it; None otherwise. A merely similar name is another setting
    (training.test_interval is not training.exit_interval), and following such a hint would change the run."""
    budget = 2 if len(key) > 4 else 1
    slips = [name for name in known
             if _edit_distance(key, name) <= budget or (len(key) >= 4 and name.startswith(key))]
    close = difflib.get_close_matches(key, slips, n=1, cutoff=0)
    return close[0] if close else None


def _edit_distance(a: str, b: str) -> int:
    """Insertions, deletions, substitutions and swaps of neighbouring characters that turn a into b."""
    rows = [list(range(len(b) + 1))]
    for i in range(1, len(a) + 1):
        row = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            row[j] = min(rows[-1][j] + 1, row[j - 1] + 1, rows[-1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                row[j] = min(row[j], rows[-2][j - 2] + 1)
        rows.append(row)
    return rows[-1][-1]


def _coerce(value, kind, key):
    """Check value against a simple annotation (int, float, str, bool, list, dict, X | None)."""
    options = typing.get_args(kind) if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union else (kind,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{key}: null is not allowed; give a {_type_name(kind)}")
    for option in options:
        base = typing.get_origin(option) or option
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if base is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base in (str, bool, list, dict) and isinstance(value, base):
            return value
    raise ConfigError(f"{key}: {value!r} is not a {_type_name(kind)}")


def _type_name(kind) -> str:
    return str(kind).replace("typing.", "").replace("<class '", "").replace("'>", "")


def check(ok: bool, message: str) -> None:
    """Raise ConfigError(message) unless ok."""
    if not ok:
        raise ConfigError(message)
