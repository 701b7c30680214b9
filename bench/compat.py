"""Which models work: the real CLI over real files and one built graph per quirk, as a table.

    python -m bench.compat [--shared ../shared] [--readme README.md] [--json FILE]

Each model goes through `zoo fetch`, `info`, `inspect`, then per data set `adapt` (one epoch,
`--strategy feature`, a few training images per class), `export`, `verify --run`, `predict` and
`evaluate`, each in its own `zoo` process with a temporary `--models-dir`, as a user would type
them. A step passes with exit code 0; a clean refusal is its one-line `zoo: error:`; an
"internal error" or a traceback anywhere is a bug (`Step.crashed`), whatever the exit code.
Rows: every file in ../shared/models (when present) and every graph of
tests/onnx_builders.TINY_GRAPHS (so a quirk added there gets its row here) and one old-opset
graph per kind of tests/legacy_builders.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
TABLE_STEPS = ("fetch", "inspect", "adapt", "export", "verify")
MARKERS = ("<!-- compat -->", "<!-- /compat -->")
README_HEADING = "## Which models work"
COMMAND_TIMEOUT_S = 900
CELL_CHARS = 200  # longer messages are cut in the table (the JSON keeps them whole)
CRASH_SIGNS = ("internal error", "Traceback (most recent call last)")


@dataclass
class Step:
    """One `zoo` command: what ran, how it ended, and the line a user would read."""

    name: str
    args: list[str]
    exit_code: int | None  # None: not run (an earlier step failed) or timed out
    message: str  # "" on success, else the first `zoo: error:` line (or why it did not run)
    crashed: bool = False  # an internal error or a traceback: a bug, never a refusal
    output: str = ""  # stdout and stderr, for the report of a crash

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.crashed

    def cell(self) -> str:
        """The table cell: ✓, the one-line error, or a dash when it did not run."""
        if self.ok:
            return "✓"
        if self.exit_code is None and not self.crashed:
            return "–"
        text = ("CRASH " if self.crashed else "") + self.message
        if len(text) > CELL_CHARS:
            text = (
                text[:CELL_CHARS].rstrip() + "…" + ("`" if text[:CELL_CHARS].count("`") % 2 else "")
            )
        return text.replace("|", "\\|")


@dataclass
class Row:
    """One model: where it came from and its steps (per data set after inspect)."""

    name: str
    kind: str  # "real file" or "built graph"
    path: str
    steps: list[Step] = field(default_factory=list)

    def step(self, name: str) -> Step | None:
        """The first step called `name` (adapt and later ones: the first data set's)."""
        return next((s for s in self.steps if s.name == name), None)

    def crashes(self) -> list[Step]:
        return [s for s in self.steps if s.crashed]


def zoo_env() -> dict[str, str]:
    """This checkout first on the path, one thread (the machines are small and shared)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_zoo(
    name: str, args: Sequence[str], *, models_dir: Path, timeout: float = COMMAND_TIMEOUT_S
) -> Step:
    """`zoo --models-dir DIR ARGS` in a fresh process, judged as a user would judge it."""
    argv = ["--models-dir", str(models_dir), *args]
    command = [sys.executable, "-c", "import cli; cli.run()", *argv]
    try:
        done = subprocess.run(
            command, cwd=ROOT, env=zoo_env(), capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return Step(name, argv, None, f"timed out after {timeout:.0f} s", crashed=True)
    return judge(name, argv, done.returncode, done.stdout, done.stderr)


def judge(name: str, argv: list[str], exit_code: int, stdout: str, stderr: str) -> Step:
    """A finished command as a user reads it: success, a one-line refusal, or a crash."""
    output = stdout + stderr
    crashed = (
        any(sign in output for sign in CRASH_SIGNS) or exit_code < 0
    )  # < 0: killed by a signal
    message = ""
    if exit_code != 0:
        errors = [line for line in stderr.splitlines() if line.startswith("zoo: ")]
        lines = [line for line in stderr.splitlines() if line.strip()]
        message = (
            re.sub(r"^zoo: (error: )?", "", errors[0])
            if errors
            else lines[-1]
            if lines
            else f"exit code {exit_code} without a message"
        )
    return Step(name, argv, exit_code, message, crashed, output if crashed else "")


def skipped(name: str, why: str) -> Step:
    return Step(name, [], None, why)


def catalog_shas() -> set[str]:
    """sha256 of every catalog entry: such files need no preprocessing flags at fetch."""
    from zoo.catalog import load_catalog

    catalog = load_catalog()
    return {catalog[n].sha256 for n in catalog if catalog[n].sha256}


# The documented preprocessing of real files the catalog lacks (../shared/REAL_CORPUS.md), as
# `zoo fetch` flags; any other such file is fetched with --preprocess imagenet.
REAL_PREPROCESS = {
    "pp-lcnet-orientation": ["--preprocess", "imagenet"],
    # /255, its own CIFAR-10 mean/std, no resize beyond its fixed 32x32 input.
    "cifar10-resnet20": [
        "--mean", "0.4914,0.4822,0.4465", "--std", "0.2023,0.1994,0.2010", "--resize", "32",
    ],
}  # fmt: skip


def fetch_step(path: Path, name: str, *, models_dir: Path, known: bool) -> Step:
    """`zoo fetch PATH --name NAME`, with the file's documented preprocessing when the catalog lacks it.

    Where this version of zoo has no --preprocess yet, the fetch is tried again without it.
    """
    args = ["fetch", str(path), "--name", name]
    if known:
        return run_zoo("fetch", args, models_dir=models_dir)
    flags = REAL_PREPROCESS.get(name, ["--preprocess", "imagenet"])
    step = run_zoo("fetch", [*args, *flags], models_dir=models_dir)
    if step.exit_code == 2 and re.search(r"No such option.*--preprocess", step.message):
        step = run_zoo("fetch", args, models_dir=models_dir)
    return step


def sweep_model(
    path: Path,
    *,
    name: str,
    kind: str,
    data: Sequence[str],
    work: Path,
    known: bool,
    train_per_class: int = 4,
) -> Row:
    """Every command over one model file and each data source; later steps wait on earlier ones."""
    models_dir = work / "models"
    row = Row(name, kind, str(path))
    fetch = fetch_step(path, name, models_dir=models_dir, known=known)
    row.steps.append(fetch)
    if not fetch.ok:
        row.steps.append(skipped("inspect", "fetch failed"))
        return row
    if known:  # `zoo info` describes catalog entries
        row.steps.append(run_zoo("info", ["info", name], models_dir=models_dir))
    inspect = run_zoo("inspect", ["inspect", name], models_dir=models_dir)
    row.steps.append(inspect)
    if not inspect.ok:
        return row
    for index, source in enumerate(data):
        run_dir = work / f"run-{index}"
        row.steps += _train_and_deploy(
            name, source, run_dir=run_dir, models_dir=models_dir, train_per_class=train_per_class
        )
    return row


def _train_and_deploy(
    name: str, source: str, *, run_dir: Path, models_dir: Path, train_per_class: int
) -> list[Step]:
    adapt = run_zoo(
        "adapt",
        [
            "adapt", name, "--data", source, "--epochs", "1", "--strategy", "feature",
            "--train-per-class", str(train_per_class), "--device", "cpu", "--out", str(run_dir),
        ],
        models_dir=models_dir,
    )  # fmt: skip
    if not adapt.ok:
        return [adapt, *(skipped(s, "adapt failed") for s in ("export", "verify"))]
    export = run_zoo("export", ["export", str(run_dir)], models_dir=models_dir)
    if not export.ok:
        return [adapt, export, skipped("verify", "export failed")]
    onnx_file = str(run_dir / "model.onnx")
    return [
        adapt,
        export,
        run_zoo("verify", ["verify", onnx_file, "--run", str(run_dir)], models_dir=models_dir),
        run_zoo("predict", ["predict", onnx_file, *_some_images(source)], models_dir=models_dir),
        run_zoo(
            "evaluate",
            ["evaluate", onnx_file, "--data", source, "--plot", str(run_dir / "evaluate.png")],
            models_dir=models_dir,
        ),
    ]


def _some_images(source: str, n: int = 3) -> list[str]:
    """A few image files of a folder source, for `zoo predict`."""
    from pipeline.data.images import is_image_name

    found = sorted(p for p in Path(source).rglob("*") if p.is_file() and is_image_name(p.name))
    return [str(p) for p in found[:: max(1, len(found) // n)][:n]] or [source]


# ----------------------------------------------------------------------------- the rows


def real_files(shared: Path) -> list[Path]:
    """Every model file in shared/models (none when the folder is absent)."""
    folder = shared / "models"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


# Old-opset kinds of tests/legacy_builders.py and the opset each is built at (its zoo family's).
LEGACY_KINDS = {"caffe": 3, "bn": 1, "squeeze": 6, "shuffle": 6, "cntk": 1}


def built_graphs(folder: Path) -> list[tuple[str, Path]]:
    """One file per quirk kind of tests/onnx_builders.TINY_GRAPHS, written into `folder`."""
    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from legacy_builders import legacy_classifier
    from onnx_builders import TINY_GRAPHS, save

    folder.mkdir(parents=True, exist_ok=True)
    built = [
        (f"built-{kind}", save(build(), folder / f"built-{kind}.onnx"))
        for kind, (build, *_) in TINY_GRAPHS.items()
    ]
    # The old idioms of the zoo's opset 1-6 files, one family each (tests/legacy_builders.py).
    built += [
        (
            f"opset{opset}-{kind}",
            save(legacy_classifier(kind, opset), folder / f"opset{opset}-{kind}.onnx"),
        )
        for kind, opset in LEGACY_KINDS.items()
    ]
    return built


def tiny_photos(folder: Path, *, classes: int = 3, per_class: int = 6) -> Path:
    """A small folder of class folders of PIL-made images (the built graphs' data)."""
    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from image_builders import make_image_folder

    return make_image_folder(
        folder, {f"class{c}": per_class for c in range(classes)}, size=(40, 32)
    )


def sweep(
    *,
    shared: Path,
    work: Path,
    datasets: Sequence[str],
    train_per_class: int = 4,
    only: Sequence[str] = (),
    built: bool = True,
) -> list[Row]:
    """Every real file over `datasets` (names under shared/datasets), every built graph over tiny photos.

    `only`: keep the models whose row name contains one of these texts; `built`: add the built graphs.
    """
    known = catalog_shas()
    from zoo.files import sha256_file

    rows = []
    sources = [str(shared / "datasets" / d) for d in datasets if (shared / "datasets" / d).is_dir()]
    for path in real_files(shared):
        name = re.sub(r"[^A-Za-z0-9._+-]", "-", path.stem)
        if only and not any(text in name for text in only):
            continue
        rows.append(
            sweep_model(
                path,
                name=name,
                kind="real file",
                data=sources,
                work=work / name,
                known=sha256_file(path) in known,
                train_per_class=train_per_class,
            )
        )
        _progress(rows[-1])
    if not built:
        return rows
    photos = str(tiny_photos(work / "tiny-photos"))
    for name, path in built_graphs(work / "graphs"):
        if only and not any(text in name for text in only):
            continue
        rows.append(
            sweep_model(
                path,
                name=name,
                kind="built graph",
                data=[photos],
                work=work / name,
                known=False,
                train_per_class=train_per_class,
            )
        )
        _progress(rows[-1])
    return rows


def _progress(row: Row) -> None:
    cells = " ".join(
        f"{s.name}:{'ok' if s.ok else 'CRASH' if s.crashed else '-'}" for s in row.steps
    )
    print(f"{row.name}: {cells}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the table


def markdown(rows: Sequence[Row]) -> str:
    """The compatibility table: one row per model, ✓ or the one-line error per step."""
    head = ["model", "kind", *TABLE_STEPS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = []
        for name in TABLE_STEPS:
            step = row.step(name)
            cells.append(step.cell() if step is not None else "–")
        lines.append("| " + " | ".join([f"`{Path(row.path).name}`", row.kind, *cells]) + " |")
    return "\n".join(lines) + "\n"


def write_readme(readme: Path, table: str) -> None:
    """Put the table between the compat markers of the README (adding the section if absent)."""
    start, end = MARKERS
    note = (
        "Generated by `python -m bench.compat` (real CLI, one epoch of `--strategy feature`): "
        "✓ passed, otherwise the one-line error a user sees; – not run after an earlier failure.\n\n"
    )
    block = f"{start}\n{note}{table}{end}"
    text = readme.read_text(encoding="utf-8")
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + f"\n\n{README_HEADING}\n\n{block}\n"
    readme.write_text(text, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shared", type=Path, default=SHARED, help="real material (models/, datasets/)"
    )
    parser.add_argument(
        "--datasets", default="flowers5", help="comma-separated, under shared/datasets"
    )
    parser.add_argument("--train-per-class", type=int, default=4)
    parser.add_argument("--only", default="", help="comma-separated parts of model names to keep")
    parser.add_argument("--readme", type=Path, help="rewrite this README's compatibility section")
    parser.add_argument("--json", type=Path, help="also write every step as JSON here")
    parser.add_argument(
        "--work", type=Path, help="keep the models and runs here (default: a temp dir)"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="zoo-compat-") as tmp:
        work = args.work or Path(tmp)
        rows = sweep(
            shared=args.shared,
            work=work,
            datasets=[d for d in args.datasets.split(",") if d],
            train_per_class=args.train_per_class,
            only=[t for t in args.only.split(",") if t],
        )
    table = markdown(rows)
    sys.stdout.write(table)
    if args.readme:
        write_readme(args.readme, table)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1, ensure_ascii=False))
    crashes = [(r.name, s) for r in rows for s in r.crashes()]
    for name, step in crashes:
        print(f"CRASH {name} {step.name}: {step.message}\n{step.output[-2000:]}", file=sys.stderr)
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
