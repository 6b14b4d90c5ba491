"""Errors raised by the services.

`UserError` carries a message a person can act on; the UI shows it as a toast and the
CLI prints it and exits with status 2. Anything else is a bug and is logged.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input or a request that cannot be done in the current state."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class NotFound(UserError):
    """A project, image, run, cluster or label id/name that does not exist."""
