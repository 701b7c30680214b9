"""Benchmark 11: the data check (`zoo check`) on real photos.

    python -m bench.data_check                     # every part, printed as the section's markdown

(a) Duplicates: flowers5 given as train/ + test/ (80/20 per class) with 20 exact and 20 augmented
    copies (flip, crop, colour, JPEG re-encode) of training images planted in test/: how many of
    the 40 are found, and how many other pairs are reported that are not among flowers5's own
    near duplicates (FLOWERS5_OWN, found by inspection); then the same images as class folders:
    does any duplicate group span two parts of the split zoo makes?
(b) Label errors: 5% of the training labels flipped at random: the share of them among the top
    2k suspects (k flipped).
(c) Balance: one class cut to 10% of its training images; macro-F1 of `--strategy feature` with
    the default balancing against `--balance none`.
(d) Time: `zoo check` on 10,000 photos (bench/scale_data.py's crops) with a warm feature cache,
    against the cold `zoo adapt --strategy feature` on the same images that warmed it.
"""

from __future__ import annotations

import io
import random
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.common import MODEL_NAME, Scale, Section, goal_verdict, markdown_table
from bench.scale import SHARED_DIR, absent, fresh_workspace, model_template, run_child
from bench.scale_data import class_sources, random_crops

KEY = "check"
TITLE = "11. Data check: duplicates, label errors, class balance, time"
SOURCE = "flowers5"
SEEDS = (0, 1, 2)
FOUND_GOAL, FALSE_GOAL = 38, 2  # of 40 planted; other pairs reported
LABEL_GOAL = 0.70  # share of the flipped labels among the top 2k suspects
BALANCE_GOAL = 0.03  # macro-F1 points of default balancing over none
TIME_GOAL = 0.10  # zoo check (warm) ÷ the cold feature run
TIME_IMAGES = 10_000
# flowers5's own near duplicates (burst shots and re-edits of one photo), found by inspection.
FLOWERS5_OWN = [
    ("7630517248_98fb8bee1f_n.jpg", "9204730092_a7f2182347.jpg"),
    ("6606809995_edee55b770_m.jpg", "6606813305_c992231d29_m.jpg"),
    ("6495554833_86eb8faa8e_n.jpg", "6495559397_61d01c0c57.jpg"),
    ("6606820461_952c450f90_n.jpg", "6606823367_e89dc52a95_n.jpg"),
    ("8713394070_b24561b0a9.jpg", "8713397358_0505cc0176_n.jpg"),
    ("8689302100_be76a16ccc_n.jpg", "8689302980_9bd2f7b9fe_n.jpg"),
    ("5979111199_495884b578_n.jpg", "5979111555_61b400c070_n.jpg"),
]


@dataclass(frozen=True)
class Planted:
    """A copy put into test/, the training image it copies, and how ("exact" or "augmented")."""

    copy: str
    original: str
    kind: str


@dataclass(frozen=True)
class PairScore:
    found: int  # planted pairs reported
    planted: int
    false: int  # reported pairs neither planted nor flowers5's own
    false_pairs: list[tuple[str, str]]


def augment(img: object, rng: random.Random) -> bytes:
    """A copy as data sets make them: flipped half the time, cropped to 85-95% per side,
    brightness and saturation x0.85-1.15, JPEG quality 75-90."""
    from PIL import ImageEnhance, ImageOps

    img = img.convert("RGB")
    if rng.random() < 0.5:
        img = ImageOps.mirror(img)
    width, height = img.size
    share = rng.uniform(0.85, 0.95)
    crop_w, crop_h = round(width * share), round(height * share)
    left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
    img = img.crop((left, top, left + crop_w, top + crop_h))
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.85, 1.15))
    img = ImageEnhance.Color(img).enhance(rng.uniform(0.85, 1.15))
    encoded = io.BytesIO()
    img.save(encoded, "JPEG", quality=rng.randint(75, 90))
    return encoded.getvalue()


