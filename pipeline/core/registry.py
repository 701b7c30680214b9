"""One registry for the pipeline's extension points: runtimes, augmentations, strategies, built-in
data sets and head kinds.

Like onnx2torch's `add_converter`: a module-level mapping filled by a decorator that refuses a name
already taken, and a lookup whose error names the missing key and lists the known ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Generic, TypeVar

from zoo.errors import NotFound, ZooError

Entry = TypeVar("Entry")
Registered = TypeVar("Registered")


class Registry(Mapping[str, Entry], Generic[Entry]):
    """Name -> entry, in registration order. `registry[name]` raises a plain KeyError;
    `registry.lookup(name)` raises `error` with one line that lists the known names."""

    def __init__(
        self,
        kind: str,
        *,
        error: type[ZooError] = NotFound,
        shown: Callable[[str], str] = str,
        also: Sequence[str] = (),
    ) -> None:
        self.kind = kind  # what an entry is, in messages: "strategy", "augmentation", ...
        self._error = error  # raised by lookup(); a ZooError subclass that fits the caller
        self._shown = shown  # how a name is written in messages (built-in sets: "builtin:digits")
        self._also = tuple(also)  # names handled outside the registry, listed first ("ort")
        self._entries: dict[str, Entry] = {}

    def add(self, name: str, entry: Entry) -> Entry:
        """Register `entry` under `name`; a name already taken is refused with ValueError."""
        if name in self._entries or name in self._also:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def decorator(
        self, name: str, make: Callable[[Registered], Entry] | None = None
    ) -> Callable[[Registered], Registered]:
        """A decorator registering what it decorates (or `make` of it) under `name`."""

        def register(item: Registered) -> Registered:
            self.add(name, make(item) if make is not None else item)  # type: ignore[arg-type]
            return item

        return register

    def names(self) -> list[str]:
        """Every name a user may give, in registration order."""
        return [*self._also, *self._entries]

    def lookup(self, name: str) -> Entry:
        """The entry registered under `name`; `error` names it and lists the known ones if absent."""
        if name not in self._entries:
            known = ", ".join(self._shown(n) for n in self.names())
            raise self._error(f"unknown {self.kind} {self._shown(name)!r}; choose from {known}")
        return self._entries[name]

    def __getitem__(self, name: str) -> Entry:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._entries)})"


__all__ = ["Registry"]
