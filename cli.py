"""`zoo`: the command line. A thin click layer: parse options, call one library function, print."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Any

import click

import zoo
from zoo import console
from zoo.errors import VerificationFailed, ZooError
from zoo.options import (
    ADAPT,
    CHECK,
    COMPARE,
    EVALUATE,
    EXPORT,
    FETCH,
    LAUNCH,
    PREDICT,
    PREPROCESS,
    RANK,
    VERIFY,
    click_options,
)
from zoo.options import argv_of as _argv_of  # tests and workers' command lines


class ZooGroup(click.Group):
    """Turns a ZooError into one line on stderr and a non-zero exit (a traceback only with --debug)."""

    def invoke(self, ctx: click.Context):  # noqa: ANN201
        try:
            return super().invoke(ctx)
        except ZooError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"zoo: error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("zoo: interrupted", err=True)
            ctx.exit(130)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:  # the last line of defence: a bug, said in one line
            if ctx.obj and ctx.obj.get("debug"):
                raise
            first_line = str(exc).splitlines()[0] if str(exc) else ""
            click.echo(
                f"zoo: internal error: {type(exc).__name__}: {first_line} "
                "(re-run with --debug for the traceback and report it)",
                err=True,
            )
            ctx.exit(2)


def _where(ctx: click.Context) -> dict[str, Any]:
    """The workspace and catalog options, as every API call that needs them takes them."""
    state = ctx.ensure_object(dict)
    return {"models_dir": state["models_dir"], "catalog": state["catalog_file"]}


def _catalog(ctx: click.Context) -> Path | None:
    return ctx.ensure_object(dict)["catalog_file"]


json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object on stdout."
)


def preprocess_options(function):  # noqa: ANN001, ANN202
    """--preprocess and the flags laid over it, handed to the command as one `preprocess` dict."""

    @functools.wraps(function)
    def command(*args, **values):  # noqa: ANN002, ANN003, ANN202
        flags = {option.name: values.pop(option.name) for option in PREPROCESS}
        return function(*args, preprocess=flags, **values)

    return click_options(PREPROCESS)(command)


@click.group(cls=ZooGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--models-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="ZOO_MODELS_DIR",
    default="models",
    show_default=True,
    help="Workspace for fetched and adapted models (env ZOO_MODELS_DIR).",
)
@click.option(
    "--catalog",
    "catalog_file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="ZOO_CATALOG",
    default=None,
    help="JSON file of extra catalog entries, a private zoo (env ZOO_CATALOG).",
)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.version_option(package_name="zoo")
@click.pass_context
def main(ctx: click.Context, models_dir: Path, catalog_file: Path | None, debug: bool) -> None:
    """Adapt ONNX Model Zoo classifiers to your own images, and export verified ONNX files."""
    ctx.ensure_object(dict).update(models_dir=models_dir, catalog_file=catalog_file, debug=debug)


@main.command("list")
@json_option
@click.pass_context
def list_command(ctx: click.Context, as_json: bool) -> None:
    """List the catalog: every zoo classifier and the bundled models."""
    rows = zoo.list_models(**_where(ctx))
    if as_json:
        console.emit_json({"models": rows})
        return
    console.table(
        None,
        ["name", "family", "opset", "size", "input", "top-1", "here"],
        [
            (
                r["name"],
                r["family"],
                r["opset"],
                console.human_size(r["size"]),
                r["input"],
                f"{r['top1']:.1f}" if r["top1"] is not None else "-",
                "yes" if r["in_workspace"] else "",
            )
            for r in rows
        ],
    )


@main.command("info")
@click.argument("name")
@json_option
@click.pass_context
def info_command(ctx: click.Context, name: str, as_json: bool) -> None:
    """Show one catalog entry in full (NAME may be an alias, e.g. mobilenet)."""
    from zoo.catalog import describe_entry

    entry = zoo.info(name, catalog=_catalog(ctx))
    if as_json:
        console.emit_json(entry.to_dict())
        return
    console.table(entry.name, ["field", "value"], describe_entry(entry))


@main.command("fetch")
@click.argument("source")
@click_options(FETCH)
@preprocess_options
@json_option
@click.pass_context
def fetch_command(ctx: click.Context, source: str, as_json: bool, **values: Any) -> None:
    """Fetch a model by catalog name or alias, local .onnx/.tar.gz path, or URL; print its path."""
    progress = not as_json and sys.stderr.isatty()
    result = zoo.fetch(source, progress=progress, **values, **_where(ctx))
    if as_json:
        console.emit_json(result.to_dict())
        return
    verb = "already present" if result.cached else "fetched"
    console.info(f"{result.name}: {verb}, sha256 {result.sha256[:16]}…")
    click.echo(str(result.path))


@main.command("rank")
@click.argument("models", nargs=-1)
@click_options(RANK)
@json_option
@click.pass_context
def rank_command(ctx: click.Context, models: tuple[str, ...], as_json: bool, **values: Any) -> None:
    """Which model for your data? Rank MODELS (default: all fetched plus the bundled ones) by probe."""
    result = zoo.rank(
        models,
        log=console.info,
        progress=not as_json and sys.stderr.isatty(),
        **values,
        **_where(ctx),
    )
    if as_json:
        console.emit_json(result.to_dict())
        return
    console.table(
        f"linear probe on {result.train_images} train / {result.val_images} validation images "
        f"of {result.data} ({len(result.class_names)} classes)",
        ["rank", "model", "val accuracy", "feature dim", "size", "images", "time"],
        [
            (
                i + 1,
                m.name,
                f"{m.val_accuracy:.4f}",
                m.feature_dim,
                m.image_size,
                m.images,
                f"{m.seconds:.0f} s",
            )  # fmt: skip
            if m.reason is None
            else ("-", m.name, m.reason, "", "", "", f"{m.seconds:.0f} s")
            for i, m in enumerate(result.models)
        ],
    )
    click.echo(f"{result.recommendation}  ({result.seconds:.0f} s in all)")


@main.command("check")
@click.argument("model", required=False)
@click_options(CHECK)
@json_option
@click.pass_context
def check_command(ctx: click.Context, model: str | None, as_json: bool, **values: Any) -> None:
    """Check your images before training: duplicates, likely label errors, class balance, odd files."""
    progress = not as_json and sys.stderr.isatty()
    found = zoo.check(model=model, log=console.info, progress=progress, **values, **_where(ctx))
    if as_json:
        console.emit_json(found.to_dict())
        return
    summary = f"{found.images} images, {len(found.class_names)} classes, checked with {found.model} in {found.seconds:.1f} s"  # fmt: skip
    click.echo("\n".join([*(found.notes or ["no problem found"]), summary]))


@main.command("adapt")
@click.argument("model", required=False)
@click_options(ADAPT)
@preprocess_options
@json_option
@click.pass_context
def adapt_command(ctx: click.Context, model: str | None, as_json: bool, **values: Any) -> None:
    """Fine-tune MODEL (default: the latest fetched) on your images; writes a run directory."""
    from pipeline.core.distributed import launched_by_torch

    run = zoo.adapt(
        model,
        log=console.info,
        progress=not as_json and sys.stderr.isatty(),
        worker_argv=_argv_of(ctx, skip=LAUNCH),  # workers re-run this command line
        **values,
        **_where(ctx),
    )
    # With --nproc the workers reported (rank 0 alone): this launcher process has nothing to add.
    if run.summary is not None:
        _report_adapt(run.summary, as_json=as_json)
    if launched_by_torch():
        # A worker that finished cleanly leaves at once: gloo's and onnxruntime's threads can
        # abort the interpreter's own teardown ("terminate called without an active exception").
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _report_adapt(result: Any, *, as_json: bool) -> None:
    """The summary of a run: one JSON object, or a table and the run directory."""
    if as_json:
        console.emit_json(result.to_dict())
        return
    m = result.metrics
    console.table(
        f"{result.model_name}: {result.strategy} ({result.fast_path})",
        [f"{m.split} accuracy", "macro F1", "best epoch", "epochs", "trainable params", "time"],
        [
            (
                f"{m.accuracy:.4f}",
                f"{m.macro_f1:.4f}",
                result.best_epoch,
                result.epochs_run,
                f"{result.trainable_params:,}",
                f"{result.seconds:.0f} s",
            )
        ],
    )
    click.echo(str(result.run_dir))


@main.command("compare")
@click.argument("model", required=False)
@click.option("--strategies", default="scratch,feature,finetune,gradual", show_default=True)
@click_options(COMPARE)
@preprocess_options
@json_option
@click.pass_context
def compare_command(ctx: click.Context, model: str | None, as_json: bool, **values: Any) -> None:
    """Train several strategies on the same split and compare them side by side."""
    result = zoo.compare(
        model,
        log=console.info,
        progress=not as_json and sys.stderr.isatty(),
        **values,
        **_where(ctx),
    )
    if as_json:
        console.emit_json(result.to_dict())
        return
    console.table(f"comparison in {result.folder}", *result.table())
    click.echo(str(result.folder))


@main.command("inspect")
@click.argument("name")
@json_option
@click.pass_context
def inspect_command(ctx: click.Context, name: str, as_json: bool) -> None:
    """Import a fetched model into PyTorch and show its input, head, feature tensor and blocks."""
    from rich.console import Console

    from pipeline.surgery.inspect import render

    report = zoo.inspect(name, **_where(ctx))
    if as_json:
        console.emit_json(report.to_dict())
        return
    render(report, Console(highlight=False))


@main.command("export")
@click.argument("run", required=False, type=click.Path(file_okay=False, path_type=Path))
@click_options(EXPORT)
@json_option
@click.pass_context
def export_command(ctx: click.Context, no_verify: bool, as_json: bool, **values: Any) -> None:
    """Export a run (default: the latest) to ONNX, and with --target to OpenVINO, LiteRT or a web
    page; each file is written only if its own runtime matches PyTorch on the held-out images."""
    summary = zoo.export(verify=not no_verify, log=console.info, **values, **_where(ctx))
    if as_json:
        console.emit_json(summary.to_dict())
        return
    if summary.report is not None:
        console.info(summary.report.render())
    if summary.int8:
        console.info(console.int8_line(summary.int8))
    click.echo(str(summary.path))


@main.command("verify")
@click.argument("model", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click_options(VERIFY)
@json_option
@click.pass_context
def verify_command(ctx: click.Context, model: Path, as_json: bool, **values: Any) -> None:
    """Run the verification gate on an existing ONNX file."""
    report = zoo.verify(model, **values, **_where(ctx))
    if as_json:
        console.emit_json(report.to_dict())
    else:
        console.info(report.render())
    if not report.passed:
        raise VerificationFailed(f"{model} failed verification; see the report above")


@main.command("predict")
@click.argument("model", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.argument("images", nargs=-1, required=True)
@click_options(PREDICT)
@preprocess_options
@json_option
@click.pass_context
def predict_command(ctx: click.Context, model: Path, as_json: bool, **values: Any) -> None:
    """Top-K labels for images, using nothing but the ONNX file."""
    predictions = zoo.predictions(model, catalog=_catalog(ctx), **values)
    if as_json:
        console.emit_json({"model": str(model), "predictions": [p.to_dict() for p in predictions]})
    else:
        for p in predictions:
            click.echo(p.line())
    if all(p.error for p in predictions):
        ctx.exit(1)


@main.command("evaluate")
@click.argument("model", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option(
    "--data", required=True, help="Any data source zoo adapt accepts; every image is used."
)
@click.option(
    "--plot", type=click.Path(dir_okay=False, path_type=Path), help="Confusion matrix PNG."
)
@click_options(EVALUATE)
@preprocess_options
@json_option
@click.pass_context
def evaluate_command(
    ctx: click.Context, model: Path, data: str, plot: Path | None, as_json: bool, **values: Any
) -> None:
    """Accuracy, macro precision/recall/F1 and confusion matrix of an ONNX file, from onnxruntime alone."""
    plot = plot or model.with_name(f"{model.stem}-confusion.png")
    metrics = zoo.evaluate(model, data, plot=plot, catalog=_catalog(ctx), **values)
    if as_json:
        console.emit_json({**metrics.to_dict(), "plot": str(plot)})
        return
    console.table(
        f"{model.name} on {data}",
        ["images", "accuracy", "macro precision", "macro recall", "macro F1"],
        [
            (
                metrics.num_images,
                f"{metrics.accuracy:.4f}",
                f"{metrics.macro_precision:.4f}",
                f"{metrics.macro_recall:.4f}",
                f"{metrics.macro_f1:.4f}",
            )
        ],
    )
    if metrics.unknown is not None:
        console.info(
            f"unknown: {metrics.unknown} images; accuracy on the rest {metrics.kept_accuracy or 0:.4f}"
        )
    console.info(f"confusion matrix: {plot}")


@main.command("cache")
@click.option("--clear", is_flag=True, help="Remove every entry; runs compute them again.")
@json_option
@click.pass_context
def cache_command(ctx: click.Context, clear: bool, as_json: bool) -> None:
    """List (or --clear) the workspace's cached features and imports, least recently used last."""
    found = zoo.cache_entries(models_dir=_where(ctx)["models_dir"], clear=clear)
    if as_json:
        console.emit_json({"cleared": clear, "entries": [entry.to_dict() for entry in found]})
        return
    if not found:
        console.info(f"nothing cached in {_where(ctx)['models_dir']}")
        return
    rows = [
        (e.kind, e.path.name, f"{e.bytes / 1e6:.1f} MB", e.to_dict()["last_used"]) for e in found
    ]
    console.table("removed" if clear else "cache", ["kind", "file", "size", "last used"], rows)
    console.info(f"{len(found)} entries, {sum(e.bytes for e in found) / 1e6:.1f} MB")


@main.command("report")
@click.argument("run", type=click.Path(path_type=Path))
@click.pass_context
def report_command(ctx: click.Context, run: Path) -> None:
    """Write RUN's report.html again (one self-contained page) and print its path."""
    click.echo(str(zoo.report(run, log=console.info, **_where(ctx))))


def run() -> None:
    """Entry point that keeps click's exit codes."""
    main(prog_name=os.environ.get("ZOO_PROG_NAME", "zoo"))


if __name__ == "__main__":
    run()
