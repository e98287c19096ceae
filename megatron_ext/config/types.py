"""A config value checked against its declared type, nested values included: the one place that reads the type
hints of the config dataclasses (megatron_ext.config.reader.from_dict calls it for every key).

Covers what the configs declare: bool, int, float, str, X | None (Optional, Union), Literal[...], list[X],
tuple[X, ...] and tuple[X, Y], dict[K, V], bare list / dict, nested dataclasses (built by the caller's
`build`) and, for anything else, an isinstance check. A wrong value is refused in one line that names the
setting down to the element (`data.train_data[1]`), what it is and what the setting takes, e.g.
    data.train_data[0]: ['a', 'b'] (a list) is not a string; data.train_data takes a list of strings
Standard library only; imports nothing of ours but the error class, passed in by the reader.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing

# Floats reach the model and the optimizer as fp32 (bf16 keeps the same exponent range): a setting beyond this
# is already inf there. Non-finite numbers are refused wherever a number is declared.
FLOAT32_MAX = 3.4028234663852886e38
INT64_MAX = 2**63 - 1  # integers reach numpy and torch as int64

_SHOWN = 60  # characters of a wrong value quoted in a message (a value can be a megabyte of YAML)

# A setting that names a file or directory: `FilePath` (or `FilePath | None`, `list[FilePath]`). Beyond being a
# string it must be one the operating system can take: no NUL character (Python raises "embedded null byte"
# wherever it is used), at most PATH_MAX bytes, no component over NAME_MAX bytes (Linux's limits; ENAMETOOLONG
# otherwise), checked when the config is read, before any file is looked at.
PATH = "a file or directory path"
FilePath = typing.Annotated[str, PATH]
PATH_MAX, NAME_MAX = 4096, 255


class ConfigTypeError(ValueError):
    """Raised with the one-line message; the reader turns it into its ConfigError."""


def check_value(value, hint, key: str, *, build=None):
    """`value` as the setting `key` of declared type `hint` holds it (ints widened to float, lists to tuples);
    ConfigTypeError naming the element at fault otherwise. `build(cls, raw, prefix)` makes a nested dataclass."""
    return _Checker(key, hint, build).check(value, hint, key)


def describe(hint) -> str:
    """The type for people: 'a list of strings', 'a number or null', 'one of cosine, linear'."""
    if hint is type(None):
        return "null"
    if hint in (typing.Any, object):
        return "any value"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        return "a path" if PATH in hint.__metadata__ else describe(args[0])
    if _is_union(hint):
        return " or ".join(describe(arg) for arg in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(_literal(arg) for arg in args)
    if origin in (list, tuple) or hint in (list, tuple):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} items ({', '.join(describe(arg) for arg in args)})"
        if args:
            return f"a list of {_plural(args[0])}"
        return "a list"
    if origin is dict or hint is dict:
        if args:
            return f"a mapping of {_plural(args[0])} to {_plural(args[1])}"
        return "a mapping"
    return _NAMES.get(hint, f"a {getattr(hint, '__name__', str(hint))}")


def shown(value) -> str:
    """A wrong value quoted, cut short, with what it is: "['a', 'b'] (a list)"."""
    text = repr(value)
    if len(text) > _SHOWN:
        text = text[:_SHOWN] + "..."
    return f"{text} ({_kind_of(value)})"


_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_PLURALS = {bool: "true/false values", int: "integers", float: "numbers", str: "strings", dict: "mappings",
            list: "lists"}


def _plural(hint) -> str:
    if hint in _PLURALS:
        return _PLURALS[hint]
    if typing.get_origin(hint) is typing.Annotated:
        return "paths" if PATH in hint.__metadata__ else _plural(typing.get_args(hint)[0])
    if typing.get_origin(hint) in (list, tuple):
        return "lists" if not typing.get_args(hint) else f"lists of {_plural(typing.get_args(hint)[0])}"
    if typing.get_origin(hint) is dict:
        return "mappings"
    if hint in (typing.Any, object):
        return "values"
    return f"({describe(hint)})"


def _kind_of(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def _literal(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _is_union(hint) -> bool:
    return isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union


class _Checker:
    """One setting's check: remembers the setting and its whole type for the message."""

    def __init__(self, setting: str, hint, build):
        self.setting, self.hint, self.build = setting, hint, build

    def fail(self, value, hint, key):
        where = f"; {self.setting} takes {describe(self.hint)}" if key != self.setting else ""
        raise ConfigTypeError(f"{key}: {shown(value)} is not {describe(hint)}{where}")

    def check(self, value, hint, key):
        if hint in (typing.Any, object):
            return value
        if hint is type(None):
            if value is None:
                return None
            self.fail(value, hint, key)
        if _is_union(hint):
            return self._union(value, hint, key)
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin is typing.Annotated:
            if PATH not in hint.__metadata__:
                return self.check(value, args[0], key)
            if not isinstance(value, str):
                self.fail(value, hint, key)
            return _usable_path(value, key)
        if origin is typing.Literal:
            if any(value == arg and type(value) is type(arg) for arg in args):
                return value
            self.fail(value, hint, key)
        if value is None:
            raise ConfigTypeError(f"{key}: null is not allowed; give {describe(hint)}"
                                  + (f" ({self.setting} takes {describe(self.hint)})" if key != self.setting else ""))
        if dataclasses.is_dataclass(hint) and isinstance(hint, type):
            if self.build is None or not isinstance(value, dict):
                self.fail(value, hint, key)
            return self.build(hint, value, f"{key}.")
        if hint is bool or hint is int or hint is float or hint is str:
            return self._scalar(value, hint, key)
        if origin is list or hint is list:
            if not isinstance(value, list):
                self.fail(value, hint, key)
            if not args:
                return _finite_inside(value, key)
            return [self.check(item, args[0], f"{key}[{i}]") for i, item in enumerate(value)]
        if origin is tuple or hint is tuple:
            return self._tuple(value, hint, args, key)
        if origin is dict or hint is dict:
            if not isinstance(value, dict):
                self.fail(value, hint, key)
            if not args:
                return _finite_inside(value, key)
            return {self.check(k, args[0], f"{key} key {k!r}"): self.check(v, args[1], f"{key}.{k}")
                    for k, v in value.items()}
        if isinstance(hint, type):
            if isinstance(value, hint):
                return value
            self.fail(value, hint, key)
        return value  # a hint no config declares (a callable, a type variable): nothing to check against

    def _union(self, value, hint, key):
        options = typing.get_args(hint)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigTypeError(f"{key}: null is not allowed; give {describe(hint)}")
        # the first option the value's own kind belongs to decides (an int given for `int | list[int]` is the int)
        for option in (o for o in options if o is not type(None)):
            if _same_kind(value, option):
                return self.check(value, option, key)
        self.fail(value, hint, key)

    def _scalar(self, value, hint, key):
        if hint is bool:
            if isinstance(value, bool):
                return value
        elif hint is int:
            if isinstance(value, int) and not isinstance(value, bool):
                if not -INT64_MAX - 1 <= value <= INT64_MAX:
                    raise ConfigTypeError(f"{key}: {shown(value)} does not fit in a 64-bit integer, which numpy and "
                                          "torch count in: give an ordinary value")
                return value
        elif hint is float:
            number = value
            if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string; --set values too
                try:
                    number = float(value)
                except ValueError:
                    self.fail(value, hint, key)
            if isinstance(number, (int, float)) and not isinstance(number, bool):
                try:
                    number = float(number)
                except OverflowError:  # an integer too large for any float
                    number = math.inf
                if not math.isfinite(number) or abs(number) > FLOAT32_MAX:
                    raise ConfigTypeError(
                        f"{key}: {shown(value)} is not a finite number within float32's range (|x| < 3.4e38), "
                        "which training computes in: give an ordinary value")
                return number
        elif isinstance(value, str):
            return value
        self.fail(value, hint, key)

    def _tuple(self, value, hint, args, key):
        if not isinstance(value, (list, tuple)):
            self.fail(value, hint, key)
        if not args:
            return tuple(value)
        if args[-1] is Ellipsis:
            return tuple(self.check(item, args[0], f"{key}[{i}]") for i, item in enumerate(value))
        if len(value) != len(args):
            self.fail(value, hint, key)
        return tuple(self.check(item, arg, f"{key}[{i}]") for i, (item, arg) in enumerate(zip(value, args)))


