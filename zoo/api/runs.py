"""A finished run and what follows it: export with the gate, verify, predict, evaluate, report."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from zoo.api._common import (
    CatalogLike,
    Log,
    PathLike,
    PreprocessLike,
    catalog_of,
    logger,
    models_dir_of,
    paths,
    preprocess_request,
)
from zoo.errors import DataError, NotFound

if TYPE_CHECKING:
    from pipeline.adapt import AdaptResult
    from pipeline.core.record import RunRecord
    from pipeline.core.results import EpochRecord, Metrics
    from pipeline.core.rundir import RunDir
    from pipeline.export.deploy import ExportSummary, Prediction
    from pipeline.export.verify import FileReport

EXPORTED = "model.onnx"  # where Run.export writes and Run.predict reads
REPORT = "report.html"


class Run:
    """A run directory of `zoo adapt`: metrics, history and strategy read from it, export, predict.

    >>> run = zoo.open_run("models/efficientnet-lite0-digits-10c")  # doctest: +SKIP
    >>> run.metrics.accuracy, run.strategy, len(run.history)  # doctest: +SKIP
    (0.93, 'feature', 12)
    """

    def __init__(
        self,
        run_dir: PathLike | None,
        *,
        models_dir: PathLike | None = None,
        catalog: CatalogLike = None,
        summary: AdaptResult | None = None,
    ) -> None:
        self._dir = Path(run_dir) if run_dir is not None else None
        self.models_dir = models_dir_of(models_dir)
        self.catalog = catalog
        # What `zoo adapt` reports, when this process finished the run (None for an opened run).
        self.summary = summary

    def __repr__(self) -> str:
        return f"Run({str(self._dir)!r})"

    @property
    def dir(self) -> Path:
        """The run directory."""
        if self._dir is None:
            raise NotFound(
                "rank 0 of the distributed run wrote its directory, not this process; "
                "open it there with zoo.open_run(path)"
            )
        return self._dir

    def _files(self) -> RunDir:
        """The run directory's files, by what they hold (pipeline.core.rundir)."""
        from pipeline.core.rundir import RunDir

        return RunDir(self.dir)

    @property
    def record(self) -> RunRecord:
        """run.json as a `RunRecord`: options, model, strategy, hyperparameters, split sizes, status."""
        return self._files().record()

    @property
    def metrics(self) -> Metrics:
        """Accuracy, macro F1, per-class figures and the confusion matrix on the held-out split."""
        metrics = self._files().metrics()
        if metrics is None:
            raise NotFound(
                f"{self.dir} has no {self._files().metrics_file.name} yet: the run did not finish; resume it"
            )
        return metrics

    @property
    def history(self) -> list[EpochRecord]:
        """One record per epoch (per L-BFGS pass for the solved `feature` head), from history.csv."""
        return self._files().history()

    @property
    def strategy(self) -> str:
        """The strategy that trained (what `auto` chose, for an `auto` run)."""
        return self.record.trained_strategy

    @property
    def report_path(self) -> Path:
        """The run's one-page report, report.html."""
        return self.dir / REPORT

    def export(
        self,
        *,
        opset: int | None = None,
        quantize: str | None = None,
        targets: str | Sequence[str] = "onnx",
        embed_preprocess: bool | None = None,
    ) -> Path:
        """Export to RUN/model.onnx behind the verification gate; VerificationFailed when it fails.

        `targets` adds RUN/deploy/<target>/ for each other target that passes its own gate.

        >>> run.export()  # doctest: +SKIP
        PosixPath('models/efficientnet-lite0-digits-10c/model.onnx')
        """
        summary = export(
            self.dir,
            opset=opset,
            quantize=quantize,
            targets=targets,
            embed_preprocess=embed_preprocess,
            models_dir=self.models_dir,
            catalog=self.catalog,
        )
        return summary.path

    def predict(
        self, images: PathLike | Sequence[PathLike], top_k: int = 5
    ) -> list[list[tuple[str, float]]]:
        """Top-k (label, probability) per image from the exported file (exported first if need be).

        >>> run.predict("cat.png", top_k=2)  # doctest: +SKIP
        [[('3', 0.91), ('5', 0.04)]]
        """
        model = self.dir / EXPORTED
        if not model.is_file():
            self.export()
        return predict(model, images, top_k=top_k, catalog=self.catalog)


