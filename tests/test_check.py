"""The data check (`zoo check`, and its start in `zoo adapt`): duplicates, label suspects, balance.

Small fixtures of their own: generated scenes (random shapes, so that copies are copies and other
images are not), builtin:digits, and the bundled EfficientNet-Lite0. The flowers5 proof at the
end skips cleanly where ../shared is absent.
"""

from __future__ import annotations

import dataclasses
import io
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from image_builders import write_truncated_jpeg, write_zero_bytes
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from cli import main
from pipeline.core.samples import DataSplit, Sample
from pipeline.data.check import Balance, DataCheck, Twin
from pipeline.data.facts import THUMB_PX, file_facts
from pipeline.data.split import stratified_split
from pipeline.train import twins
from pipeline.train.balance import class_weights, plan_balance


def scene(seed: int, size: tuple[int, int] = (176, 144)) -> Image.Image:
    """A photo-like picture: a textured ground and random shapes, different for every seed."""
    rng = np.random.default_rng(seed)
    ground = rng.integers(0, 256, 3)
    noise = rng.normal(0, 18, (size[1], size[0], 3))
    pixels = np.clip(ground + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(14):
        x0, y0 = int(rng.integers(0, size[0] - 20)), int(rng.integers(0, size[1] - 20))
        box = (x0, y0, x0 + int(rng.integers(12, 70)), y0 + int(rng.integers(12, 70)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return img


def augmented(img: Image.Image, seed: int) -> Image.Image:
    """Flip, crop to 88%, brighter, JPEG re-encoded: a copy as data sets make them."""
    rng = random.Random(seed)
    img = ImageOps.mirror(img)
    w, h = img.size
    left, top = rng.randint(0, w // 9), rng.randint(0, h // 9)
    img = img.crop((left, top, left + int(w * 0.88), top + int(h * 0.88)))
    img = ImageEnhance.Brightness(img).enhance(1.12)
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=80)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def write_scenes(root: Path, counts: dict[str, int], *, first_seed: int = 0) -> list[Path]:
    written = []
    for c, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            path = root / name / f"{name}-{i:02d}.png"
            scene(first_seed + 100 * c + i).save(path)
            written.append(path)
    return written


# ----------------------------------------------------------------------------- without a model


def test_duplicate_groups_stay_in_one_part_and_singletons_change_nothing() -> None:
    labels = [i % 3 for i in range(60)]
    plain = stratified_split(labels, seed=4, val_fraction=0.2, test_fraction=0.2)
    singletons = stratified_split(
        labels, seed=4, val_fraction=0.2, test_fraction=0.2, groups=list(range(100, 160))
    )
    assert plain == singletons
    groups = [i // 4 for i in range(60)]  # 15 groups of 4, each mixing classes
    parts = stratified_split(labels, seed=4, val_fraction=0.2, test_fraction=0.2, groups=groups)
    part_of = {i: p for p, members in enumerate(parts) for i in members}
    assert sorted(part_of) == list(range(60))
    for group in set(groups):
        assert len({part_of[i] for i in range(60) if groups[i] == group}) == 1
    assert parts[1] and parts[2]  # groups still spread over train, val and test
    giant = [0 if i < 30 else i for i in range(60)]  # half the images one group: it trains
    train, val, test = stratified_split(
        [0] * 60, seed=1, val_fraction=0.2, test_fraction=0.2, groups=giant
    )
    assert set(range(30)) <= set(train) and len(test) == len(val) == 12


def test_file_facts_hash_size_and_colour(tmp_path: Path) -> None:
    colour = tmp_path / "colour.png"
    scene(1).save(colour)
    shutil.copyfile(colour, tmp_path / "copy.png")
    scene(2).convert("L").convert("RGB").save(tmp_path / "grey.jpg", quality=85)
    scene(3, size=(40, 30)).save(tmp_path / "tiny.png")
    refs = [str(tmp_path / n) for n in ("colour.png", "copy.png", "grey.jpg", "tiny.png")]
    facts = file_facts(refs, cache_dir=tmp_path / "cache")
    assert facts.digest(0) == facts.digest(1) != facts.digest(2)
    assert facts.grey.tolist() == [False, False, True, False]
    assert facts.short_side.tolist() == [144, 144, 144, 30]
    assert facts.thumbs.shape == (4, THUMB_PX, THUMB_PX)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1
    again = file_facts(refs, cache_dir=tmp_path / "cache")
    assert np.array_equal(again.table, facts.table)


def test_pixel_agreement_tells_a_copy_from_another_picture() -> None:
    original, other = scene(10), scene(11)
    thumbs = np.stack(
        [
            np.asarray(img.convert("L").resize((THUMB_PX, THUMB_PX), Image.Resampling.BILINEAR))
            for img in (original, augmented(original, 0), other)
        ]
    )
    copy_score, other_score = twins.pixel_agreement(thumbs, [(0, 1), (0, 2)])
    assert copy_score > 0.9
    assert other_score < 0.6
    assert twins.groups_of(5, [(3, 1), (1, 4)]) == [0, 1, 2, 1, 1]


def test_label_ranking_puts_flipped_labels_first() -> None:
    from pipeline.train.label_issues import rank_labels

    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (5, 64))
    labels = np.repeat(np.arange(5), 60)
    features = centres[labels] + rng.normal(0, 0.9, (300, 64))
    flipped = rng.choice(300, 15, replace=False)
    given = labels.copy()
    given[flipped] = (given[flipped] + rng.integers(1, 5, 15)) % 5
    ranking = rank_labels(features.astype(np.float32), given, classes=5)
    found = len(set(ranking.order[:30].tolist()) & set(flipped.tolist()))
    assert found >= 0.7 * 15
    assert ranking.flagged[flipped].mean() > ranking.flagged.mean()


def _balance(counts: dict[str, int]) -> Balance:
    split = DataSplit(
        list(counts),
        [Sample(f"{n}{i}", c) for c, (n, k) in enumerate(counts.items()) for i in range(k)],
        [],
        [],
        "x",
    )
    from pipeline.data.check import class_balance

    return class_balance(split)


def test_balance_by_default_from_three_times() -> None:
    assert plan_balance(None, _balance({"a": 30, "b": 10})).mode == "weights"
    assert plan_balance(None, _balance({"a": 29, "b": 10})).mode == "none"
    assert plan_balance("none", _balance({"a": 30, "b": 1})).class_weights is None
    assert plan_balance("sampler", _balance({"a": 5, "b": 5})).mode == "sampler"
    spread = plan_balance("sampler", _balance({"a": 30, "b": 3}), workers=2)
    assert spread.mode == "weights" and "instead of a sampler" in spread.reason
    weights = class_weights([30, 10, 0])
    assert weights[2] == 0 and np.isclose(30 * weights[0] + 10 * weights[1], 40)
    assert "--balance none turns it off" in plan_balance(None, _balance({"a": 9, "b": 3})).reason


def test_balanced_solved_head_raises_the_small_class_recall() -> None:
    import torch

    from pipeline.train.solve import FeatureSet, fit_linear

    rng = np.random.default_rng(1)

    def drawn(counts: list[int]) -> FeatureSet:
        labels = np.repeat([0, 1], counts)
        features = rng.normal(0, 1, (len(labels), 8)) + labels[:, None] * 0.5
        return FeatureSet(torch.tensor(features, dtype=torch.float32), torch.tensor(labels))

    train, val, test = drawn([300, 20]), drawn([60, 60]), drawn([200, 200])
    weighted = dataclasses.replace(train, class_weights=torch.tensor(class_weights([300, 20])))
    recalls = []
    for chosen in (train, weighted):
        linear = torch.nn.Linear(8, 2)
        fit_linear(linear, train=chosen, val=val, max_evaluations=200, log=lambda _line: None)
        predicted = linear(test.features).argmax(1)
        recalls.append(float((predicted[test.labels == 1] == 1).float().mean()))
    assert recalls[1] > recalls[0] + 0.2


def test_sampler_draws_each_class_about_equally() -> None:
    import torch
    from torch.utils.data import TensorDataset

    from pipeline.core.distributed import SINGLE
    from pipeline.train.loaders import _TrainLoader, drawn_by_class
    from pipeline.train.loop import TrainConfig

    labels = [0] * 90 + [1] * 10
    dataset = TensorDataset(torch.zeros(100, 2), torch.tensor(labels))
    train = [Sample(str(i), y) for i, y in enumerate(labels)]
    config = TrainConfig(balance="sampler", class_weights=class_weights([90, 10]))
    make = drawn_by_class(_TrainLoader(dataset, SINGLE, 0), train, config)
    drawn = torch.cat([y for _, y in make(50)] + [y for _, y in make(50)])
    assert 0.35 < float(drawn.float().mean()) < 0.65
    unbalanced = drawn_by_class(_TrainLoader(dataset, SINGLE, 0), train, TrainConfig())
    assert float(torch.cat([y for _, y in unbalanced(50)]).float().mean()) == pytest.approx(0.1)
    assert TrainConfig(balance="weights", class_weights=(1.0, 2.0)).loss_weights("cpu") is not None
    assert config.loss_weights("cpu") is None


def _two_classes(**fields: object) -> DataCheck:
    """A check record of a source with classes a and b; `fields` give the rest."""
    return DataCheck(source="s", model="m", class_names=["a", "b"], **fields)  # type: ignore[arg-type]


def test_check_record_round_trips() -> None:
    check = _two_classes(
        images=3,
        split_fixed=True,
        balance=Balance({"a": 2, "b": 1}, "b", "a", 2.0),
        twins=[
            Twin("x", "y", "train", "test", "near", 3.2),
            Twin("z", "w", "val", "test", "exact"),
        ],
    )
    again = DataCheck.from_dict(json.loads(json.dumps(check.to_dict())))
    assert again == check
    assert again.cross_split() == {"train-test": 1, "val-test": 1}
    assert again.twinned("test") == {"y", "w"}
    assert again.twinned("test", ("train",)) == {"y"}


def test_notes_name_images_with_their_class_folder_and_say_when_none_is_suspect() -> None:
    from pipeline.data.check import Suspect
    from pipeline.train.check import notes

    check = _two_classes(
        images=4,
        split_fixed=False,
        balance=Balance({"a": 2, "b": 2}, "b", "a", 1.0),
        suspects=[Suspect("/d/a/1.jpg", "train", "a", "b", 0.4)],
        small=["/d/a/1.jpg", "/d/b/1.jpg"],
    )
    assert any(line.endswith("a/1.jpg, b/1.jpg") for line in notes(check))  # not "1.jpg, 1.jpg"
    assert "likely label errors: none flagged" in notes(check)
    flagged = notes(dataclasses.replace(check, flagged=1))
    assert "likely label errors: 1 flagged; most likely: a/1.jpg (a → b?)" in flagged


# ----------------------------------------------------------------------------- with the bundled model


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, bundled_workspace: Path) -> Path:
    """A copy of the shared workspace with efficientnet-lite0 (the check writes its caches)."""
    target = tmp_path_factory.mktemp("check") / "models"
    shutil.copytree(bundled_workspace, target)
    return target


def _check(workspace: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["--models-dir", str(workspace), "check", *args])
    return result.exit_code, result.output


@pytest.mark.slow
def test_zoo_check_finds_planted_copies_across_a_given_split(
    tmp_path: Path, workspace: Path
) -> None:
    data = tmp_path / "data"
    originals = write_scenes(data / "train", {"a": 8, "b": 8, "c": 8})
    write_scenes(data / "test", {"a": 2, "b": 2, "c": 2}, first_seed=5000)
    shutil.copyfile(originals[3], data / "test" / "a" / "exact.png")
    augmented(Image.open(originals[12]).convert("RGB"), 1).save(data / "test" / "b" / "aug.jpg")
    code, output = _check(workspace, "--data", str(data), "--json")
    assert code == 0, output
    found = DataCheck.from_dict(json.loads(output[output.index("{") :]))
    pairs = {(Path(t.a).name, Path(t.b).name): t for t in found.twins}
    assert {frozenset(p) for p in pairs} >= {
        frozenset({originals[3].name, "exact.png"}),
        frozenset({originals[12].name, "aug.jpg"}),
    }
    assert len(pairs) <= 3  # at most one look-alike among 32 generated scenes
    assert found.split_fixed and found.twinned("test") >= {
        str(data / "test" / "a" / "exact.png"),
        str(data / "test" / "b" / "aug.jpg"),
    }
    assert any(line.startswith("warning: 2 of the test images") for line in found.notes)


@pytest.mark.slow
def test_zoo_makes_splits_that_keep_copies_together(tmp_path: Path, workspace: Path) -> None:
    from pipeline.data.sources import load_source
    from pipeline.train.grouping import split_grouper
    from zoo.catalog import load_catalog
    from zoo.workspace import Workspace

    data = tmp_path / "data"
    originals = write_scenes(data, {"a": 10, "b": 10})
    for k, source in enumerate(originals[::4]):
        augmented(Image.open(source).convert("RGB"), k).save(source.with_name(f"copy-{k}.jpg"))
        shutil.copyfile(source, source.with_name(f"same-{k}.png"))
    grouper = split_grouper(Workspace.at(workspace, load_catalog()), lambda _line: None)
    for seed in range(3):
        split = load_source(data, seed=seed, group_by=grouper)
        part = {s.ref: name for name in ("train", "val", "test") for s in getattr(split, name)}
        assert len(grouper.found) == len(originals[::4])
        for group in grouper.found:
            assert len({part[ref] for ref in group}) == 1, group


def _layouts(root: Path) -> dict[str, tuple[str, bool]]:
    """Name -> (data argument, whether the check has results rather than one line of refusal)."""
    write_scenes(root / "folders", {"a": 5, "b": 5, "c": 2})
    write_scenes(root / "split" / "train", {"a": 4, "b": 4})
    write_scenes(root / "split" / "test", {"a": 2, "b": 2}, first_seed=900)
    for part, seed in (("train", 0), ("val", 300), ("test", 600)):
        write_scenes(root / "three" / part, {"a": 3, "b": 3}, first_seed=seed)
    write_scenes(root / "single", {"only": 5})
    write_scenes(root / "emptyclass", {"a": 3, "b": 3})
    (root / "emptyclass" / "c").mkdir()
    write_scenes(root / "bad", {"a": 4, "b": 4})
    write_zero_bytes(root / "bad" / "a" / "zero.png")
    write_truncated_jpeg(root / "bad" / "b" / "cut.jpg")
    for name in ("a", "b"):
        (root / "allbad" / name).mkdir(parents=True, exist_ok=True)
        write_zero_bytes(root / "allbad" / name / "zero.png")
    rows = [
        f"{p.relative_to(root)},{p.parent.name}" for p in sorted((root / "folders").rglob("*.png"))
    ]
    (root / "plain.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    parts = ["test" if i % 4 == 0 else "train" for i in range(len(rows))]
    (root / "split.csv").write_text(
        "path,label,split\n" + "\n".join(f"{r},{p}" for r, p in zip(rows, parts, strict=True))
    )
    (root / "empty").mkdir()
    names = ["folders", "split", "three", "bad", "plain.csv", "split.csv"]
    refused = ["single", "emptyclass", "allbad", "empty", "missing"]
    return {
        **{n: (str(root / n), True) for n in names},
        **{n: (str(root / n), False) for n in refused},
        "digits": ("builtin:digits", True),
    }


@pytest.mark.slow
def test_zoo_check_takes_every_layout_or_says_what_to_do(tmp_path: Path, workspace: Path) -> None:
    for name, (data, works) in _layouts(tmp_path).items():
        code, output = _check(workspace, "--data", data)
        assert "internal error" not in output and "Traceback" not in output, (name, output)
        if works:
            assert code == 0 and "images," in output.splitlines()[-1], (name, output)
        else:
            errors = [line for line in output.splitlines() if line.startswith("zoo: error:")]
            assert code != 0 and len(errors) == 1, (name, output)
            assert any(w in errors[0] for w in ("add ", "put ", "pass ", "remove")), errors[0]
    _, output = _check(workspace, "--data", str(tmp_path / "bad"))
    assert "2 file(s) skipped: they do not decode" in output


@pytest.mark.slow
def test_adapt_checks_balances_and_reports_twin_free_figures(
    tmp_path: Path, workspace: Path
) -> None:
    import zoo

    data = tmp_path / "data"
    originals = write_scenes(data / "train", {"a": 12, "b": 3})
    write_scenes(data / "val", {"a": 3, "b": 3}, first_seed=2000)
    write_scenes(data / "test", {"a": 3, "b": 3}, first_seed=3000)
    shutil.copyfile(originals[0], data / "test" / "a" / "copy.png")
    lines: list[str] = []
    run = zoo.adapt(
        "efficientnet-lite0",
        data=data,
        strategy="feature",
        models_dir=workspace,
        out=tmp_path / "run",
        log=lines.append,
    )
    check = DataCheck.load(tmp_path / "run" / "check.json")
    assert check is not None and check.twinned("test") == {str(data / "test" / "a" / "copy.png")}
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["hyperparameters"]["balance"] == "weights"
    assert any(line.startswith("balancing with class weights") for line in lines)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["without_twins"]["num_images"] == metrics["num_images"] - 1
    page = (tmp_path / "run" / "report.html").read_text()
    assert "Data check" in page and "Held-out figures without duplicates" in page
    assert run.summary is not None
    zoo.adapt(
        "efficientnet-lite0",
        data=data,
        strategy="feature",
        balance="none",
        models_dir=workspace,
        out=tmp_path / "plain",
    )
    plain = json.loads((tmp_path / "plain" / "run.json").read_text())
    assert plain["hyperparameters"]["balance"] == "none"


# ----------------------------------------------------------------------------- real photos


@pytest.mark.slow
def test_flowers5_planted_copies_are_found(
    tmp_path: Path, shared_dir: Path, workspace: Path
) -> None:
    from bench.data_check import FLOWERS5_OWN, plant_duplicates, score_pairs

    planted = plant_duplicates(shared_dir / "datasets" / "flowers5", tmp_path / "flowers", seed=0)
    code, output = _check(workspace, "--data", str(tmp_path / "flowers"), "--json")
    assert code == 0, output
    found = DataCheck.from_dict(json.loads(output[output.index("{") :]))
    score = score_pairs(found.twins, planted, FLOWERS5_OWN)
    assert score.found >= 38 and score.false <= 2, score


def test_bench_scores_planted_pairs_and_renders_its_section(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench import data_check
    from bench.common import QUICK

    planted = [
        data_check.Planted("t/c/p1.jpg", "r/c/o1.jpg", "exact"),
        data_check.Planted("t/c/p2.jpg", "r/c/o2.jpg", "augmented"),
    ]
    reported = [
        Twin("r/c/o1.jpg", "t/c/p1.jpg", "train", "test", "exact"),
        Twin("r/c/a.jpg", "t/c/b.jpg", "train", "test", "near", 3.3),  # flowers5's own
        Twin("r/c/x.jpg", "r/c/y.jpg", "train", "train", "near", 3.2),  # false
    ]
    score = data_check.score_pairs(reported, planted, [("a.jpg", "b.jpg")])
    assert (score.found, score.planted, score.false) == (1, 2, 1)
    assert score.false_pairs == [("x.jpg", "y.jpg")]
    body = data_check._body(
        [[0, "39/40", 0, 44, 0]],
        [[0, 40, 80, 0.9]],
        [[0, "roses", 0.8, 0.75, 0.05]],
        (100, 50.0, 4.0),
    )
    text = "\n".join(body)
    assert "≥ 38 of 40 found" in text and ": met." in text and "8.0%" in text
    monkeypatch.setattr(data_check, "SHARED_DIR", tmp_path / "absent")
    assert "Not run" in data_check.run(QUICK, work=tmp_path).markdown()