def _usable_path(path: str, key: str) -> str:
    """`path` if the operating system can take it as a file name; ConfigTypeError naming the setting otherwise."""
    if "\0" in path:
        raise ConfigTypeError(f"{key}: {shown(path)} contains a NUL character, which no file name can: fix the path")
    encoded = path.encode("utf-8", "surrogateescape")
    if len(encoded) > PATH_MAX:
        raise ConfigTypeError(f"{key}: a path of {len(encoded)} bytes is longer than the system's limit "
                              f"({PATH_MAX}): fix the path")
    longest = max(encoded.split(b"/"), key=len)
    if len(longest) > NAME_MAX:
        raise ConfigTypeError(f"{key}: {shown(path)} has a component of {len(longest)} bytes, longer than a file "
                              f"name can be ({NAME_MAX}): fix the path")
    return path


def _finite_inside(value, key: str):
    """`value` (a list or mapping whose contents the config does not declare: RoPE parameters, the profile window)
    with no NaN or infinity anywhere inside; ConfigTypeError naming the first. The reader bounds its size."""
    stack = [(value, key)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise ConfigTypeError(f"{where}: {shown(item)} is not a finite number: give an ordinary value")
        if isinstance(item, dict):
            stack.extend((v, f"{where}.{k}") for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(item))
    return value


def _same_kind(value, hint) -> bool:
    """Whether `value` is the kind of thing `hint` declares (not yet whether its contents are right)."""
    if hint in (typing.Any, object):
        return True
    if typing.get_origin(hint) is typing.Annotated:
        return _same_kind(value, typing.get_args(hint)[0])
    origin = typing.get_origin(hint) or hint
    if _is_union(hint):
        return any(_same_kind(value, arg) for arg in typing.get_args(hint))
    if origin is typing.Literal:
        return any(value == arg and type(value) is type(arg) for arg in typing.get_args(hint))
    if origin is bool:
        return isinstance(value, bool)
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is float:
        if isinstance(value, str):
            try:
                float(value)
            except ValueError:
                return False
            return True
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) if origin is tuple else isinstance(value, list)
    if dataclasses.is_dataclass(origin):
        return isinstance(value, dict)
    if isinstance(origin, type):
        return isinstance(value, origin)
    return True
