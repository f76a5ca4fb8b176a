"""How an operation says how far it got: a callback the CLI draws and the core only calls.

``progress(n)``: n more units are done. ``progress(total=N)``: the current stage has N
units in all. ``progress(stage="sending", total=N, unit="message")``: a new stage begins,
counted from 0 (``total=None`` there: not known). Units are "message", "chat" or "byte".
The default, ``no_progress``, draws nothing; an operation never depends on what it does.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def __call__(self, advance: int = 0, /, *, total: int | None = None,
                 stage: str | None = None, unit: str | None = None) -> None: ...


def no_progress(advance: int = 0, /, *, total: int | None = None, stage: str | None = None,
                unit: str | None = None) -> None:
    """Progress reported to no one."""
    return None
