"""A finished run's results on disk: plots, metrics, per-image predictions, run.json marked done,
the heatmaps and report.html."""

from __future__ import annotations

from pipeline.core.results import Metrics, write_predictions
from pipeline.core.rundir import RunDir
from pipeline.report.check_section import held_out_without_twins
from pipeline.report.heatmaps import write_heatmaps
from pipeline.report.html import refresh_report
from pipeline.report.metrics import write_run_report
from pipeline.report.predictions import image_predictions
from pipeline.train.loop import EvalResult
from pipeline.train.run import RunContext, Trained


def write_results(
    run: RunContext, trained: Trained, scored: EvalResult, metrics_split: str, *, seconds: float
) -> Metrics:
    """The plots, metrics, per-image predictions and report.html, and run.json marked done."""
    state, choice, record = trained.state, trained.choice, trained.record
    metrics = write_run_report(
        run.run_dir,
        history=state.history,
        labels=scored.labels.numpy(),
        scores=scored.logits.numpy(),
        class_names=run.split.class_names,
        title=f"{run.source.name} → {run.split.source_name}, {choice.strategy}",
        split=metrics_split,
        extra={
            "best_epoch": state.best_epoch,
            "strategy": choice.strategy,
            # The figures again without held-out images that have a twin in training (check.json).
            **held_out_without_twins(
                run.run_dir,
                run.split,
                labels=scored.labels.numpy(),
                scores=scored.logits.numpy(),
                metrics_split=metrics_split,
            ),
        },
    )
    held_out = run.split.test if metrics_split == "test" else run.split.val
    predictions = image_predictions(
        held_out, scored.logits, class_names=run.split.class_names, source=run.split.source
    )
    write_predictions(RunDir(run.run_dir).predictions_file, predictions)  # the worst mistakes
    record.update(
        status="done",
        best_epoch=state.best_epoch,
        epochs_run=state.epoch,
        stopped=state.stopped,
        fast_path=trained.setup.description,
        test_accuracy=metrics.accuracy,
        metrics_split=metrics.split,
        seconds=round(seconds, 2),
    )
    record.save()
    where = run.workspace
    write_heatmaps(run.run_dir, models_dir=where.models_dir, catalog=where.catalog, log=run.log)
    refresh_report(run.run_dir, log=run.log)  # a failure to draw the page is logged, not raised
    return metrics