def train_test(source: Path, target: Path, *, seed: int, train_share: float = 0.8) -> list[Path]:
    """`source`'s class folders as target/train/ and target/test/ (per class, seeded); the
    training files."""
    rng = random.Random(seed)
    shutil.rmtree(target, ignore_errors=True)
    train = []
    for name, files in class_sources(source).items():
        files = list(files)
        rng.shuffle(files)
        cut = round(len(files) * train_share)
        for part, chosen in (("train", files[:cut]), ("test", files[cut:])):
            (target / part / name).mkdir(parents=True)
            for path in chosen:
                shutil.copy2(path, target / part / name / path.name)
        train += [target / "train" / name / path.name for path in files[:cut]]
    return train


def plant_duplicates(
    source: Path, target: Path, *, seed: int, exact: int = 20, near: int = 20
) -> list[Planted]:
    """flowers5 as train/ + test/, with `exact` and `near` copies of training images in test/."""
    from PIL import Image

    rng = random.Random(seed)
    train = train_test(source, target, seed=seed)
    planted = []
    for index, original in enumerate(rng.sample(train, exact + near)):
        kind = "exact" if index < exact else "augmented"
        copy = target / "test" / original.parent.name / f"planted-{kind}-{index:02d}.jpg"
        if kind == "exact":
            shutil.copyfile(original, copy)
        else:
            with Image.open(original) as img:
                copy.write_bytes(augment(img, rng))
        planted.append(Planted(str(copy), str(original), kind))
    return planted


def score_pairs(
    twins: Sequence[object], planted: Sequence[Planted], own: Sequence[tuple[str, str]]
) -> PairScore:
    """Planted pairs found, and reported pairs explained by neither the planting nor `own`."""
    from pipeline.train.twins import groups_of

    refs = sorted(
        {r for t in twins for r in (t.a, t.b)} | {r for p in planted for r in (p.copy, p.original)}
    )
    index = {ref: i for i, ref in enumerate(refs)}
    by_name: dict[str, list[int]] = {}
    for ref, i in index.items():
        by_name.setdefault(Path(ref).name, []).append(i)
    links = [(index[p.copy], index[p.original]) for p in planted]
    links += [(a, b) for x, y in own for a in by_name.get(x, []) for b in by_name.get(y, [])]
    group = groups_of(len(refs), links)
    reported = {frozenset((t.a, t.b)) for t in twins}
    found = sum(frozenset((p.copy, p.original)) in reported for p in planted)
    false = [
        (Path(t.a).name, Path(t.b).name) for t in twins if group[index[t.a]] != group[index[t.b]]
    ]
    return PairScore(found, len(planted), len(false), false)


def check(data: Path, models_dir: Path, **options: object) -> object:
    import zoo

    return zoo.check(data, models_dir=models_dir, **options)


def measure_duplicates(
    source: Path, work: Path, models_dir: Path, seeds: Sequence[int]
) -> list[list[object]]:
    """(a): one row per seed: found, false pairs, and groups across zoo's own split."""
    from pipeline.data.sources import load_source
    from pipeline.train.grouping import split_grouper
    from zoo.catalog import load_catalog
    from zoo.workspace import Workspace

    rows = []
    for seed in seeds:
        target = work / f"check-planted-{seed}"
        planted = plant_duplicates(source, target, seed=seed)
        score = score_pairs(check(target, models_dir).twins, planted, FLOWERS5_OWN)
        # The same images as one folder per class: zoo makes the split and keeps groups whole.
        folders = work / f"check-folders-{seed}"
        shutil.rmtree(folders, ignore_errors=True)
        for part in ("train", "test"):
            shutil.copytree(target / part, folders, dirs_exist_ok=True)
        grouper = split_grouper(Workspace.at(models_dir, load_catalog()), lambda _line: None)
        split = load_source(folders, seed=seed, group_by=grouper)
        part = {s.ref: name for name in ("train", "val", "test") for s in getattr(split, name)}
        spanning = sum(len({part[r] for r in group}) > 1 for group in grouper.found)
        rows.append(
            [seed, f"{score.found}/{score.planted}", score.false, len(grouper.found), spanning]
        )
    return rows


