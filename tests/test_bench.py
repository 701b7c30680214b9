"""The benchmark machinery: interleaving, medians, tables, sections, memory probes, CPU code paths."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

# bench/ is a folder of scripts beside the installed packages, not one of them: `python -m pytest`
# finds it through the working directory, the `pytest` entry point needs the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import common, run  # noqa: E402


def test_interleave_alternates_candidates_and_keeps_their_own_times() -> None:
    calls: list[str] = []

    def candidate(name: str, seconds: float):
        def measure() -> float:
            calls.append(name)
            return seconds

        return measure

    times = common.interleave(
        {"a": candidate("a", 1.0), "b": candidate("b", 2.0)}, repetitions=3, warmup=True
    )
    assert calls == ["a", "b"] + ["a", "b", "b", "a", "a", "b"]  # warm-up first; order alternates
    assert times == {"a": [1.0] * 3, "b": [2.0] * 3}
    with pytest.raises(ValueError):
        common.interleave({"a": candidate("a", 1.0)}, repetitions=0)


def test_ratio_uses_medians_so_one_outlier_does_not_move_it() -> None:
    baseline, ours = [10.0, 11.0, 95.0], [1.0, 1.0, 1.2]
    assert common.median(baseline) == 11.0
    assert common.ratio(baseline, ours) == pytest.approx(11.0)
    assert common.spread([3.0, 1.0, 2.0]) == "1–3"


@pytest.mark.parametrize(
    ("value", "goal", "higher", "verdict"),
    [
        (25.0, 20.0, True, "met"),
        (15.0, 20.0, True, "missed by 25%"),
        (1.2, 1.3, False, "met"),
        (1.69, 1.3, False, "missed by 30%"),
    ],
)
def test_goal_verdict_says_by_how_much(
    value: float, goal: float, higher: bool, verdict: str
) -> None:
    assert common.goal_verdict(value, goal, higher_is_better=higher) == verdict


def test_markdown_table_formats_numbers_and_escapes_pipes() -> None:
    table = common.markdown_table(["a", "b"], [[1.23456, "x|y"], [1234.5, 3]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1.23 | x\\|y |", "| 1234 | 3 |"]


def test_section_markdown_names_its_command() -> None:
    section = common.Section(
        "feature", "1. Title", ["body"], command=common.QUICK.command("feature")
    )
    text = section.markdown()
    assert text.startswith("## 1. Title\n\nbody")
    assert "`.venv/bin/python -m bench.run --only feature --quick`" in text
    assert common.FULL.command("gpu") == ".venv/bin/python -m bench.run --only gpu"


def test_replace_sections_rewrites_only_the_named_ones_in_order() -> None:
    order = ["machine", "feature", "finetune"]
    first = run.replace_sections(
        run.INTRO, {"finetune": "old finetune", "machine": "m1"}, order=order
    )
    assert first.index("m1") < first.index("old finetune")
    second = run.replace_sections(first, {"feature": "new feature", "machine": "m2"}, order=order)
    assert second.startswith("# Benchmarks")
    assert "old finetune" in second and "new feature" in second and "m1" not in second
    assert second.index("m2") < second.index("new feature") < second.index("old finetune")
    assert run.replace_sections(second, {}, order=order) == second  # idempotent


def test_a_failing_benchmark_becomes_a_section_that_says_why(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def broken(scale: common.Scale, *, work: Path) -> common.Section:
        raise RuntimeError("no model")

    fake = types.ModuleType("bench_fake")
    fake.TITLE, fake.run = "9. Fake", broken
    monkeypatch.setitem(sys.modules, "bench_fake", fake)
    monkeypatch.setitem(run.BENCHMARKS, "fake", "bench_fake")
    sections = run.run_benchmarks(["fake"], common.QUICK, work=tmp_path, log=lambda _m: None)
    text = sections["fake"].markdown()
    assert "**Failed:** `RuntimeError: no model`" in text
    assert "--only fake --quick" in text
    assert "_Scale: quick;" in text


def test_peak_rss_of_a_child_is_its_own_not_the_parents() -> None:
    from bench.memory import own_peak_kib, peak_rss_mib

    report = "import re; print('peak_kib', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))"  # fmt: skip
    small = peak_rss_mib([sys.executable, "-c", report])
    big = peak_rss_mib([sys.executable, "-c", "b = bytearray(300 * 1024 * 1024); b[::4096] = b'x' * len(b[::4096]); " + report])  # fmt: skip
    assert small < 60  # a bare interpreter, although this parent holds torch
    assert big - small > 250
    assert own_peak_kib() > 1024 * small
    with pytest.raises(RuntimeError, match="exited with 3"):
        peak_rss_mib([sys.executable, "-c", "raise SystemExit(3)"])


def _tiny_net():
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )


def test_gpu_finetune_rows_run_on_the_cpu_with_bf16_and_channels_last() -> None:
    from bench.gpu import finetune_rows

    model = _tiny_net()
    rows = finetune_rows(model, device="cpu", batch=4, size=16, steps=1, repetitions=1)
    assert [r[1] for r in rows[:2]] == ["fp32", "bf16 + channels_last"]
    assert all(r[2] > 0 for r in rows[:2])
    assert rows[2][2].endswith("×")
    assert all(p.grad is not None for p in model.parameters())  # backward really ran


def test_gpu_inference_rows_compare_onnxruntime_with_torch_on_the_cpu(tmp_path: Path) -> None:
    import numpy as np
    import torch

    from bench.gpu import inference_rows

    model = _tiny_net().eval()
    path = tmp_path / "tiny.onnx"
    torch.onnx.export(
        model,
        torch.zeros(1, 3, 16, 16),
        str(path),
        dynamo=False,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    images = np.random.default_rng(0).standard_normal((4, 3, 16, 16), dtype=np.float32)
    rows = inference_rows(model, path, images, device="cpu", calls=2, repetitions=2)
    assert [r[1] for r in rows] == ["PyTorch", "onnxruntime CPUExecutionProvider"]
    assert rows[0][4] == "1.00×" and rows[1][2] > 0


def test_gpu_section_says_not_run_without_cuda(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import torch

    from bench import gpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    text = gpu.run(common.QUICK, work=tmp_path).markdown()
    assert "not run: no GPU" in text


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "fast"), [("feature", True), ("feature", False)])
def test_time_training_path_takes_the_path_asked_for(
    bundled_onnx: Path, tmp_path: Path, strategy: str, fast: bool
) -> None:
    split = common.digits_split(images=8)
    assert len(split.train) == 8 and not split.val and not split.test
    timing = common.time_training_path(
        onnx_path=bundled_onnx,
        strategy=strategy,
        unfreeze=None,
        split=split,
        preprocess=common.preprocess_at(32),
        config=common.train_config(epochs=1, batch_size=4),
        fast=fast,
        epochs=1,
        cache_dir=tmp_path,
    )
    assert timing.training > 0 and timing.total == timing.setup + timing.training
    if fast:
        assert timing.setup > 0  # the features were computed, not found in a cache


def test_median_profiles_name_the_operators_of_both_models() -> None:
    import torch

    from bench.converted_training import median_profiles, profile_table

    inputs, labels = torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    profiles = median_profiles(
        {"native": _tiny_net(), "converted": _tiny_net()},
        inputs,
        labels,
        channels_last=False,
        repetitions=2,
    )
    assert set(profiles) == {"native", "converted"}
    assert any("conv" in op for op in profiles["converted"])
    table = profile_table(**profiles, top=3)
    assert table.splitlines()[0] == "| operator | native self ms | converted self ms |"
    assert len(table.splitlines()) == 5


def test_main_writes_each_section_with_the_machine_and_keeps_the_others(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def fine(scale: common.Scale, *, work: Path) -> common.Section:
        return common.Section("fake", "9. Fake", ["| a |\n|---|\n| 1 |"], command=scale.command("fake"))  # fmt: skip

    fake = types.ModuleType("bench_fake")
    fake.TITLE, fake.run = "9. Fake", fine
    monkeypatch.setitem(sys.modules, "bench_fake", fake)
    monkeypatch.setattr(run, "BENCHMARKS", {"fake": "bench_fake", "other": "bench_other"})
    out = tmp_path / "BENCHMARKS.md"
    out.write_text(run.INTRO + "\n\n" + run.wrap("other", "kept from an earlier run"))
    assert run.main(["--quick", "--only", "fake", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# Benchmarks")
    assert "## Machine and run" in text and "| torch threads |" in text
    assert "`.venv/bin/python -m bench.run --only fake --quick`" in text
    assert text.index("## Machine") < text.index("9. Fake") < text.index("kept from an earlier run")


def test_transfer_runs_the_real_photo_sets_present_and_notes_the_absent(tmp_path: Path) -> None:
    from bench import transfer

    sets, missing = transfer.data_sets(common.FULL, shared=tmp_path)
    assert [s.name for s in sets] == ["digits"] and len(missing) == 2
    assert missing[0].startswith("flowers5 skipped:")
    (tmp_path / "datasets" / "textures10").mkdir(parents=True)
    sets, missing = transfer.data_sets(common.FULL, shared=tmp_path)
    assert [s.name for s in sets] == ["textures10", "digits"] and len(missing) == 1
    textures, digits = sets
    assert textures.source == str(tmp_path / "datasets" / "textures10")
    assert (textures.train_per_class, textures.train_size) == (None, 128)
    assert (digits.source, digits.train_per_class, digits.train_size) == (
        "builtin:digits",
        20,
        None,
    )
    (tmp_path / "datasets" / "flowers5").mkdir(parents=True)
    sets, _ = transfer.data_sets(common.QUICK, shared=tmp_path)  # quick: one photo set, tiny
    assert [(s.name, s.train_per_class) for s in sets] == [("flowers5", 4), ("digits", 4)]
    assert transfer.ROWS == (
        "probe",
        "feature",
        "finetune",
        "gradual",
        "full",
        "scratch",
        "defaults",
    )


# --- bench.compat: the compatibility sweep ---------------------------------------------------


def test_compat_judges_a_refusal_a_crash_and_a_kill() -> None:
    from bench.compat import judge

    refusal = judge("inspect", [], 1, "", "loading…\nzoo: error: no head found; pass --head\n")
    assert not refusal.ok and not refusal.crashed
    assert refusal.message == "no head found; pass --head" and refusal.cell().startswith("no head")
    for stderr in (
        "zoo: internal error: ValueError: Found empty input array (re-run with --debug)",
        "Traceback (most recent call last):\n  File ...\nKeyError: 'x'",
    ):
        crash = judge("adapt", [], 1, "", stderr)
        assert crash.crashed and crash.cell().startswith("CRASH") and crash.output
    assert judge("export", [], 0, "Traceback (most recent call last): ...", "").crashed
    assert judge("export", [], -9, "", "").crashed  # killed by a signal
    assert judge("fetch", [], 0, "/models/x/model.onnx\n", "").cell() == "✓"
    long = judge("inspect", [], 1, "", "zoo: error: " + "x" * 190 + " see `zoo list` now")
    assert long.cell().endswith("…`") and long.cell().count("`") == 2  # no open code span
    assert judge("a", [], 1, "", "zoo: error: a | b").cell() == "a \\| b"


def test_compat_runs_the_real_cli_and_writes_the_readme_section(tmp_path: Path) -> None:
    from bench.compat import MARKERS, Row, markdown, run_zoo, skipped, write_readme

    step = run_zoo("info", ["info", "no-such-model-anywhere"], models_dir=tmp_path / "models")
    assert step.exit_code == 1 and not step.crashed
    assert "no model named 'no-such-model-anywhere'" in step.message
    row = Row("x", "built graph", "/somewhere/x.onnx", [step, skipped("inspect", "fetch failed")])
    table = markdown([row])
    assert "| `x.onnx` | built graph | " in table and " – |" in table
    readme = tmp_path / "README.md"
    readme.write_text("# zoo\n\nintro\n")
    write_readme(readme, table)
    write_readme(readme, table.replace("x.onnx", "y.onnx"))  # a second run replaces the first
    text = readme.read_text()
    assert text.count(MARKERS[0]) == 1 and "y.onnx" in text and "x.onnx" not in text
    assert text.startswith("# zoo\n\nintro\n") and "## Which models work" in text


def test_fidelity_exact_worker_decodes_full_size_and_keeps_float32(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The exact worker really switches off draft decoding and float16 before running the CLI."""
    from bench import fidelity
    from pipeline.data import images
    from pipeline.train import fastpath, features
    from zoo.catalog import IMAGENET_PREPROCESS as preprocess

    seen: list[list[str]] = []
    monkeypatch.setattr("cli.main", lambda argv, standalone_mode: seen.append(argv))
    for name in ("decode_size", "PREFIX_STORAGE", "DECODE"):
        module = (
            images if name == "decode_size" else fastpath if name == "PREFIX_STORAGE" else features
        )
        monkeypatch.setattr(module, name, getattr(module, name))  # restored after the test
    assert images.decode_size(preprocess) >= 224
    fidelity.main(["--worker", "exact", "--", "adapt", "--data", "x"])
    assert seen == [["adapt", "--data", "x"]]
    assert images.decode_size(preprocess) is None
    assert (fastpath.PREFIX_STORAGE, features.DECODE) == ("float32", "full")


