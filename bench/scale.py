"""Benchmark 8: real photos at scale: phone photos, growing data sets, caches reused.

    python -m bench.scale --worker --models-dir W adapt ...   # one zoo command, then its peak RSS
    python -m bench.scale --floor DIR --onnx MODEL            # the least work the photos need

Every figure is a whole process, as a user runs it: the parent times the child from start to
exit, and the child prints its own peak resident set (VmHWM) as `peak_kib N` (see bench.memory).
Each `zoo adapt` starts on a fresh workspace (the fetched model hard-linked in, empty caches),
except in part (c), which measures what the second run on the same data reuses. The photos come
from ../shared/datasets/flowers5 (bench/scale_data.py makes the sets); without it the section
says so and runs nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import MODEL_NAME, Scale, Section, goal_verdict, interleave, markdown_table
from bench.memory import own_peak_kib
from bench.scale_data import PHONE_SIZE, count_images, phone_photos, random_crops, subset

KEY = "scale"
TITLE = "8. Real photos at scale: phone photos, growing data, cache reuse"
ROOT = Path(__file__).resolve().parent.parent
SHARED_DIR = Path(os.environ.get("ZOO_SHARED", ROOT.parent / "shared"))
SOURCE = "flowers5"
FLOOR_BATCH = 64
PHONE_GOAL = 1.5  # zoo's marginal seconds per photo ÷ the floor's, at most
RSS_GOAL = 1.2  # peak RSS at the largest set ÷ at the smallest, at most
LINEAR_GOAL = 1.2  # seconds per image at the largest set ÷ at the smallest: linear or better
REUSE_GOAL = 5.0  # set-up seconds of the first run ÷ of a later one, at least
START_STAGES = ("imports",)  # run.json "timings": the libraries, paid by every process alike
SETUP_STAGES = ("data", "model", "choose", "cache")  # run.json "timings" before training
STAGES = (*START_STAGES, *SETUP_STAGES, "train", "evaluate")
ADAPT = ["adapt", MODEL_NAME, "--seed", "0"]
GROWTH_STRATEGIES = {
    "feature": ["--strategy", "feature"],
    "finetune": [
        "--strategy",
        "finetune",
        "--unfreeze",
        "4",
        "--augment",
        "none",
        "--epochs",
        "1",
    ],  # fmt: skip
}
REUSE_RUNS = {
    "1. `--strategy feature`, empty cache": ["--strategy", "feature"],
    "2. `--strategy feature --hidden 256`": ["--strategy", "feature", "--hidden", "256"],
}


@dataclass(frozen=True)
class Measured:
    """One child process: its wall time, its peak RSS, and the stage timings of its run.json."""

    seconds: float
    peak_mib: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    strategy: str = ""  # what the run trained (auto's choice)

    @property
    def setup(self) -> float:
        """Seconds before training: scanning the data, importing the model, choosing, caching."""
        return sum(self.timings.get(stage, 0.0) for stage in SETUP_STAGES)

    @property
    def startup(self) -> float:
        """Seconds of the process's start-up stages (loading the libraries)."""
        return sum(self.timings.get(stage, 0.0) for stage in START_STAGES)


# --- running children ----------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    """This checkout first on the path; threads left at their defaults, as a user has them."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def run_child(argv: Sequence[str]) -> tuple[float, float | None]:
    """Run a child to completion: (its wall seconds, its own peak RSS in MiB or None)."""
    started = time.perf_counter()
    done = subprocess.run(list(argv), cwd=ROOT, env=child_env(), capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()] or ["no message"]
        raise RuntimeError(f"{' '.join(argv[3:])} exited with {done.returncode}: {lines[-1]}")
    reported = re.findall(r"^peak_kib (\d+)$", done.stdout, re.M)
    return seconds, int(reported[-1]) / 1024 if reported else None


def fresh_workspace(template: Path, folder: Path) -> Path:
    """A copy of the workspace `template`, files hard-linked (zoo replaces files, never edits
    them), without caches or lock files."""
    ignore = shutil.ignore_patterns(".cache", ".locks")
    shutil.copytree(template, folder, copy_function=os.link, ignore=ignore)
    return folder