def flip_labels(source: Path, target: Path, *, seed: int, share: float = 0.05) -> list[str]:
    """flowers5 as train/ + test/ with `share` of the training images moved to another class."""
    rng = random.Random(seed)
    train = train_test(source, target, seed=seed)
    classes = sorted({p.parent.name for p in train})
    flipped = []
    for path in rng.sample(train, round(share * len(train))):
        wrong = rng.choice([c for c in classes if c != path.parent.name])
        moved = target / "train" / wrong / path.name
        shutil.move(path, moved)
        flipped.append(str(moved))
    return flipped


def measure_labels(
    source: Path, work: Path, models_dir: Path, seeds: Sequence[int]
) -> list[list[object]]:
    """(b): one row per seed: flipped, flagged, share of the flipped among the top 2k."""
    rows = []
    for seed in seeds:
        target = work / f"check-labels-{seed}"
        flipped = set(flip_labels(source, target, seed=seed))
        found = check(target, models_dir, seed=seed)
        top = [s.ref for s in found.suspects[: 2 * len(flipped)]]
        rows.append([seed, len(flipped), found.flagged, len(flipped & set(top)) / len(flipped)])
    return rows


def cut_class(source: Path, target: Path, *, seed: int, keep: float = 0.1) -> str:
    """flowers5 as train/ val/ test/ (60/20/20 per class, seeded), one class's train/ cut to
    `keep` of its images; the class cut."""
    rng = random.Random(seed)
    shutil.rmtree(target, ignore_errors=True)
    classes = class_sources(source)
    small = rng.choice(sorted(classes))
    for name, files in classes.items():
        files = list(files)
        rng.shuffle(files)
        n_val, n_test = round(0.2 * len(files)), round(0.2 * len(files))
        parts = {
            "test": files[:n_test],
            "val": files[n_test : n_test + n_val],
            "train": files[n_test + n_val :],
        }
        if name == small:
            parts["train"] = parts["train"][: max(1, round(keep * len(parts["train"])))]
        for part, chosen in parts.items():
            (target / part / name).mkdir(parents=True)
            for path in chosen:
                shutil.copy2(path, target / part / name / path.name)
    return small


def measure_balance(
    source: Path, work: Path, models_dir: Path, seeds: Sequence[int]
) -> list[list[object]]:
    """(c): one row per seed: the class cut, macro-F1 with default balancing and with none."""
    import zoo

    rows = []
    for seed in seeds:
        target = work / f"check-balance-{seed}"
        small = cut_class(source, target, seed=seed)
        scores = []
        for balance in (None, "none"):
            options = {"balance": balance} if balance else {}
            run = zoo.adapt(MODEL_NAME, data=target, strategy="feature", seed=seed, models_dir=models_dir, out=work / f"check-balance-{seed}-{balance}", **options)  # fmt: skip
            scores.append(run.summary.metrics.macro_f1)
            shutil.rmtree(work / f"check-balance-{seed}-{balance}", ignore_errors=True)
        rows.append([seed, small, scores[0], scores[1], scores[0] - scores[1]])
    return rows


def measure_time(source: Path, work: Path, template: Path, *, count: int) -> tuple[float, float]:
    """(d): seconds of the cold `zoo adapt --strategy feature` on `count` crops, and of the
    `zoo check` after it (warm cache), each one whole process."""
    data = random_crops(source, work / f"scale-crops-{count}", count=count)
    with tempfile.TemporaryDirectory(dir=work) as scratch:
        models_dir = fresh_workspace(template, Path(scratch) / "models")
        worker = [sys.executable, "-m", "bench.scale", "--worker", "--models-dir", str(models_dir)]
        cold, _ = run_child([*worker, "adapt", MODEL_NAME, "--data", str(data), "--strategy", "feature", "--out", str(Path(scratch) / "run")])  # fmt: skip
        warm, _ = run_child([*worker, "check", "--data", str(data)])
    return cold, warm


