"""`zoo`: the command line. A thin click layer: parse options, call one library function, print."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import click

from zoo import console
from zoo.errors import ZooError


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


def _state(ctx: click.Context) -> dict:
    return ctx.ensure_object(dict)


def _catalog(ctx: click.Context):  # noqa: ANN202
    from zoo.catalog import load_catalog

    state = _state(ctx)
    if "catalog" not in state:
        state["catalog"] = load_catalog(state.get("catalog_file"))
    return state["catalog"]


def _models_dir(ctx: click.Context) -> Path:
    return _state(ctx)["models_dir"]


json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object on stdout."
)

_PREPROCESS_FLAGS = (
    "preset",
    "mean",
    "std",
    "scale",
    "size",
    "resize",
    "bgr",
    "layout",
    "channels",
)


def preprocess_options(function):  # noqa: ANN001, ANN202
    """--preprocess and the flags laid over it, handed to the command as one `preprocess` request."""
    from zoo.preprocess import PRESET_NAMES

    @functools.wraps(function)
    def command(*args, **values):  # noqa: ANN002, ANN003, ANN202
        from zoo.preprocess import PreprocessRequest

        flags = {key: values.pop(key) for key in _PREPROCESS_FLAGS}
        return function(*args, preprocess=PreprocessRequest.from_flags(**flags), **values)

    options = [
        click.option(
            "--preprocess",
            "preset",
            type=click.Choice(PRESET_NAMES),
            help="How the model expects images, for a file the zoo does not know: imagenet "
            "(mean/std on [0,1]), inception ([-1,1]), caffe (BGR 0-255 minus means), raw ([0,1]).",
        ),
        click.option("--mean", help="Per-channel mean after scaling, e.g. 0.485,0.456,0.406."),
        click.option("--std", help="Per-channel std, e.g. 0.229,0.224,0.225."),
        click.option("--scale", help="Multiplies 0-255 pixels first, e.g. 1/255 or 1."),
        click.option("--size", type=click.IntRange(min=8), help="The model's input size (crop)."),
        click.option("--resize", type=click.IntRange(min=8), help="Resize target before the crop."),
        click.option("--bgr/--rgb", default=None, help="Channel order the model expects."),
        click.option(
            "--layout",
            type=click.Choice(["NCHW", "NHWC"], case_sensitive=False),
            help="Input layout (default: read from the graph).",
        ),
        click.option("--channels", type=click.Choice(["1", "3"]), help="1 for grayscale models."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


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
    state = _state(ctx)
    state.update(models_dir=models_dir, catalog_file=catalog_file, debug=debug)


@main.command("list")
@json_option
@click.pass_context
def list_command(ctx: click.Context, as_json: bool) -> None:
    """List the catalog: every zoo classifier and the bundled models."""
    from zoo.catalog import catalog_rows
    from zoo.workspace import list_workspace

    present = {m.name for m in list_workspace(_models_dir(ctx))}
    rows = catalog_rows(_catalog(ctx), present=present)
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

    entry = _catalog(ctx).resolve(name)
    if as_json:
        console.emit_json(entry.to_dict())
        return
    console.table(entry.name, ["field", "value"], describe_entry(entry))


@main.command("fetch")
@click.argument("source")
@click.option("--name", help="Workspace name for a URL or local file.")
@click.option("--sha256", help="Expected sha256 of the model file (pins a URL).")
@click.option(
    "--mirror",
    envvar="ZOO_MIRROR",
    help="Internal HTTP server or local folder with the zoo's repository layout (env ZOO_MIRROR).",
)
@click.option("--force", is_flag=True, help="Fetch again even when a verified copy is present.")
@preprocess_options
@json_option
@click.pass_context
def fetch_command(
    ctx: click.Context,
    source: str,
    name: str | None,
    sha256: str | None,
    mirror: str | None,
    force: bool,
    as_json: bool,
    preprocess,  # noqa: ANN001
) -> None:
    """Fetch a model by catalog name or alias, local .onnx/.tar.gz path, or URL; print its path."""
    from zoo.cache import fetch

    result = fetch(
        source,
        models_dir=_models_dir(ctx),
        catalog=_catalog(ctx),
        name=name,
        sha256=sha256,
        mirror=mirror,
        force=force,
        progress=not as_json and sys.stderr.isatty(),
        preprocess=preprocess,
    )
    if as_json:
        console.emit_json(result.to_dict())
        return
    verb = "already present" if result.cached else "fetched"
    console.info(f"{result.name}: {verb}, sha256 {result.sha256[:16]}…")
    click.echo(str(result.path))


@main.command("rank")
@click.argument("models", nargs=-1)
@click.option(
    "--data",
    default="builtin:digits",
    show_default=True,
    help="Class folders, train/val/test folders, a path,label CSV, or builtin:digits.",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="The split, as zoo adapt --seed."
)
@click.option("--strict", is_flag=True, help="Fail on unreadable images instead of skipping them.")
@json_option
@click.pass_context
def rank_command(
    ctx: click.Context, models: tuple[str, ...], data: str, seed: int, strict: bool, as_json: bool
) -> None:
    """Which model for your data? Rank MODELS (default: all fetched plus the bundled ones) by probe."""
    from pipeline.rank import rank_models

    result = rank_models(
        models,
        data=data,
        models_dir=_models_dir(ctx),
        catalog=_catalog(ctx),
        seed=seed,
        strict=strict,
        log=console.info,
    )
    if as_json:
        console.emit_json(result.to_dict())
        return
    console.table(
        f"linear probe on {result.train_images} train / {result.val_images} validation images "
        f"of {data} ({len(result.class_names)} classes)",
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


def _adapt_options(function):  # noqa: ANN001, ANN202
    """The training options shared by `zoo adapt` and `zoo compare`."""
    options = [
        click.option(
            "--classes",
            type=click.IntRange(min=2),
            help="Number of classes (checked against the data).",
        ),
        click.option(
            "--data",
            default="builtin:digits",
            show_default=True,
            help="Class folders, train/val/test folders, a path,label CSV, or builtin:digits.",
        ),
        click.option(
            "--unfreeze",
            type=click.IntRange(min=1),
            help="Top blocks to train (finetune, gradual).",
        ),
        click.option(
            "--unfreeze-every",
            type=click.IntRange(min=1),
            default=1,
            show_default=True,
            help="gradual: epochs between unfreezing one more block.",
        ),
        click.option(
            "--epochs",
            type=click.IntRange(min=1),
            default=None,
            help="Training epochs [default: 20]. The feature head is solved to convergence "
            "instead (each L-BFGS pass is one history row).",
        ),
        click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True),
        click.option(
            "--lr",
            type=click.FloatRange(min=0, min_open=True),
            default=3e-4,
            show_default=True,
            help="Learning rate of the new head; pretrained blocks get less.",
        ),
        click.option(
            "--lr-decay",
            type=click.FloatRange(min=0, max=1),
            default=None,
            help="Factor between the learning rates of neighbouring unfrozen blocks "
            "[default: 0.5 for finetune and gradual, 1 for full].",
        ),
        click.option(
            "--optimizer",
            type=click.Choice(["adam", "adamax", "adamw", "sgd"]),
            default="adam",
            show_default=True,
        ),
        click.option(
            "--patience",
            type=click.IntRange(min=1),
            default=10,
            show_default=True,
            help="Early stopping: epochs without a better validation loss.",
        ),
        click.option(
            "--label-smoothing", type=click.FloatRange(0, 1), default=0.0, show_default=True
        ),
        click.option(
            "--augment",
            type=click.Choice(["none", "light", "strong"]),
            default=None,
            help="Training augmentation [default: light for photos when convolution layers "
            "train (finetune, gradual, full, scratch), else none].",
        ),
        click.option(
            "--flip/--no-flip",
            default=None,
            help="Horizontal flips in --augment (default: on, except for data a mirror changes, like digits).",
        ),
        click.option(
            "--image-size",
            type=click.IntRange(min=8),
            help="Input size in pixels (default: the model's).",
        ),
        click.option(
            "--device",
            type=click.Choice(["auto", "cpu", "cuda"]),
            default="auto",
            show_default=True,
        ),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option(
            "--strict", is_flag=True, help="Fail on unreadable images instead of skipping them."
        ),
        click.option(
            "--hidden",
            type=click.IntRange(min=1),
            help="Add a hidden layer of this width to the head.",
        ),
        click.option(
            "--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


@main.command("adapt")
@click.argument("model", required=False)
@click.option(
    "--strategy",
    type=click.Choice(["auto", "feature", "finetune", "gradual", "full", "scratch"]),
    default="auto",
    show_default=True,
)
@_adapt_options
@click.option("--train-per-class", type=click.IntRange(min=1), help="Subsample the training split.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Run directory.")
@click.option(
    "--resume", is_flag=True, help="Continue the run in --out from its last complete epoch."
)
@click.option(
    "--nproc",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes on this machine, started by torch's elastic launcher (one per GPU).",
)
@click.option(
    "--nnodes",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Machines taking part; start zoo adapt on each with its --node-rank.",
)
@click.option(
    "--node-rank",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="This machine's number, 0 being the one at --rdzv-endpoint.",
)
@click.option("--rdzv-endpoint", help="HOST:PORT on node 0 where the machines meet.")
@click.option(
    "--sync-bn", is_flag=True, help="Share BatchNorm batch statistics across GPU workers."
)
@preprocess_options
@json_option
@click.pass_context
def adapt_command(ctx: click.Context, model: str | None, as_json: bool, **values) -> None:
    """Fine-tune MODEL (default: the latest fetched) on your images; writes a run directory."""
    from pipeline import distributed
    from pipeline.adapt import AdaptOptions, adapt

    request = distributed.Launch(
        nproc=values.pop("nproc"),
        nnodes=values.pop("nnodes"),
        node_rank=values.pop("node_rank"),
        rdzv_endpoint=values.pop("rdzv_endpoint"),
    )
    sync_bn = values.pop("sync_bn")
    if request.requested:
        # The workers run this same command without the launch options; rank 0 prints the result.
        launch_options = ("nproc", "nnodes", "node_rank", "rdzv_endpoint")
        distributed.launch(request, argv=_argv_of(ctx, skip=launch_options), out=values["out"])
        return
    dist = distributed.init_from_env(device=values["device"], sync_bn=sync_bn)
    try:
        with distributed.peers_watched(dist):
            result = adapt(
                AdaptOptions(model=model, **values),
                models_dir=_models_dir(ctx),
                catalog=_catalog(ctx),
                log=console.info if dist.is_main else lambda _: None,
                progress=dist.is_main and sys.stderr.isatty(),
                dist=dist,
            )
    finally:
        distributed.shutdown(dist)
    if dist.enabled:
        _report_adapt(result, as_json=as_json)
        # A worker that finished cleanly leaves at once: gloo's and onnxruntime's threads can
        # abort the interpreter's own teardown ("terminate called without an active exception").
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    _report_adapt(result, as_json=as_json)


def _report_adapt(result, *, as_json: bool) -> None:  # noqa: ANN001
    """The summary of a run: one JSON object, or a table and the run directory."""
    if result is None:
        return
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


def _argv_of(ctx: click.Context, *, skip: tuple[str, ...] = ()) -> list[str]:
    """The command line that gives `ctx`'s parsed values again (for worker processes)."""
    argv: list[str] = []
    positional: list[str] = []
    for level in (ctx.parent, ctx):
        if level is None:
            continue
        if level is ctx:
            argv.append(ctx.info_name or "")
        for param in level.command.params:
            value = level.params.get(param.name)
            if param.name in skip or value is None or param.name not in level.params:
                continue
            if isinstance(param, click.Argument):
                positional.append(str(value))
            elif getattr(param, "is_flag", False):
                if value:
                    argv.append(param.opts[0])
                elif param.secondary_opts:  # --no-x must reach the workers too
                    argv.append(param.secondary_opts[0])
            else:
                argv += [param.opts[0], str(value)]
    return argv + (["--", *positional] if positional else [])