def open_run(
    path: PathLike, *, models_dir: PathLike | None = None, catalog: CatalogLike = None
) -> Run:
    """A run directory read back; NotFound when it is not one.

    >>> run = zoo.open_run("models/efficientnet-lite0-digits-10c")  # doctest: +SKIP
    >>> run.metrics.macro_f1  # doctest: +SKIP
    0.93
    """
    from pipeline.core.rundir import RunDir

    RunDir(Path(path)).record()  # a clear error now, not at the first property
    return Run(path, models_dir=models_dir, catalog=catalog)


def _run_dir(run: Run | PathLike | None) -> Path | None:
    return run.dir if isinstance(run, Run) else (Path(run) if run is not None else None)


def export(
    run: Run | PathLike | None = None,
    *,
    out: PathLike | None = None,
    opset: int | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    verify: bool = True,
    quantize: str | None = None,
    targets: str | Sequence[str] = "onnx",
    embed_preprocess: bool | None = None,
    keep: float | None = None,
    models_dir: PathLike | None = None,
    catalog: CatalogLike = None,
    log: Log | None = None,
) -> ExportSummary:
    """Export a run (default: the latest) to ONNX, gated by the verification oracle.

    `targets`: "onnx,openvino,tflite,web" or "all" (every installed one); each target but onnx
    is converted from the ONNX file, gated again and written to RUN/deploy/<target>/ if it passes.
    `embed_preprocess`: the preprocessing inside the files (None: each target's default).
    `keep`: choose the unknown threshold again to keep this share of validation images.

    >>> summary = zoo.export("models/efficientnet-lite0-digits-10c")  # doctest: +SKIP
    >>> summary.path, summary.verified  # doctest: +SKIP
    (PosixPath('models/efficientnet-lite0-digits-10c/model.onnx'), True)
    """
    from pipeline.export.deploy import export_run
    from pipeline.report.html import record_export

    summary = export_run(
        _run_dir(run),
        models_dir=models_dir_of(models_dir),
        catalog=catalog_of(catalog),
        out=Path(out) if out is not None else None,
        opset=opset or 17,
        atol=atol,
        rtol=rtol,
        verify=verify,
        quantize=quantize,
        targets=targets,
        embed_preprocess=embed_preprocess,
        keep=keep,
        log=logger(log),
    )
    record_export(summary.run_dir, summary, log=logger(log))  # export.json; report.html reads it
    return summary


def verify(
    path: PathLike,
    *,
    run: Run | PathLike | None = None,
    runtimes: str | Sequence[str] = ("ort",),
    atol: float = 1e-4,
    rtol: float = 1e-3,
    models_dir: PathLike | None = None,
    catalog: CatalogLike = None,
) -> FileReport:
    """The verification report of an ONNX file; with `run`, against the run's PyTorch model.

    >>> report = zoo.verify("run/model.onnx", run="run", runtimes=("ort", "opencv"))  # doctest: +SKIP
    >>> report.passed  # doctest: +SKIP
    True
    """
    from pipeline.export.deploy import verify_file
    from pipeline.report.html import record_verification

    if isinstance(runtimes, str):
        runtimes = runtimes.split(",")
    if isinstance(run, Run):  # the workspace the run was opened with, unless told otherwise
        models_dir = models_dir if models_dir is not None else run.models_dir
        catalog = catalog if catalog is not None else run.catalog
    run_dir = _run_dir(run)
    report = verify_file(
        Path(path),
        run_dir=run_dir,
        models_dir=models_dir_of(models_dir),
        catalog=catalog_of(catalog),
        runtimes=[r.strip() for r in runtimes if r.strip()],
        atol=atol,
        rtol=rtol,
    )
    if run_dir is not None:  # verification.json; report.html reads it
        record_verification(run_dir, report)
    return report