def zoo_adapt(models_dir: Path, data: Path, options: Sequence[str], *, out: Path) -> Measured:
    """`zoo --models-dir W adapt ... --out OUT` in a child process, and what its run.json says."""
    argv = [sys.executable, "-m", "bench.scale", "--worker", "--models-dir", str(models_dir), *ADAPT, "--data", str(data), *options, "--out", str(out)]  # fmt: skip
    seconds, peak = run_child(argv)
    record = json.loads((out / "run.json").read_text())
    return Measured(seconds, peak, dict(record.get("timings", {})), record.get("strategy", ""))


def adapt_fresh(template: Path, data: Path, options: Sequence[str], *, work: Path) -> Measured:
    """One `zoo adapt` on a fresh workspace, removed afterwards."""
    with tempfile.TemporaryDirectory(dir=work) as scratch:
        models_dir = fresh_workspace(template, Path(scratch) / "models")
        return zoo_adapt(models_dir, data, options, out=Path(scratch) / "run")


def floor_seconds(data: Path, onnx_path: Path) -> float:
    seconds, _ = run_child([sys.executable, "-m", "bench.scale", "--floor", str(data), "--onnx", str(onnx_path)])  # fmt: skip
    return seconds


# --- the children's work -------------------------------------------------------------------------


def zoo_worker(argv: Sequence[str]) -> int:
    """The zoo command line, in this process (so that its peak RSS is this process's)."""
    import cli

    code = cli.main(list(argv), prog_name="zoo", standalone_mode=False)
    return code if isinstance(code, int) else 0


def image_paths(folder: Path) -> list[str]:
    """The images of a class-folder data set, as zoo lists them."""
    from pipeline.data.images import scan_class_folder, visible_dirs

    return [path for d in visible_dirs(folder) for path in scan_class_folder(d, [])]


def floor(folder: Path, onnx_path: Path, *, batch: int = FLOOR_BATCH) -> int:
    """The least work the images need: decode each at reduced scale, one onnxruntime pass."""
    import numpy as np
    import onnxruntime as ort

    from pipeline.data.images import open_for, preprocess_image
    from zoo.catalog import load_catalog

    preprocess = load_catalog().resolve(MODEL_NAME).preprocess
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    paths = image_paths(folder)
    for start in range(0, len(paths), batch):
        arrays = [preprocess_image(open_for(p, preprocess), preprocess) for p in paths[start : start + batch]]  # fmt: skip
        session.run(None, {input_name: np.stack(arrays)})
    return len(paths)


# --- the three parts -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PhoneResult:
    """Part (a): the runs of zoo and of the floor on the small and the large set of photos."""

    sizes: tuple[int, int]  # photos in the small and in the large set
    zoo: dict[int, list[Measured]]
    floor: dict[int, list[float]]
    megabytes: float  # mean JPEG size, for context

    def best(self, images: int) -> Measured:
        return min(self.zoo[images], key=lambda m: m.seconds)

    def marginal(self) -> tuple[float, float]:
        """Seconds per extra photo, best run of each: (zoo, floor)."""
        small, large = self.sizes
        zoo = (self.best(large).seconds - self.best(small).seconds) / (large - small)
        floor = (min(self.floor[large]) - min(self.floor[small])) / (large - small)
        return zoo, floor


