"""The one error type of `megatron-ext plan` and `launch`: bad input, named with its fix.

Standard library and megatron_ext.errors only.
"""

from megatron_ext.errors import UserError


class LaunchError(UserError, ValueError):
    """A flag, preset or layout the planner cannot use: the message names it and what to give instead."""
