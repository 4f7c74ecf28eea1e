"""Typed errors shared by the engine, the offline API and the server."""

from __future__ import annotations


class InvalidArgument(ValueError):
    """A bad value for one named field: an engine argument, a sampling parameter or a request field.

    ``field`` is what a client has to fix (the server returns it as the 400's ``param``).
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