def test_fidelity_skips_cleanly_without_the_photos(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from bench import fidelity

    monkeypatch.setattr(fidelity, "SHARED_DIR", tmp_path / "absent")
    section = fidelity.run(common.QUICK, work=tmp_path)
    assert "Skipped" in section.body[0] and "--only fidelity" in section.command


# --- bench.scale: real photos at scale -------------------------------------------------------


def _photo_classes(folder: Path, *, classes: int, per_class: int) -> Path:
    from image_builders import write_rgb

    for c in range(classes):
        for i in range(per_class):
            write_rgb(folder / f"class{c}" / f"p{i}.jpg", size=(40 + 8 * i, 30), seed=10 * c + i)
    return folder


def test_scale_sets_have_the_right_images_in_class_folders_and_are_built_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from PIL import Image

    from bench import scale_data

    source = _photo_classes(tmp_path / "src", classes=2, per_class=3)
    crops = scale_data.random_crops(source, tmp_path / "crops", count=9, seed=1)
    assert scale_data.per_class(9, 2) == [5, 4]
    assert {p.name: len(list(p.iterdir())) for p in crops.iterdir() if p.is_dir()} == {"class0": 5, "class1": 4}  # fmt: skip
    names = sorted(p.name for p in (crops / "class0").iterdir())
    assert names[:3] == ["0000_0000.jpg", "0000_0001.jpg", "0000_0002.jpg"]  # every photo first
    with Image.open(crops / "class0" / names[-1]) as img:
        assert (img.size, img.format) == ((256, 256), "JPEG")
    stamp = (crops / "class0" / names[0]).stat().st_mtime_ns
    assert scale_data.random_crops(source, crops, count=9, seed=1) == crops  # reused, not rebuilt
    assert (crops / "class0" / names[0]).stat().st_mtime_ns == stamp
    small = scale_data.subset(crops, tmp_path / "small", count=4)
    assert scale_data.count_images(small) == 4 and not (tmp_path / "small.partial").exists()
    first = small / "class1" / "0000_0000.jpg"
    assert first.stat().st_ino == (crops / "class1" / "0000_0000.jpg").stat().st_ino  # hard link
    with pytest.raises(ValueError, match="has 5 images, not 6"):
        scale_data.subset(crops, tmp_path / "too-many", count=12)
    monkeypatch.setattr(scale_data, "PHONE_SIZE", (64, 48))  # the real 4032×3024 is slow to write
    phone = scale_data.phone_photos(source, tmp_path / "phone", count=4)
    with Image.open(phone / "class1" / "00001.jpg") as img:
        assert (img.size, img.format) == ((64, 48), "JPEG")
    assert scale_data.count_images(phone) == 4


def _pooling_onnx(path: Path) -> Path:
    from onnx import helper
    from onnx_builders import make_model, save

    nodes = [
        helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["scores"], axis=1),
    ]
    return save(make_model(nodes, [], input_shape=["N", 3, 224, 224], output_shape=["N", 3]), path)  # fmt: skip


