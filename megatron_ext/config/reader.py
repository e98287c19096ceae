"""The YAML reader every config of megatron_ext uses: a file plus `key.sub=value` overrides -> a dataclass.

Unknown keys and values of the wrong type are refused by name, with the known key it is a slip of (never a
merely similar other setting). Imports nothing of ours but megatron_ext.errors: the training, eval-suite and
reproduction configs build on it.
"""

import dataclasses
import difflib
import logging
import re
import typing
from pathlib import Path

import yaml

from megatron_ext.config.types import ConfigTypeError, check_value, shown
from megatron_ext.errors import UserError

log = logging.getLogger(__name__)

# A dataclass renames a setting by listing it in a class attribute of this name: {old name: new name}.
# The old name keeps working for one release, with a one-line warning; "did you mean" knows both.
RENAMED = "RENAMED_SETTINGS"


class ConfigError(UserError, ValueError):
    """A bad setting: the message names the key, the value and the fix."""


class _Loader(yaml.SafeLoader):
    """YAML as people write numbers: `1e6` and `1.0e6` are floats (YAML 1.1 wants `1.0e+6`; YAML 1.2 does not).
    Nesting is refused past MAX_CONFIG_DEPTH levels while the document is composed (PyYAML composes nested values
    by recursion: 5000 brackets took seconds to end in a RecursionError)."""

    depth = 0

    def compose_node(self, parent, index):
        self.depth += 1
        try:
            if self.depth > MAX_CONFIG_DEPTH:
                mark = self.peek_event().start_mark
                raise ConfigError(f"{self.name}: values nested more than {MAX_CONFIG_DEPTH} levels deep (line "
                                  f"{mark.line + 1}): a config is a few levels of settings")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


# Bounds on a config document, checked before any Python object is built from it. A real config has a few hundred
# values (a blend of thousands of data sources, a few thousand) and is nested 3 or 4 levels; YAML aliases (*name)
# can make a few lines stand for 10^9 values ("billion laughs"), which the reader once expanded until memory ran
# out. Aliases stay usable for sharing a value; the document they expand to is what is bounded.
MAX_CONFIG_BYTES = 16 * 2**20
MAX_CONFIG_VALUES = 100_000
MAX_CONFIG_DEPTH = 32


def load_yaml(text: str, source: str = "config"):
    """The YAML document in `text`, with safe types only; ConfigError naming `source` when it is not YAML, has more
    than MAX_CONFIG_VALUES values once its aliases are expanded, or is nested deeper than MAX_CONFIG_DEPTH."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: {len(text)} characters is more than a config holds (at most "
                          f"{MAX_CONFIG_BYTES // 2**20} MiB): give the settings, not data")
    try:
        loader = _Loader(text)  # its reader refuses unprintable characters here
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML ({_yaml_problem(error)}): remove that character") from None
    loader.name = source  # what YAML's own messages call the document
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expanded_size(node, source)
        return loader.construct_document(node)
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML ({_yaml_problem(error)}): fix the syntax") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to read (at most {MAX_CONFIG_DEPTH} levels)") from None
    finally:
        loader.dispose()


def _yaml_problem(error: yaml.YAMLError) -> str:
    """What is wrong and where, without the document's name and the excerpt YAML's own message repeats."""
    if isinstance(error, yaml.reader.ReaderError):
        return f"character #x{error.character:04x} at position {error.position} is not allowed in YAML"
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return " ".join(f"{problem}{where}".split())[:200]


def _check_expanded_size(root, source: str) -> None:
    """Count the values `root` stands for with every alias expanded, without expanding anything (each node's count
    is computed once and shared by its aliases); refuse a cycle, a document over MAX_CONFIG_VALUES values and one
    nested deeper than MAX_CONFIG_DEPTH."""
    counts, depths, active = {}, {}, set()
    stack = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            active.discard(key)
            children = _children(node)
            counts[key] = 1 + sum(counts[id(child)] for child in children)
            depths[key] = 1 + max((depths[id(child)] for child in children), default=0)
            if counts[key] > MAX_CONFIG_VALUES:
                raise ConfigError(
                    f"{source}: the document stands for more than {MAX_CONFIG_VALUES} values once its YAML aliases "
                    f"(*name) are expanded (line {node.start_mark.line + 1}): write the values out, or alias less")
            if depths[key] > MAX_CONFIG_DEPTH:  # through aliases: each alone is shallow
                raise ConfigError(f"{source}: values nested more than {MAX_CONFIG_DEPTH} levels deep once its YAML "
                                  f"aliases are expanded (line {node.start_mark.line + 1}): alias less")
            continue
        if key in counts:
            continue
        if key in active:
            raise ConfigError(f"{source}: a YAML alias refers to a value that contains it (line "
                              f"{node.start_mark.line + 1}): a config cannot be infinite; remove the alias")
        active.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in counts)


def _children(node) -> list:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def read_raw(path: str | Path, overrides: list[str] = (), *, example: str) -> dict:
    """The YAML mapping of `path` with the overrides applied (no dataclass yet)."""
    path = Path(path)
    if not path.is_file():
        if path.exists():  # a directory, a device (/dev/zero), a pipe: nothing to read a bounded config from
            raise ConfigError(f"--config {path}: not a regular file; give a YAML file, see {example}")
        raise ConfigError(f"--config {path}: no such file; see {example}")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {path.stat().st_size} bytes is more than a config holds (at most "
                          f"{MAX_CONFIG_BYTES // 2**20} MiB): give the settings, not data")
    try:
        text = path.read_text()
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start}): save it as UTF-8") from None
    raw = load_yaml(text, str(path)) or {}
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
    for i, name in enumerate(sections):
        node = node.setdefault(name, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(sections[:i + 1])} is not a section of settings")
    node[last] = load_yaml(value, f"override {item!r}")


def from_dict(cls, raw: dict, prefix: str):
    """Build dataclass `cls` from `raw`, rejecting unknown keys and values of the wrong type."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of settings, got {shown(raw)}")
    hints = typing.get_type_hints(cls, include_extras=True)  # with Annotated's marks (config/types.py: FilePath)
    known = {f.name for f in dataclasses.fields(cls)}
    raw = _rename_old_keys(cls, raw, prefix)
    renamed = getattr(cls, RENAMED, {})
    for key in raw:
        if key not in known:
            name = str(key)
            # a slip is a few characters off a known name; a long key is none (and edit distances cost its length)
            close = likely_meant(name, [*known, *renamed]) if len(name) <= 64 else None
            close = renamed.get(close, close)
            hint = f"did you mean '{prefix}{close}'?" if close else f"known keys: {', '.join(sorted(known))}"
            shown_key = (name if name.isprintable() else repr(name)[1:-1])  # no control characters on a terminal
            shown_key = shown_key if len(shown_key) <= 64 else shown_key[:64] + "..."
            raise ConfigError(f"unknown key '{prefix}{shown_key}': {hint}")
    values = {}
    for key, value in raw.items():
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            values[key] = from_dict(kind, value, prefix=f"{prefix}{key}.")
        else:
            try:
                values[key] = check_value(value, kind, f"{prefix}{key}", build=_build)
            except ConfigTypeError as error:
                raise ConfigError(str(error)) from None
    return cls(**values)


def _build(cls, raw, prefix: str):
    return from_dict(cls, raw, prefix=prefix)


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


def check(ok: bool, message: str) -> None:
    """Raise ConfigError(message) unless ok."""
    if not ok:
        raise ConfigError(message)
