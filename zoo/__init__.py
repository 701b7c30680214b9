"""`zoo`: ONNX Model Zoo classifiers adapted to your own images, and back into verified ONNX files.

The Python API (zoo.fetch, zoo.adapt, zoo.open_run, ...) lives in zoo.api and is imported on
first use, so that `import zoo` and the modules the pipeline imports (zoo.catalog, ...) stay light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zoo.api import (
        Model,
        Run,
        adapt,
        cache_entries,
        check,
        compare,
        evaluate,
        export,
        fetch,
        info,
        inspect,
        list_models,
        open_run,
        predict,
        predictions,
        rank,
        report,
        verify,
    )

__all__ = [
    "Model",
    "Run",
    "adapt",
    "cache_entries",
    "check",
    "compare",
    "evaluate",
    "export",
    "fetch",
    "info",
    "inspect",
    "list_models",
    "open_run",
    "predict",
    "predictions",
    "rank",
    "report",
    "verify",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        import zoo.api

        return getattr(zoo.api, name)
    raise AttributeError(f"module 'zoo' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