def predictions(
    path: PathLike,
    images: PathLike | Sequence[PathLike],
    *,
    top_k: int = 5,
    provider: str = "cpu",
    preprocess: PreprocessLike = None,
    catalog: CatalogLike = None,
    reject: bool = True,
) -> list[Prediction]:
    """One Prediction (image, top-k, or why it is unreadable) per image; folders and globs expand.

    A file with an unknown score gives each image's `ood_score`; with `reject`, `unknown` is True
    for the images past its threshold (zoo.ood in the file's metadata).

    >>> [p.top[0] for p in zoo.predictions("run/model.onnx", "photos/")]  # doctest: +SKIP
    [('cat', 0.97), ('dog', 0.88)]
    """
    from pipeline.export.deploy import predict as predict_file

    return predict_file(
        Path(path),
        paths(images),
        catalog=catalog_of(catalog),
        top_k=top_k,
        provider=provider,
        preprocess=preprocess_request(preprocess),
        reject=reject,
    )


def predict(
    path: PathLike,
    images: PathLike | Sequence[PathLike],
    *,
    top_k: int = 5,
    preprocess: PreprocessLike = None,
    catalog: CatalogLike = None,
    reject: bool = True,
) -> list[list[tuple[str, float]]]:
    """Top-k (label, probability) per image, from the ONNX file alone; DataError if one is unreadable.

    With `reject`, an image past the file's unknown threshold gives [("unknown", its score)].

    >>> zoo.predict("run/model.onnx", ["a.png", "b.png"], top_k=1)  # doctest: +SKIP
    [[('7', 0.98)], [('1', 0.95)]]
    """
    found = predictions(
        path, images, top_k=top_k, preprocess=preprocess, catalog=catalog, reject=reject
    )
    unreadable = [p for p in found if p.error]
    if unreadable:
        raise DataError(
            f"{unreadable[0].image} is unreadable ({unreadable[0].error}); "
            "pass image files only, or use zoo.predictions to skip such files"
        )
    return [[("unknown", p.ood_score)] if p.unknown else p.top for p in found]


def evaluate(
    path: PathLike,
    data: PathLike,
    *,
    plot: PathLike | None = None,
    preprocess: PreprocessLike = None,
    catalog: CatalogLike = None,
    reject: bool = True,
) -> Metrics:
    """Accuracy, macro precision/recall/F1 and confusion of an ONNX file on every image of `data`.

    With `reject` and a file with an unknown score, `unknown` counts the images past its
    threshold and `kept_accuracy` is the accuracy on the others.

    >>> zoo.evaluate("run/model.onnx", "builtin:digits").accuracy  # doctest: +SKIP
    0.91
    """
    from pipeline.report.evaluate import evaluate_file

    return evaluate_file(
        Path(path),
        os.fspath(data),
        catalog=catalog_of(catalog),
        plot=Path(plot) if plot is not None else None,
        preprocess=preprocess_request(preprocess),
        reject=reject,
    )


def report(
    run: Run | PathLike,
    *,
    models_dir: PathLike | None = None,
    catalog: CatalogLike = None,
    log: Log | None = None,
) -> Path:
    """Write the run's report.html again and return its path.

    Its heatmaps are drawn again from the run's best weights, which needs the model the run was
    trained from in `models_dir`; without it the page keeps the ones it had (one line to `log`).

    >>> zoo.report("models/efficientnet-lite0-digits-10c")  # doctest: +SKIP
    PosixPath('models/efficientnet-lite0-digits-10c/report.html')
    """
    from pipeline.report.heatmaps import write_heatmaps
    from pipeline.report.html import write_report

    if isinstance(run, Run):
        models_dir = models_dir if models_dir is not None else run.models_dir
        catalog = catalog if catalog is not None else run.catalog
    folder = _run_dir(run)
    write_heatmaps(
        folder, models_dir=models_dir_of(models_dir), catalog=catalog_of(catalog), log=logger(log)
    )
    return write_report(folder)  # a run or a comparison; NotFound for anything else