@main.command("compare")
@click.argument("model", required=False)
@click.option("--strategies", default="scratch,feature,finetune,gradual", show_default=True)
@_adapt_options
@click.option("--train-per-class", type=click.IntRange(min=1), help="Subsample the training split.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Comparison folder.")
@preprocess_options
@json_option
@click.pass_context
def compare_command(
    ctx: click.Context, model: str | None, strategies: str, as_json: bool, **values
) -> None:
    """Train several strategies on the same split and compare them side by side."""
    from pipeline.adapt import AdaptOptions
    from pipeline.compare import compare, parse_strategies

    result = compare(
        AdaptOptions(model=model, **values),
        parse_strategies(strategies),
        models_dir=_models_dir(ctx),
        catalog=_catalog(ctx),
        log=console.info,
        progress=sys.stderr.isatty(),
    )
    if as_json:
        console.emit_json(result.to_dict())
        return
    rows = result.rows()
    console.table(
        f"comparison in {result.folder}",
        [
            "strategy",
            f"{rows[0]['metrics_split'] if rows else 'test'} accuracy",
            "macro F1",
            "best epoch",
            "time",
            "trainable params",
        ],
        [
            (
                r["strategy"],
                f"{r['test_accuracy']:.4f}",
                f"{r['macro_f1']:.4f}",
                r["best_epoch"],
                f"{r['seconds']:.0f} s",
                f"{r['trainable_params']:,}",
            )
            for r in rows
        ],
    )
    click.echo(str(result.folder))


