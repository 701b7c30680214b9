"""`zoo compare`: several strategies on one split with one set of hyperparameters, side by side."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.adapt import STRATEGIES, AdaptOptions, AdaptResult, adapt, prepare_data
from pipeline.core import runs
from pipeline.report.html import refresh_report
from pipeline.report.metrics import plot_comparison
from pipeline.train.grouping import split_grouper
from zoo.errors import ZooError
from zoo.files import write_json
from zoo.workspace import Workspace

if TYPE_CHECKING:
    from zoo.catalog import Catalog


@dataclass
class ComparisonResult:
    """The comparison folder and one result per strategy, in the order asked."""

    folder: Path
    results: list[AdaptResult]

    def table(self) -> tuple[list[str], list[tuple[Any, ...]]]:
        """The command's table: headers, and one row per strategy."""
        rows = self.rows()
        split = rows[0]["metrics_split"] if rows else "test"
        headers = ["strategy", f"{split} accuracy", "macro F1", "best epoch", "time", "trainable params"]  # fmt: skip
        cells = [
            (
                r["strategy"],
                f"{r['test_accuracy']:.4f}",
                f"{r['macro_f1']:.4f}",
                r["best_epoch"],
                f"{r['seconds']:.0f} s",
                f"{r['trainable_params']:,}",
            )  # fmt: skip
            for r in rows
        ]
        return headers, cells

    def rows(self) -> list[dict[str, Any]]:
        return [
            {
                "strategy": r.strategy,
                "test_accuracy": round(r.metrics.accuracy, 4),
                "macro_f1": round(r.metrics.macro_f1, 4),
                "metrics_split": r.metrics.split,  # "val" when the data has no test split
                "best_epoch": r.best_epoch,
                "epochs_run": r.epochs_run,
                "stopped": r.stopped,  # "converged after N passes of L-BFGS" for the solved head
                "seconds": round(r.seconds, 1),
                "trainable_params": r.trainable_params,
                "run_dir": str(r.run_dir),
            }
            for r in self.results
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "folder": str(self.folder),
            "runs": self.rows(),
            "plot": str(self.folder / "compare.png"),
        }


def parse_strategies(text: str) -> list[str]:
    """'scratch,feature,finetune' -> a checked list."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [n for n in names if n not in STRATEGIES or n == "auto"]
    if unknown or not names:
        raise ZooError(
            f"unknown strategies {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(s for s in STRATEGIES if s != 'auto')}"
        )
    return names


def compare(
    options: AdaptOptions,
    strategies: Sequence[str],
    *,
    models_dir: Path,
    catalog: Catalog,
    log: Callable[[str], None] = print,
    progress: bool = False,
) -> ComparisonResult:
    """Train each strategy on the same split and write a comparison table and plot."""

    grouper = split_grouper(Workspace.at(models_dir, catalog), log)  # as `zoo adapt` splits
    split = prepare_data(options, run_dir=None, group_by=grouper)
    model_name = options.model or "latest"
    base = (
        options.out
        or models_dir / f"compare-{runs.slug(Path(model_name).stem)}-{runs.slug(split.source_name)}"
    )
    folder = (
        runs.new_run_dir(base.parent, base.name)
        if options.out is None
        else runs.claim_out_dir(base, resume=False)
    )
    results = []
    for strategy in strategies:
        log(f"--- {strategy} ---")
        run_options = dataclasses.replace(
            options, strategy=strategy, out=folder / strategy, resume=False
        )
        results.append(
            adapt(
                run_options,
                models_dir=models_dir,
                catalog=catalog,
                log=log,
                progress=progress,
                split=split,
            )
        )
    comparison = ComparisonResult(folder, results)
    plot_comparison(
        folder / "compare.png",
        {r.strategy: r.history for r in results},
        title=f"{results[0].model_name} on {split.source_name}: {len(split.train)} training images",
    )
    write_json(folder / "compare.json", comparison.to_dict())
    refresh_report(folder, log=log)  # one page with every strategy side by side
    return comparison