def test_scale_floor_and_worker_run_in_a_process_and_report_their_peak(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bench import scale

    photos = _photo_classes(tmp_path / "photos", classes=2, per_class=2)
    model = _pooling_onnx(tmp_path / "pool.onnx")
    assert scale.floor(photos, model, batch=3) == 4  # two batches, the last one short
    assert scale.main(["--floor", str(photos), "--onnx", str(model)]) == 0
    assert scale.main(["--worker", "--models-dir", str(tmp_path / "m"), "info", "no-such-model"]) == 1  # fmt: skip
    output = capsys.readouterr()
    assert "floor_images 4" in output.out and output.out.count("peak_kib ") == 2
    assert "no model named 'no-such-model'" in output.err
    seconds, peak = scale.run_child([sys.executable, "-c", "print('peak_kib 2048')"])
    assert seconds > 0 and peak == 2.0
    with pytest.raises(RuntimeError, match="exited with 3: gone"):
        scale.run_child([sys.executable, "-c", "import sys; print('gone', file=sys.stderr); sys.exit(3)"])  # fmt: skip
    (tmp_path / "ws" / "m").mkdir(parents=True)
    (tmp_path / "ws" / "m" / "model.onnx").write_bytes(b"x")
    (tmp_path / "ws" / ".cache" / "features").mkdir(parents=True)
    copy = scale.fresh_workspace(tmp_path / "ws", tmp_path / "copy")
    assert not (copy / ".cache").exists()  # every run starts with an empty cache
    assert (copy / "m" / "model.onnx").stat().st_ino == (tmp_path / "ws" / "m" / "model.onnx").stat().st_ino  # fmt: skip


def test_scale_section_renders_ratios_and_verdicts(tmp_path: Path) -> None:
    from bench import scale

    def run(seconds: float, peak: float | None = None, **timings: float) -> scale.Measured:
        return scale.Measured(seconds, peak, timings, "feature")

    phone = scale.PhoneResult(
        (200, 400),
        {
            200: [run(30.0, data=2.0, cache=20.0), run(28.0, data=2.0, cache=18.0)],
            400: [run(50.0, data=4.0, cache=38.0)],
        },  # fmt: skip
        {200: [12.0, 11.0], 400: [19.0, 20.0]},
        0.5,
    )
    assert phone.marginal() == pytest.approx((0.11, 0.04))  # (50 - 28) / 200, (19 - 11) / 200
    text = "\n".join(scale.phone_body(phone))
    assert "| marginal cost per photo, zoo ÷ floor | 2.75× | ≤ 1.5× | missed by 83% |" in text
    assert "| the same, zoo's stages but `model` (less noisy) ÷ floor | 2.75× |" in text
    assert "| cache | 18 | 38 | 100 |" in text  # the stages of the best runs
    growth = [
        ("feature", 1000, run(20.0, 900.0)),
        ("finetune", 1000, run(100.0, 2000.0)),
        ("feature", 5000, run(80.0, 950.0)),
        ("finetune", 5000, run(500.0, 2500.0)),
        ("feature", 10000, run(150.0, 1000.0)),
        ("finetune", 10000, run(1100.0, 3000.0)),
    ]
    text = "\n".join(scale.growth_body(growth))
    assert "| feature: peak RSS, 10000 ÷ 1000 images | 1.11× | ≤ 1.2× | met |" in text
    assert "| finetune: peak RSS, 10000 ÷ 1000 images | 1.50× | ≤ 1.2× | missed by 25% |" in text
    assert "| feature: s per image, 10000 ÷ 1000 images | 0.75× |" in text
    assert (
        "| feature: marginal s per image, 5000→10000 ÷ 1000→5000 | 0.93× | ≤ 1.2× (linear) | met |"
        in text
    )
    assert "| finetune: marginal s per image, 5000→10000 ÷ 1000→5000 | 1.20× |" in text
    assert "| finetune | 10000 | 1100 | 110 | 120 | 3000 |" in text
    assert "| feature | 1000 | 20 | 20 | – | 900 |" in text
    reuse = [
        ("1. first", run(30.0, imports=3.0, data=1.0, model=8.0, cache=11.0)),
        ("2. second", run(12.0, imports=3.0, data=1.0, model=0.9, cache=0.6)),
        ("3. third", run(15.0, data=1.0, model=8.0, choose=1.0)),
    ]
    text = "\n".join(scale.reuse_body(reuse, images=1000))
    assert "| set-up, run 1 ÷ 2. second | 8.00× | ≥ 5× | met |" in text
    assert "| set-up, run 1 ÷ 3. third | 2.00× | ≥ 5× | missed by 60% |" in text
    assert "| `cache` stage alone (context), run 1 ÷ 2. second | 18.3× |  |  |" in text
    assert "| set-up with `imports` (context), run 1 ÷ 2. second | 4.18× |  |  |" in text
    assert "| 1. first | feature | 3 | 1 | 8 | 0 | 11 | 0 | 0 | 20 | 7 | 30 |" in text
    assert "2: `data` 1.00 s of 2.50 s; 3: `model` 8.00 s of 10.00 s." in text


def test_scale_says_not_run_without_the_real_photos(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from bench import scale

    monkeypatch.setattr(scale, "SHARED_DIR", tmp_path)
    text = scale.run(common.QUICK, work=tmp_path).markdown()
    assert "Not run:" in text and "flowers5 is absent" in text
    assert list(run.BENCHMARKS).index("scale") == list(run.BENCHMARKS).index("gpu") + 1