def run(scale: Scale, *, work: Path, log: Callable[[str], None] = print) -> Section:
    """Every part; a section that says so without flowers5."""
    source = SHARED_DIR / "datasets" / SOURCE
    if not source.is_dir():
        return absent(source, KEY, TITLE, scale)
    template = model_template(work)
    seeds = SEEDS if scale.name == "full" else SEEDS[:1]
    with tempfile.TemporaryDirectory(dir=work) as scratch:
        models_dir = fresh_workspace(template, Path(scratch) / "models")
        duplicates = measure_duplicates(source, work, models_dir, seeds)
        log(f"[bench] check: duplicates {duplicates}")
        labels = measure_labels(source, work, models_dir, seeds)
        log(f"[bench] check: labels {labels}")
        balance = measure_balance(source, work, models_dir, seeds)
        log(f"[bench] check: balance {balance}")
    count = TIME_IMAGES if scale.name == "full" else 1_000
    cold, warm = measure_time(source, work, template, count=count)
    log(f"[bench] check: {count} images, cold feature run {cold:.0f} s, warm check {warm:.0f} s")
    body = _body(duplicates, labels, balance, (count, cold, warm))
    return Section(KEY, TITLE, body, command=scale.command(KEY))


def _body(
    duplicates: list[list[object]],
    labels: list[list[object]],
    balance: list[list[object]],
    timing: tuple[int, float, float],
) -> list[str]:
    count, cold, warm = timing
    label_mean = statistics.mean(row[3] for row in labels)
    balance_mean = statistics.mean(row[4] for row in balance)
    found = min(int(str(row[1]).split("/")[0]) for row in duplicates)
    false = max(int(row[2]) for row in duplicates)
    return [
        f"Bundled {MODEL_NAME}'s frozen features, {SOURCE} ({len(FLOWERS5_OWN)} near-duplicate pairs of its own, "
        "burst shots and re-edits, found by inspection and not counted as false). Seeds draw the split, "
        "the planted copies, the flipped labels and the class cut.",
        "(a) Duplicates: 20 exact and 20 augmented copies (flip, crop 85-95%, brightness and "
        "saturation ±15%, JPEG q75-90) of training images planted in test/; then the same images as "
        f"class folders, split by zoo. Goal: ≥ {FOUND_GOAL} of 40 found, ≤ {FALSE_GOAL} false pairs, no group across parts: "
        f"{'met' if found >= FOUND_GOAL and false <= FALSE_GOAL and all(r[4] == 0 for r in duplicates) else 'missed'}.",
        markdown_table(
            ["seed", "found", "false pairs", "groups (class folders)", "groups across parts"],
            duplicates,
        ),
        f"(b) Label errors, 5% of the training labels flipped: flipped among the top 2k suspects, mean {label_mean:.1%} "
        f"(goal ≥ {LABEL_GOAL:.0%}: {goal_verdict(label_mean, LABEL_GOAL)}).",
        markdown_table(["seed", "flipped (k)", "flagged", "in top 2k"], labels),
        f"(c) Balance, one class cut to 10% of its training images, `--strategy feature`: macro-F1 "
        f"default minus `--balance none`, mean {100 * balance_mean:+.1f} points (goal ≥ +3: "
        f"{goal_verdict(balance_mean, BALANCE_GOAL)}).",
        markdown_table(
            ["seed", "class cut", "macro-F1 default", "macro-F1 --balance none", "difference"],
            balance,
        ),
        f"(d) Time on {count:,} photos (256 px crops, bench/scale_data.py): `zoo check` with the cache "
        f"warm {warm:.0f} s, the cold `zoo adapt --strategy feature` that warmed it {cold:.0f} s: "
        f"{warm / cold:.1%} (goal < {TIME_GOAL:.0%}: {goal_verdict(warm / cold, TIME_GOAL, higher_is_better=False)}). "
        "Both are whole processes, imports included.",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    from bench.common import FULL

    with tempfile.TemporaryDirectory() as work:
        section = run(FULL, work=Path(work))
    print(section.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
