"""The command line's own error: one line on stderr and an exit code (see ``main``)."""

from __future__ import annotations


class CliError(Exception):
    """A usage or input error of an ``itask`` command; ``code`` is its exit code."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code