@main.command("inspect")
@click.argument("name")
@json_option
@click.pass_context
def inspect_command(ctx: click.Context, name: str, as_json: bool) -> None:
    """Import a fetched model into PyTorch and show its input, head, feature tensor and blocks."""
    from rich.console import Console

    from pipeline.inspect import inspect_model, render
    from zoo.workspace import open_model

    path, card = open_model(name, models_dir=_models_dir(ctx), catalog=_catalog(ctx))
    report = inspect_model(path, name=card.get("name", name))
    if as_json:
        console.emit_json(report.to_dict())
        return
    render(report, Console(highlight=False))


@main.command("export")
@click.argument("run", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Output file (default RUN/model.onnx).",
)
@click.option("--opset", type=click.IntRange(11, 21), default=17, show_default=True)
@click.option(
    "--atol", type=float, default=1e-4, show_default=True, help="Absolute tolerance of the gate."
)
@click.option(
    "--rtol", type=float, default=1e-3, show_default=True, help="Relative tolerance of the gate."
)
@click.option("--no-verify", is_flag=True, help="Skip the verification gate (not recommended).")
@click.option(
    "--quantize", type=click.Choice(["int8"]), help="Also write a static INT8 copy beside it."
)
@json_option
@click.pass_context
def export_command(
    ctx: click.Context,
    run: Path | None,
    out: Path | None,
    opset: int,
    atol: float,
    rtol: float,
    no_verify: bool,
    quantize: str | None,
    as_json: bool,
) -> None:
    """Export a run (default: the latest) to ONNX; fails unless onnxruntime matches PyTorch."""
    from pipeline.deploy import export_run

    summary = export_run(
        run,
        models_dir=_models_dir(ctx),
        catalog=_catalog(ctx),
        out=out,
        opset=opset,
        atol=atol,
        rtol=rtol,
        verify=not no_verify,
        quantize=quantize,
        log=console.info,
    )
    if as_json:
        console.emit_json(summary.to_dict())
        return
    if summary.report is not None:
        console.info(summary.report.render())
    if summary.int8:
        i8 = summary.int8
        console.info(
            f"int8: {i8['path']} ({i8['ratio']:.0%} of fp32), accuracy {i8.get('accuracy_int8')} "
            f"vs {i8.get('accuracy_fp32')} fp32, top-1 agreement {i8.get('top1_agreement')}"
        )
    click.echo(str(summary.path))


