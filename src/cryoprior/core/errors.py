"""User-facing errors.

An :class:`InputError` says what is wrong with a user's input and how to fix it. The CLI
prints its message on one line and exits with status 2, never with a traceback.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input from the user: the message names the file or value and the fix."""


def require(condition: bool, message: str) -> None:
    """Raise :class:`InputError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise InputError(message)


def require_positive(value: float, name: str) -> float:
    """Return ``value`` as a float, or raise if it is not a finite number > 0."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number > 0, got {value!r}") from None
    if not (v > 0 and v < float("inf")):
        raise InputError(f"{name} must be a finite number > 0, got {value!r}")
    return v
