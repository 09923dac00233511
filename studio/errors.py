"""User-facing errors: every message says what went wrong and how to fix it."""

from __future__ import annotations


class StudioError(Exception):
    """An error the user can fix. The CLI prints it as one line, the UI as a message, never a traceback."""


class Cancelled(Exception):
    """Raised inside long work when its :class:`~studio.events.CancelToken` was set."""
