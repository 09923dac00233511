"""Progress events and cooperative cancellation shared by the engine, the CLI and the UI.

Engine entry points take ``callbacks`` (callables receiving :class:`Event`) and a ``cancel`` token. Observers
never change the computation; the CLI turns events into tqdm bars, the UI into progress bars, jobs into
``events.jsonl`` lines.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import Cancelled


@dataclass(frozen=True)
class Event:
    """One thing that happened: ``kind`` is e.g. ``progress``, ``metric``, ``log``, ``status``."""

    kind: str
    data: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Callback = Callable[[Event], None]


def emit(callbacks: Iterable[Callback], kind: str, **data: Any) -> None:
    """Send one event to every callback."""
    event = Event(kind, data)
    for cb in callbacks:
        cb(event)


def progress(callbacks: Iterable[Callback], task: str, done: int, total: int, **data: Any) -> None:
    """Shorthand for a ``progress`` event: ``done`` of ``total`` units of ``task``."""
    emit(callbacks, "progress", task=task, done=done, total=total, **data)


class CancelToken:
    """Set from anywhere (another thread, a signal handler, a file in the run dir) to stop long work.

    Args:
        flag_file: optional path whose existence also means "cancel" (how the UI cancels a background job).
    """

    def __init__(self, flag_file: str | Path | None = None) -> None:
        self._event = threading.Event()
        self.flag_file = Path(flag_file) if flag_file else None

    def set(self) -> None:
        self._event.set()

    @property
    def is_set(self) -> bool:
        if not self._event.is_set() and self.flag_file is not None and self.flag_file.exists():
            self._event.set()
        return self._event.is_set()

    def check(self) -> None:
        """Raise :class:`Cancelled` if cancellation was requested."""
        if self.is_set:
            raise Cancelled("cancelled by request")


def check(cancel: CancelToken | None) -> None:
    if cancel is not None:
        cancel.check()
