"""The one base class for mistakes a user can fix: a bad setting, a missing file, a refused conversion.

`megatron-ext` prints a UserError as one line, `megatron-ext <command>: <message>`, and exits with
code 2; any other exception keeps its traceback. Standard library only; imports nothing of ours.
"""


class UserError(Exception):
    """Bad input, found before any work starts: the message names the setting at fault and the fix."""


class InputError(UserError, ValueError):
    """Input data or an argument that cannot be used as given (a malformed file, an impossible value)."""


class MissingFile(UserError, FileNotFoundError):
    """A file or directory the user named does not exist."""


class ConversionError(UserError, ValueError):
    """A model the converters or the RoPE forms cannot take as given (architecture, tensor, shape, parallel size,
    RoPE setting): the message names the input at fault and the fix."""
