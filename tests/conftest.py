"""Shared fixtures for the test suite."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from onnx_builders import ExportCache


@pytest.fixture(scope="session")
def exported_onnx(tmp_path_factory: pytest.TempPathFactory) -> ExportCache:
    """`exported_onnx(arch, opset)` -> path of that architecture exported with random weights."""
    return ExportCache(tmp_path_factory.mktemp("exports"))


@pytest.fixture(scope="session")
def bundled_onnx_of(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`bundled_onnx_of(name)` -> that real pretrained bundled model, exported once per test session."""
    from zoo.bundled import build_bundled

    built: dict[str, Path] = {}

    def build(name: str) -> Path:
        if name not in built:
            built[name] = build_bundled(
                tmp_path_factory.mktemp("bundled") / "model.onnx", name=name
            )
        return built[name]

    return build


@pytest.fixture(scope="session")
def bundled_onnx(bundled_onnx_of: Callable[[str], Path]) -> Path:
    """The real pretrained efficientnet-lite0, exported once per test session."""
    return bundled_onnx_of("efficientnet-lite0")


@pytest.fixture(scope="session")
def bundled_workspace(tmp_path_factory: pytest.TempPathFactory, bundled_onnx: Path) -> Path:
    """A workspace with efficientnet-lite0 fetched into it (shared; copy it before writing)."""
    from zoo.cache import fetch
    from zoo.catalog import load_catalog

    models_dir = tmp_path_factory.mktemp("workspace")
    fetch("efficientnet-lite0", models_dir=models_dir, catalog=load_catalog(), progress=False)
    return models_dir


# Real material made by others (../shared beside the checkout; ZOO_SHARED overrides). A user's clone
# has none, so every test that reads it skips cleanly without it and has a small fixture of its own.
SHARED_DIR = Path(
    os.environ.get("ZOO_SHARED", Path(__file__).resolve().parents[1].parent / "shared")
)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared (real zoo files, a third-party classifier, real photo sets); skips when absent."""
    if not (SHARED_DIR / "models").is_dir():
        pytest.skip(f"no real material at {SHARED_DIR} (a user's clone has none)")
    return SHARED_DIR


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread: on a shared 2-core machine, oversubscribed threads make this 100x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
