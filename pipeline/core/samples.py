"""Labelled samples and their train/val/test split, as a run's split.json holds them.

Where samples come from, how a split is drawn and how images are fed to torch is the data stage
(pipeline.data); the split itself lives here so that a run directory can be read back
(pipeline.core.rundir) without the stages that made it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from zoo.errors import DataError
from zoo.files import atomic_write

SPLIT_JSON_VERSION = 1


class Sample(NamedTuple):
    """One labelled image: a file path, or "builtin:<set>#<index>"."""

    ref: str
    label: int


@dataclass
class DataSplit:
    """A data source split into train/val/test, with the files it skipped and why."""

    class_names: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    source_name: str  # short slug for run folder names, e.g. "digits"
    recommended_size: int | None = None  # built-in sets only: input size used unless given
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    source: str = ""  # what the user passed, absolute where it is a path
    given_split: bool = False  # True: the source's own folders or split column fixed the parts

    def counts(self, split: str) -> list[int]:
        """Images per class in one of "train", "val", "test"."""
        per_class = [0] * len(self.class_names)
        for sample in getattr(self, split):
            per_class[sample.label] += 1
        return per_class

    def to_json(self) -> str:
        """The split as JSON, exact enough for `from_json` to rebuild it."""
        payload = {
            "version": SPLIT_JSON_VERSION,
            **{
                k: v
                for k, v in dataclasses.asdict(self).items()
                if k not in ("train", "val", "test")
            },
            **{name: [list(s) for s in getattr(self, name)] for name in ("train", "val", "test")},
        }
        return json.dumps(payload, ensure_ascii=False, indent=1)

    @classmethod
    def from_json(cls, text: str) -> DataSplit:
        """Rebuild a split written by `to_json`."""
        try:
            raw = json.loads(text)
            if raw.get("version") != SPLIT_JSON_VERSION:
                raise ValueError(f"version {raw.get('version')!r}")
            return cls(
                class_names=[str(c) for c in raw["class_names"]],
                **{
                    k: [Sample(str(r), int(y)) for r, y in raw[k]] for k in ("train", "val", "test")
                },
                source_name=str(raw["source_name"]),
                recommended_size=raw.get("recommended_size"),
                skipped=[(str(p), str(r)) for p, r in raw.get("skipped", [])],
                source=str(raw.get("source", "")),
                given_split=bool(raw.get("given_split", False)),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(
                f"split file is malformed ({type(exc).__name__}: {exc}); start a new run with `zoo adapt`"
            ) from exc

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the split as JSON (UTF-8), atomically."""
        text = self.to_json()
        atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DataSplit:
        """Read a split written by `save`."""
        try:
            return cls.from_json(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise DataError(f"split file {path} does not exist; check the run folder") from exc
