"""The options of the commands, declared once: `zoo adapt`'s flags are `zoo.adapt`'s keywords.

The CLI turns each `Option` into a click option; the Python API checks its keyword arguments
against the same declarations (name, type, range, default), so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from zoo.errors import InvalidOption


@dataclass(frozen=True)
class Option:
    """One option: the keyword of the API function and, with dashes, the flag of the command."""

    name: str  # the Python keyword; the flag is --name-with-dashes unless `flags` says otherwise
    type: Any = None  # a click type: checks values from Python as well as from the command line
    default: Any = None
    help: str | None = None
    flag: bool = False  # an on/off flag such as --strict
    flags: str | None = None  # the declaration when not --name: "--flip/--no-flip", "--preprocess"

    @property
    def declaration(self) -> str:
        return self.flags or "--" + self.name.replace("_", "-")

    def click_option(self) -> Callable[[Any], Any]:
        if self.flag:
            return click.option(self.declaration, self.name, is_flag=True, help=self.help)
        return click.option(
            self.declaration,
            self.name,
            type=self.type,
            default=self.default,
            show_default=self.default is not None,
            help=self.help,
        )

    def check(self, value: Any) -> Any:
        """The value as the command line would have it, or InvalidOption saying why not."""
        if value is None or self.type is None and not self.flag:
            return value
        if self.flag or self.type is click.BOOL:
            if not isinstance(value, bool):
                raise InvalidOption(f"{self.name}={value!r} must be True or False")
            return value
        if isinstance(self.type, click.Choice) and not isinstance(value, str):
            value = str(value)  # channels=3 is the command line's "3"
        try:
            return self.type.convert(value, None, None)
        except click.BadParameter as exc:
            raise InvalidOption(f"{self.name}={value!r}: {exc.message}") from None


DATA_HELP = "Class folders, train/val/test folders, a path,label CSV, or builtin:digits."
STRICT = Option(
    "strict", flag=True, help="Fail on unreadable images instead of skipping them.", default=False
)
# `auto`, then the strategies registered in pipeline.surgery.strategies: written out, not imported,
# so that `zoo --help` loads no torch. tests/test_strategies.py checks that the two agree.
STRATEGIES = ("auto", "feature", "finetune", "gradual", "full", "scratch")

# The training options shared by `zoo adapt` and `zoo compare`, in --help's order.
TRAINING = (
    Option("classes", click.IntRange(min=2), help="Number of classes (checked against the data)."),
    Option("data", click.STRING, "builtin:digits", DATA_HELP),
    Option("unfreeze", click.IntRange(min=1), help="Top blocks to train (finetune, gradual)."),
    Option(
        "unfreeze_every",
        click.IntRange(min=1),
        1,
        "gradual: epochs between unfreezing one more block.",
    ),
    Option(
        "epochs",
        click.IntRange(min=1),
        help="Training epochs [default: finetune, gradual and full 10, or up to 20 on small "
        "data until about 200 steps; scratch and a --hidden feature head 20]. The feature head "
        "alone is solved to convergence instead (each L-BFGS pass is one history row).",
    ),
    Option("batch_size", click.IntRange(min=1), 32),
    Option(
        "lr",
        click.FloatRange(min=0, min_open=True),
        3e-4,
        "Learning rate of the new head; pretrained blocks get less.",
    ),
    Option(
        "lr_decay",
        click.FloatRange(min=0, max=1),
        help="Factor between the learning rates of neighbouring unfrozen blocks "
        "[default: 0.5 for finetune and gradual, 1 for full].",
    ),
    Option("optimizer", click.Choice(["adam", "adamax", "adamw", "sgd"]), "adam"),
    Option(
        "patience",
        click.IntRange(min=1),
        10,
        "Early stopping: epochs without a better validation loss.",
    ),
    Option("label_smoothing", click.FloatRange(0, 1), 0.0),
    Option(
        "augment",
        click.Choice(["none", "light", "strong"]),
        help="Training augmentation [default: light for photos when convolution layers "
        "train (finetune, gradual, full, scratch), else none].",
    ),
    Option(
        "flip",
        click.BOOL,
        flags="--flip/--no-flip",
        help="Horizontal flips in --augment (default: on, except for data a mirror changes, like digits).",
    ),
    Option(
        "image_size", click.IntRange(min=8), help="Input size in pixels (default: the model's)."
    ),
    Option("device", click.Choice(["auto", "cpu", "cuda"]), "auto"),
    Option("seed", click.INT, 0),
    STRICT,
    Option("hidden", click.IntRange(min=1), help="Add a hidden layer of this width to the head."),
    Option("dropout", click.FloatRange(0, 1, max_open=True), 0.0),
    Option("train_per_class", click.IntRange(min=1), help="Subsample the training split."),
    Option(
        "balance",
        click.Choice(["none", "weights", "sampler"]),
        help="Unequal classes: class weights in the loss, a sampler drawing each class equally "
        "often, or none [default: weights when the largest training class has 3x the images of "
        "the smallest, else none].",
    ),
)
# `zoo rank`: the data and the split it is probed on.
RANK = (TRAINING[1], Option("seed", click.INT, 0, "The split, as zoo adapt --seed."), STRICT)
# `zoo check`: the data, and the split it is checked on (the one `zoo adapt --seed` makes).
CHECK = RANK
STRATEGY = Option("strategy", click.Choice(STRATEGIES), "auto")
RUN_DIR = click.Path(file_okay=False, path_type=Path)
# Where `zoo adapt` writes and how it spreads over processes (torchrun's options, by their names).
ADAPT_RUN = (
    Option("out", RUN_DIR, help="Run directory."),
    Option(
        "resume",
        flag=True,
        default=False,
        help="Continue the run in --out from its last complete epoch.",
    ),
    Option(
        "nproc",
        click.IntRange(min=1),
        1,
        "Worker processes on this machine, started by torch's elastic launcher (one per GPU).",
    ),
    Option(
        "nnodes",
        click.IntRange(min=1),
        1,
        "Machines taking part; start zoo adapt on each with its --node-rank.",
    ),
    Option(
        "node_rank",
        click.IntRange(min=0),
        0,
        "This machine's number, 0 being the one at --rdzv-endpoint.",
    ),
    Option("rdzv_endpoint", click.STRING, help="HOST:PORT on node 0 where the machines meet."),
    Option(
        "sync_bn",
        flag=True,
        default=False,
        help="Share BatchNorm batch statistics across GPU workers.",
    ),
)
LAUNCH = ("nproc", "nnodes", "node_rank", "rdzv_endpoint")
# The unknown threshold (pipeline.train.trust): the share of validation images it keeps.
KEEP_RANGE = click.FloatRange(0, 1, min_open=True)
KEEP = Option(
    "keep",
    KEEP_RANGE,
    0.95,
    "Share of validation images the unknown threshold keeps; an image scoring past it is "
    "'unknown' in zoo predict and zoo evaluate.",
)
ADAPT = (STRATEGY, *TRAINING, KEEP, *ADAPT_RUN)
COMPARE = (*TRAINING, KEEP, Option("out", RUN_DIR, help="Comparison folder."))

# `zoo fetch`: $ZOO_MIRROR is read by zoo.fetch itself, for Python callers as well.
FETCH = (
    Option("name", click.STRING, help="Workspace name for a URL or local file."),
    Option("sha256", click.STRING, help="Expected sha256 of the model file (pins a URL)."),
    Option(
        "mirror",
        click.STRING,
        help="Internal HTTP server or local folder with the zoo's repository layout (env ZOO_MIRROR).",
    ),
    Option(
        "force",
        flag=True,
        default=False,
        help="Fetch again even when a verified copy is present.",
    ),
)
TOLERANCES = (
    Option("atol", click.FLOAT, 1e-4, "Absolute tolerance of the gate."),
    Option("rtol", click.FLOAT, 1e-3, "Relative tolerance of the gate."),
)
EXPORT = (
    Option(
        "out",
        click.Path(dir_okay=False, path_type=Path),
        help="Output file (default RUN/model.onnx).",
    ),
    Option("opset", click.IntRange(11, 21), 17),
    *TOLERANCES,
    Option(
        "no_verify",
        flag=True,
        default=False,
        help="Skip the verification gate (not recommended).",
    ),
    Option(
        "keep",
        KEEP_RANGE,
        help="Choose the unknown threshold again to keep this share of validation images "
        "[default: the run's, 0.95 unless zoo adapt --keep said otherwise].",
    ),
    Option(
        "quantize",
        click.Choice(["int8"]),
        help="Also write a static INT8 copy of the ONNX file beside it (other targets stay float32).",
    ),
    Option(
        "targets",
        click.STRING,
        "onnx",
        "Comma-separated: onnx, openvino, tflite, web; all = every installed one. Each is gated "
        "on the run's held-out images; the others go to RUN/deploy/<target>/.",
        flags="--target",
    ),
    Option(
        "embed_preprocess",
        click.BOOL,
        flags="--embed-preprocess/--no-embed-preprocess",
        help="Put the resize, crop and normalisation inside the file: it takes uint8 pixels "
        "(default: only for web; openvino and tflite take crop-size pixels, the app resizes).",
    ),
)
VERIFY = (
    Option(
        "run",
        click.Path(file_okay=False, path_type=Path),
        help="The run the file came from: compare against its PyTorch model on its test split.",
    ),
    Option(
        "runtimes",
        click.STRING,
        "ort",
        "Comma-separated: ort, opencv, openvino, tflite, web (converted in a temporary folder; "
        "with --run, RUN/deploy/<target>/ as written).",
    ),
    *TOLERANCES,
)
# zoo predict and zoo evaluate: an image past the file's unknown threshold (zoo.ood) is "unknown".
REJECT = Option(
    "reject",
    click.BOOL,
    True,
    "Call an image past the file's unknown threshold 'unknown' (--no-reject: always the best class).",
    flags="--reject/--no-reject",
)
PREDICT = (
    Option("top_k", click.IntRange(min=1), 5),
    Option("provider", click.Choice(["cpu", "cuda"]), "cpu"),
    REJECT,
)
EVALUATE = (REJECT,)

# --preprocess and the flags laid over it (zoo.preprocess.PreprocessRequest.from_flags's names).
PREPROCESS = (
    Option(
        "preset",
        click.Choice(("imagenet", "inception", "caffe", "raw", "auto")),
        flags="--preprocess",
        help="How the model expects images, for a file the zoo does not know: imagenet "
        "(mean/std on [0,1]), inception ([-1,1]), caffe (BGR 0-255 minus means), raw ([0,1]); "
        "auto measures them on sample photos and takes the clearly best.",
    ),
    Option(
        "like",
        click.STRING,
        help="Take this catalog entry's preprocessing and labels (for another revision of it).",
    ),
    Option("mean", click.STRING, help="Per-channel mean after scaling, e.g. 0.485,0.456,0.406."),
    Option("std", click.STRING, help="Per-channel std, e.g. 0.229,0.224,0.225."),
    Option("scale", click.STRING, help="Multiplies 0-255 pixels first, e.g. 1/255 or 1."),
    Option("size", click.IntRange(min=8), help="The model's input size (crop)."),
    Option("resize", click.IntRange(min=8), help="Resize target before the crop."),
    Option("bgr", click.BOOL, flags="--bgr/--rgb", help="Channel order the model expects."),
    Option(
        "layout",
        click.Choice(["NCHW", "NHWC"], case_sensitive=False),
        help="Input layout (default: read from the graph).",
    ),
    Option("channels", click.Choice(["1", "3"]), help="1 for grayscale models."),
)


def checked(
    values: Mapping[str, Any], declared: Iterable[Option], *, command: str
) -> dict[str, Any]:
    """Every declared option, given or by default, each checked; InvalidOption for unknown names."""
    by_name = {option.name: option for option in declared}
    unknown = sorted(set(values) - set(by_name))
    if unknown:
        raise InvalidOption(
            f"{command} has no option {', '.join(unknown)}; "
            f"its options are {', '.join(sorted(by_name))}"
        )
    return {
        name: option.check(values[name]) if name in values else option.default
        for name, option in by_name.items()
    }


def click_options(declared: Iterable[Option]) -> Callable[[Any], Any]:
    """A decorator adding the declared options to a click command, in their order."""
    options = [option.click_option() for option in declared]

    def decorate(function: Any) -> Any:
        for option in reversed(options):
            function = option(function)
        return function

    return decorate


def command_line(values: Mapping[str, Any], declared: Iterable[Option]) -> list[str]:
    """The flags that give `values` again (for worker processes), those left at None omitted."""
    argv: list[str] = []
    for option in declared:
        value = values.get(option.name)
        if value is None:
            continue
        on, _, off = option.declaration.partition("/")
        if option.flag:
            argv += [on] if value else []
        elif off:
            argv.append(on if value else off)
        else:
            argv += [on, str(value)]
    return argv


def argv_of(ctx: click.Context, *, skip: tuple[str, ...] = ()) -> list[str]:
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