@main.command("verify")
@click.argument("model", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option(
    "--run",
    "run_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="The run the file came from: compare against its PyTorch model on its test split.",
)
@click.option("--runtimes", default="ort", show_default=True, help="Comma-separated: ort, opencv.")
@click.option("--atol", type=float, default=1e-4, show_default=True)
@click.option("--rtol", type=float, default=1e-3, show_default=True)
@json_option
@click.pass_context
def verify_command(
    ctx: click.Context,
    model: Path,
    run_dir: Path | None,
    runtimes: str,
    atol: float,
    rtol: float,
    as_json: bool,
) -> None:
    """Run the verification gate on an existing ONNX file."""
    from pipeline.deploy import verify_file
    from zoo.errors import VerificationFailed

    report = verify_file(
        model,
        run_dir=run_dir,
        models_dir=_models_dir(ctx),
        catalog=_catalog(ctx),
        runtimes=[r.strip() for r in runtimes.split(",") if r.strip()],
        atol=atol,
        rtol=rtol,
    )
    if as_json:
        console.emit_json(report.to_dict())
    else:
        console.info(report.render())
    if not report.passed:
        raise VerificationFailed(f"{model} failed verification; see the report above")


@main.command("predict")
@click.argument("model", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.argument("images", nargs=-1, required=True)
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@preprocess_options
@json_option
@click.pass_context
def predict_command(
    ctx: click.Context,
    model: Path,
    images: tuple[str, ...],
    top_k: int,
    provider: str,
    as_json: bool,
    preprocess,  # noqa: ANN001
) -> None:
    """Top-K labels for images, using nothing but the ONNX file."""
    from pipeline.deploy import predict

    predictions = predict(
        model,
        images,
        catalog=_catalog(ctx),
        top_k=top_k,
        provider=provider,
        preprocess=preprocess,
    )
    if as_json:
        console.emit_json({"model": str(model), "predictions": [p.to_dict() for p in predictions]})
    else:
        for p in predictions:
            if p.error:
                click.echo(f"{p.image}: unreadable ({p.error})")
            else:
                click.echo(
                    f"{p.image}: " + ", ".join(f"{label} {prob:.3f}" for label, prob in p.top)
                )
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
@preprocess_options
@json_option
@click.pass_context
def evaluate_command(
    ctx: click.Context,
    model: Path,
    data: str,
    plot: Path | None,
    as_json: bool,
    preprocess,  # noqa: ANN001
) -> None:
    """Accuracy, macro precision/recall/F1 and confusion matrix of an ONNX file, from onnxruntime alone."""
    from pipeline.deploy import evaluate_file

    plot = plot or model.with_name(f"{model.stem}-confusion.png")
    metrics = evaluate_file(model, data, catalog=_catalog(ctx), plot=plot, preprocess=preprocess)
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
    console.info(f"confusion matrix: {plot}")


@main.command("report")
@click.argument("run", type=click.Path(path_type=Path))
def report_command(run: Path) -> None:
    """Write RUN/report.html again (one self-contained page) and print its path."""
    from pipeline.report_html import write_report

    click.echo(str(write_report(run)))


def run() -> None:
    """Entry point that keeps click's exit codes."""
    main(prog_name=os.environ.get("ZOO_PROG_NAME", "zoo"))


if __name__ == "__main__":
    run()
