"""Errors of the server that the command line maps to exit codes, importable without torch."""

from __future__ import annotations


class StartupError(RuntimeError):
    """The server cannot start as configured; the message says what to change."""
