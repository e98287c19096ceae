"""The one error type of the converters: a message that names the input at fault and the fix."""


class ConversionError(ValueError):
    """Bad or unsupported input (architecture, tensor, shape, parallel size, RoPE setting)."""
