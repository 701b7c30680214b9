"""`zoo` from Python: the functions the command line calls, one per command.

>>> import zoo
>>> model = zoo.fetch("efficientnet-lite0")  # doctest: +SKIP
>>> run = zoo.adapt(model, data="builtin:digits", epochs=2)  # doctest: +SKIP
>>> run.export(), run.predict("digit.png", top_k=3)  # doctest: +SKIP

Nothing prints unless asked: `progress=True` shows a progress bar (in a terminal or a notebook),
`log=print` (or any callable) receives the explanatory lines the CLI writes to stderr. Errors are
the `zoo.errors` hierarchy.
"""

from __future__ import annotations

from zoo.api.data import check
from zoo.api.models import Model, cache_entries, fetch, info, inspect, list_models, rank
from zoo.api.runs import Run, evaluate, export, open_run, predict, predictions, report, verify
from zoo.api.training import adapt, compare

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
