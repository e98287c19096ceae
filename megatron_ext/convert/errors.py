"""The one error type of the converters: a message that names the input at fault and the fix."""

from megatron_ext.errors import UserError


class ConversionError(UserError, ValueError):
    """Bad or unsupported input (architecture, tensor, shape, parallel size, RoPE setting)."""
