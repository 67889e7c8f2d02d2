"""Exceptions raised by flash.

Every error about user input is an :class:`flash.errors.InvalidInputError` (a ``ValueError``)
whose message names the argument, what was expected and what came.
"""

from __future__ import annotations


class FlashError(Exception):
    """Base class of every error flash raises on purpose."""


class InvalidInputError(FlashError, ValueError):
    """An argument of an attention call is out of the spec.

    ``argument`` is the name of the offending argument (``"q"``, ``"window"``,
    ``"cu_seqlens_q"``...), so callers and tests can tell errors apart without
    parsing the message.
    """

    def __init__(self, argument: str, expected: str, got: str) -> None:
        self.argument = argument
        self.expected = expected
        self.got = got
        super().__init__(f"{argument}: expected {expected}, got {got}")


class NoBackendError(FlashError, RuntimeError):
    """No installed backend can run the problem; the message lists every backend's reasons."""


class BackendError(FlashError, RuntimeError):
    """A backend was found but cannot be used (failed import, incompatible plugin API...)."""
