"""Long stages report progress only when a caller asks: checking images, caching features."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from pipeline.core import progress
from pipeline.data.images import find_unreadable


class Recorder:
    """A bar factory that remembers what each bar was told."""

    def __init__(self) -> None:
        self.bars: list[dict[str, object]] = []

    def __call__(self, description: str, total: int) -> Recorder:
        self.bars.append({"description": description, "total": total, "done": 0, "closed": False})
        return self

    def advance(self, amount: int = 1) -> None:
        self.bars[-1]["done"] += amount  # type: ignore[operator]

    def close(self) -> None:
        self.bars[-1]["closed"] = True


@pytest.fixture
def photos(tmp_path: Path) -> list[str]:
    paths = []
    for i in range(5):
        path = tmp_path / f"{i}.jpg"
        Image.new("RGB", (64, 48), (i * 40, 0, 0)).save(path)
        paths.append(str(path))
    (tmp_path / "bad.jpg").write_bytes(b"not a picture")
    return [*paths, str(tmp_path / "bad.jpg")]


def test_checking_images_reports_every_image_and_closes(photos: list[str]) -> None:
    recorder = Recorder()
    with progress.showing(recorder):
        bad = find_unreadable(photos)
    assert list(bad) == [photos[-1]]
    assert recorder.bars == [
        {"description": "checking images", "total": 6, "done": 6, "closed": True}
    ]


def test_nothing_is_shown_unless_asked(photos: list[str]) -> None:
    recorder = Recorder()
    find_unreadable(photos)
    with progress.showing(recorder), progress.showing(None):
        find_unreadable(photos)
    assert recorder.bars == []
    with progress.track("anything", 3) as bar:  # silent, and still usable
        bar.advance(3)