def measure_phone(scale: Scale, *, source: Path, template: Path, work: Path) -> PhoneResult:
    large_count = scale.scale_phone_photos
    large = phone_photos(source, work / f"scale-phone-{large_count}", count=large_count)
    small = subset(large, work / f"scale-phone-{large_count // 2}", count=large_count // 2)
    onnx_path = template / MODEL_NAME / "model.onnx"
    zoo: dict[int, list[Measured]] = {}
    candidates: dict[str, Callable[[], float]] = {}
    for folder in (small, large):
        images = count_images(folder)
        zoo[images] = []

        def run_zoo(folder: Path = folder, images: int = images) -> float:
            zoo[images].append(adapt_fresh(template, folder, ["--strategy", "feature"], work=work))  # fmt: skip
            return zoo[images][-1].seconds

        candidates[f"zoo {images}"] = run_zoo
        candidates[f"floor {images}"] = lambda folder=folder: floor_seconds(folder, onnx_path)
    times = interleave(candidates, repetitions=scale.scale_repetitions)
    sizes = tuple(sorted(zoo))
    files = [Path(p) for p in image_paths(large)]
    megabytes = sum(p.stat().st_size for p in files) / len(files) / 1e6
    return PhoneResult(sizes, zoo, {n: times[f"floor {n}"] for n in sizes}, megabytes)  # type: ignore[arg-type]


def measure_growth(
    scale: Scale, *, source: Path, template: Path, work: Path, log: Callable[[str], None]
) -> list[tuple[str, int, Measured]]:
    """Part (b): (strategy, images, run) for every strategy at every size, sizes in order."""
    sizes = sorted(scale.scale_growth_sizes)
    largest = random_crops(source, work / f"scale-crops-{sizes[-1]}", count=sizes[-1])
    rows = []
    for images in sizes:
        folder = largest if images == sizes[-1] else subset(largest, work / f"scale-crops-{images}", count=images)  # fmt: skip
        for strategy, options in GROWTH_STRATEGIES.items():
            measured = adapt_fresh(template, folder, options, work=work)
            log(f"[bench] scale: {strategy} on {images} images: {measured.seconds:.0f} s")
            rows.append((strategy, images, measured))
    return rows


def measure_reuse(data: Path, *, template: Path, work: Path) -> list[tuple[str, Measured]]:
    """Part (c): the runs of REUSE_RUNS, in order, on one workspace that keeps its caches."""
    with tempfile.TemporaryDirectory(dir=work) as scratch:
        models_dir = fresh_workspace(template, Path(scratch) / "models")
        return [
            (label, zoo_adapt(models_dir, data, options, out=Path(scratch) / f"run{index}"))
            for index, (label, options) in enumerate(REUSE_RUNS.items())
        ]


# --- rendering -----------------------------------------------------------------------------------


def ratio_row(name: str, value: float, goal: float, *, at_most: bool, note: str = "") -> list[str]:
    """A row of a ratio table: the ratio, its goal and whether it is met."""
    sign = "≤" if at_most else "≥"
    verdict = goal_verdict(value, goal, higher_is_better=not at_most)
    return [name, f"{value:.2f}×", f"{sign} {goal:g}×{note}", verdict]


def phone_body(result: PhoneResult) -> list[str]:
    small, large = result.sizes
    zoo, floor_cost = result.marginal()
    low, high = result.best(small), result.best(large)
    stage_rows, photo_stages = [], 0.0
    for stage in STAGES:
        before, after = low.timings.get(stage, 0.0), high.timings.get(stage, 0.0)
        stage_rows.append([stage, before, after, 1000 * (after - before) / (large - small)])
        photo_stages += (after - before) / (large - small) if stage != "model" else 0.0
    ratios = [
        ratio_row(
            "marginal cost per photo, zoo ÷ floor", zoo / floor_cost, PHONE_GOAL, at_most=True
        ),  # fmt: skip
        ratio_row(
            "the same, zoo's stages but `model` (less noisy) ÷ floor",
            photo_stages / floor_cost,
            PHONE_GOAL,
            at_most=True,
        ),  # fmt: skip
    ]
    processes = [
        ["`zoo adapt --strategy feature`", low.seconds, high.seconds, 1000 * zoo],
        [
            "floor: draft decode + one onnxruntime pass",
            min(result.floor[small]),
            min(result.floor[large]),
            1000 * floor_cost,
        ],  # fmt: skip
    ]
    columns = [f"{small} photos s", f"{large} photos s", "marginal ms per photo"]
    return [
        "### (a) Phone photos",
        f"{large} JPEGs of {PHONE_SIZE[0]}×{PHONE_SIZE[1]} (quality 90, {result.megabytes:.2f} MB each "
        f"on average), made by upscaling {SOURCE} photos; the small set is the first {small} of "
        "them. zoo: `zoo adapt --strategy feature --seed 0` on a fresh workspace (empty caches); "
        "floor: the same photos decoded in JPEG draft mode and preprocessed one after another, then "
        f"the whole model once in onnxruntime, batch {FLOOR_BATCH}. Both whole processes, "
        f"interleaved, best of {len(result.floor[small])}. The marginal cost, (large − small) ÷ "
        f"{large - small}, leaves out what a process pays whatever the number of photos. Importing "
        "the model (`model`) does not depend on the photos but varies by seconds on a busy machine: "
        "the second ratio leaves it out.",
        markdown_table(["ratio", "value", "goal", "verdict"], ratios),
        markdown_table(["process", *columns], processes),
        "Where zoo's time goes (run.json `timings` of the best runs):",
        markdown_table(["stage", *columns], stage_rows),
    ]


def growth_body(rows: Sequence[tuple[str, int, Measured]]) -> list[str]:
    table, ratios = [], []
    for strategy in GROWTH_STRATEGIES:
        runs = [(images, m) for s, images, m in rows if s == strategy]
        previous: tuple[int, Measured] | None = None
        for images, m in runs:
            step = "–" if previous is None else 1000 * (m.seconds - previous[1].seconds) / (images - previous[0])  # fmt: skip
            table.append([strategy, images, m.seconds, 1000 * m.seconds / images, step, m.peak_mib or "–", m.setup, m.timings.get("train", 0.0)])  # fmt: skip
            previous = (images, m)
        (first, low), (last, high) = runs[0], runs[-1]
        if low.peak_mib and high.peak_mib:
            name = f"{strategy}: peak RSS, {last} ÷ {first} images"
            ratios.append(ratio_row(name, high.peak_mib / low.peak_mib, RSS_GOAL, at_most=True))
        per_image = (high.seconds / last) / (low.seconds / first)
        name = f"{strategy}: s per image, {last} ÷ {first} images"
        ratios.append(ratio_row(name, per_image, LINEAR_GOAL, at_most=True, note=" (linear)"))
        # The cost of the last images against the first, the start-up left out; over spans of
        # thousands of images (1k->2.5k differs by 30 s, within a busy machine's run-to-run noise).
        if len(runs) >= 3:
            (a, ma), (b, mb) = runs[0], runs[-2]
            (c, mc), (d, md) = runs[-2], runs[-1]
            steps = ((md.seconds - mc.seconds) / (d - c)) / ((mb.seconds - ma.seconds) / (b - a))
            name = f"{strategy}: marginal s per image, {c}→{d} ÷ {a}→{b}"
            ratios.append(ratio_row(name, steps, LINEAR_GOAL, at_most=True, note=" (linear)"))
    finetune = " ".join(GROWTH_STRATEGIES["finetune"])
    columns = ["strategy", "images", "wall s", "ms per image", "marginal ms per image", "peak RSS MiB", "set-up s", "train s"]  # fmt: skip
    return [
        "### (b) Cost growth",
        f"Random 256×256 crops of {SOURCE} photos (JPEG, class folders, seed 0); every smaller set is "
        f"the first images of the largest. `zoo adapt --strategy feature` and `zoo adapt {finetune}`, "
        "each a fresh process on a fresh workspace; time is the whole process, peak RSS its VmHWM. A "
        "process pays a fixed start-up (imports, the model), so small sets cost more per image; "
        "the marginal cost (from the size before) leaves it out.",
        markdown_table(["ratio", "value", "goal", "verdict"], ratios),
        markdown_table(columns, table),
    ]


def reuse_body(runs: Sequence[tuple[str, Measured]], *, images: int) -> list[str]:
    first = runs[0][1]
    table = [
        [
            label,
            m.strategy,
            *(m.timings.get(s, 0.0) for s in STAGES),
            m.setup,
            m.seconds - sum(m.timings.values()),
            m.seconds,
        ]  # fmt: skip
        for label, m in runs
    ]
    ratios, notes = [], []
    for label, m in runs[1:]:
        speedup = first.setup / max(m.setup, 1e-9)
        ratios.append(ratio_row(f"set-up, run 1 ÷ {label}", speedup, REUSE_GOAL, at_most=False))
        with_imports = (first.setup + first.startup) / max(m.setup + m.startup, 1e-9)
        ratios.append([f"set-up with `imports` (context), run 1 ÷ {label}", f"{with_imports:.2f}×", "", ""])  # fmt: skip
        cached = first.timings.get("cache", 0.0) / max(m.timings.get("cache", 0.0), 0.01)
        ratios.append([f"`cache` stage alone (context), run 1 ÷ {label}", f"{cached:.1f}×", "", ""])  # fmt: skip
        stage = max(SETUP_STAGES, key=lambda s: m.timings.get(s, 0.0))
        notes.append(
            f"{label.split('.')[0]}: `{stage}` {m.timings.get(stage, 0.0):.2f} s of {m.setup:.2f} s"
        )
    return [
        "### (c) Reuse",
        f"`zoo adapt` runs one after another on one workspace and the same {images} crops of "
        "(b), the first with an empty cache, a later one with another head. Set-up = the run.json "
        "`timings` of data (scan, check images) + model (import: normalise, convert, check "
        "against onnxruntime; a checked import is cached by the file's sha256) + choose (auto's "
        "measurements) + cache (features or frozen prefix). `imports` (loading torch's and "
        "onnx2torch's modules, which no cache can save a new process) and the end (writing the "
        "run) fall outside set-up; the context row counts `imports` in.",
        markdown_table(["ratio", "value", "goal", "verdict"], ratios),
        markdown_table(
            ["run", "trained", *STAGES, "set-up s", "outside the stages s", "wall s"], table
        ),  # fmt: skip
        "The largest set-up stage of each later run: " + "; ".join(notes) + ".",
    ]


def absent(source: Path, key: str, title: str, scale: Scale) -> Section:
    """The section of a benchmark whose real photos are not beside the repository."""
    why = f"Not run: {source} is absent (the real photos ship beside the repository, not in it)."
    return Section(key, title, [why], command=scale.command(key))


def model_template(work: Path) -> Path:
    """A workspace holding the bundled model, made once under `work` and copied by each run."""
    from zoo.cache import fetch
    from zoo.catalog import load_catalog

    template = work / "scale-models"
    if not (template / MODEL_NAME / "model.onnx").exists():
        fetch(MODEL_NAME, models_dir=template, catalog=load_catalog(), progress=False)
    return template


def run(scale: Scale, *, work: Path, log: Callable[[str], None] = print) -> Section:
    """All three parts on one workspace template; a section that says so without flowers5."""
    source = SHARED_DIR / "datasets" / SOURCE
    if not source.is_dir():
        return absent(source, KEY, TITLE, scale)
    template = model_template(work)
    phone = measure_phone(scale, source=source, template=template, work=work)
    log(f"[bench] scale: phone photos {phone.sizes}: zoo ÷ floor {phone.marginal()[0] / phone.marginal()[1]:.2f}×")  # fmt: skip
    growth = measure_growth(scale, source=source, template=template, work=work, log=log)
    smallest = min(scale.scale_growth_sizes)
    reuse = measure_reuse(work / f"scale-crops-{smallest}", template=template, work=work)
    body = [
        f"Bundled {MODEL_NAME}, its own preprocessing (224 px), class folders of photos made from "
        f"{SOURCE}. Each `zoo adapt` is one whole process, like a user's.",
        *phone_body(phone),
        *growth_body(growth),
        *reuse_body(reuse, images=smallest),
    ]
    return Section(KEY, TITLE, body, command=scale.command(KEY))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale")
    parser.add_argument("--worker", nargs=argparse.REMAINDER, help="zoo's arguments, run here")
    parser.add_argument("--floor", type=Path, help="a class-folder data set")
    parser.add_argument("--onnx", type=Path, help="the model the floor runs")
    args = parser.parse_args(argv)
    if args.worker is not None:
        code = zoo_worker(args.worker)
    elif args.floor is not None and args.onnx is not None:
        print(f"floor_images {floor(args.floor, args.onnx)}")
        code = 0
    else:
        parser.error("pass --worker ZOO-ARGS... or --floor DIR --onnx MODEL")
    peak = own_peak_kib()
    if peak is not None:
        print(f"peak_kib {peak}")
    return code


if __name__ == "__main__":
    sys.exit(main())
