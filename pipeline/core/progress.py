"""Progress of the long parts of a run (checking images, caching features), shown only on request.

Pipeline code reports through `track(description, total)`; nothing is shown unless a caller
installed a bar factory with `showing(...)` (the CLI does on a terminal, never under --json),
so library use and tests stay silent.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any, Protocol


class Bar(Protocol):
    def advance(self, amount: int = 1) -> None: ...

    def close(self) -> None: ...


class _Silent:
    def advance(self, amount: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


BarFactory = Callable[[str, int], Bar]
_factory: ContextVar[BarFactory | None] = ContextVar("zoo_progress", default=None)


@contextlib.contextmanager
def showing(factory: BarFactory | None) -> Iterator[None]:
    """Show the bars of `track` made inside this block with `factory` (None: stay silent)."""
    token = _factory.set(factory)
    try:
        yield
    finally:
        _factory.reset(token)


@contextlib.contextmanager
def track(description: str, total: int) -> Iterator[Bar]:
    """A bar for `total` steps of `description`, closed on exit; silent unless `showing`."""
    factory = _factory.get()
    bar: Any = factory(description, total) if factory is not None and total > 0 else _Silent()
    try:
        yield bar
    finally:
        bar.close()
