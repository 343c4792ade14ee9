"""The library's expected failures. A `UserError` is a mistake in what the user gave (a config value, a
file, an argument, an array that breaks a documented rule); the tools report it as one `error:` line
(`jaxseg.cli`), while any other exception is a bug and keeps its traceback."""
from __future__ import annotations


class UserError(ValueError):
    """The input breaks a rule; the message names the input, its value and the rule."""

    def __str__(self) -> str:
        # KeyError (see UnknownKeyError) would quote the message.
        return str(self.args[0]) if self.args else ""


class UnknownKeyError(UserError, KeyError):
    """A name (config key, evaluation, parameter subtree) that is not one of the valid ones."""


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or Inf loss; the offending batch was saved next to the checkpoints."""


class MissingDependencyError(UserError, ImportError):
    """An optional dependency that this input needs is not installed; the message says how to install it."""
