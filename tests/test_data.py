"""Tests of pipeline/data/: sources, splits, decoding, preprocessing."""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from image_builders import (
    build_awkward_folder,
    make_image_folder,
    write_cmyk_jpeg,
    write_exif_rotated_jpeg,
    write_gray16_png,
    write_la_png,
    write_palette_transparent_png,
    write_png_bomb,
    write_rgb,
    write_rgba_png,
)
from PIL import Image

from pipeline.core.samples import DataSplit, Sample
from pipeline.data.images import (
    UnreadableImage,
    build_augmentation,
    find_unreadable,
    open_image,
    preprocess_image,
)
from pipeline.data.sources import load_source, mirror_safe
from pipeline.data.split import ImageDataset, stratified_split, subsample_per_class
from zoo.catalog import IMAGENET_PREPROCESS, Preprocess
from zoo.errors import DataError

# ----------------------------------------------------------------------------- sources


def test_image_folder_source_is_split_60_20_20_stratified(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "pets", {"dog": 10, "cat": 10, "bird": 5})
    split = load_source(str(tmp_path / "pets"), seed=3)
    assert split.class_names == ["bird", "cat", "dog"]  # sorted folder names
    assert split.source_name == "pets"
    assert split.recommended_size is None
    assert split.counts("train") == [3, 6, 6]
    assert split.counts("val") == [1, 2, 2]
    assert split.counts("test") == [1, 2, 2]
    refs = [s.ref for part in (split.train, split.val, split.test) for s in part]
    assert len(refs) == len(set(refs)) == 25
    for sample in split.train:
        assert Path(sample.ref).parent.name == split.class_names[sample.label]


def test_split_is_reproducible_with_the_seed_and_changes_with_another(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "d", {"a": 12, "b": 12})
    first = load_source(str(tmp_path / "d"), seed=1)
    again = load_source(str(tmp_path / "d"), seed=1)
    other = load_source(str(tmp_path / "d"), seed=2)
    assert first.train == again.train and first.val == again.val and first.test == again.test
    assert first.test != other.test


def test_presplit_folder_keeps_the_given_parts(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "ds" / "train", {"x": 4, "y": 3})
    make_image_folder(tmp_path / "ds" / "valid", {"x": 2, "y": 2})
    make_image_folder(tmp_path / "ds" / "test", {"x": 1, "y": 1})
    split = load_source(str(tmp_path / "ds"))
    assert split.class_names == ["x", "y"]
    assert split.counts("train") == [4, 3]
    assert split.counts("val") == [2, 2]
    assert split.counts("test") == [1, 1]
    assert all("/valid/" in s.ref for s in split.val)


def test_presplit_without_val_carves_it_from_train_and_without_test_leaves_it_empty(
    tmp_path: Path,
) -> None:
    make_image_folder(tmp_path / "ds" / "train", {"x": 8, "y": 8})
    split = load_source(str(tmp_path / "ds"), seed=0)
    assert split.counts("val") == [2, 2]
    assert split.counts("train") == [6, 6]
    assert split.test == []


def test_presplit_class_missing_from_train_is_a_data_error(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "ds" / "train", {"x": 3, "y": 3})
    make_image_folder(tmp_path / "ds" / "val", {"x": 1, "y": 1, "z": 1})
    with pytest.raises(DataError, match="'z'"):
        load_source(str(tmp_path / "ds"))


@pytest.mark.parametrize("header", [True, False])
def test_csv_source_with_relative_paths_and_optional_header(tmp_path: Path, header: bool) -> None:
    rows = []
    for i in range(6):
        for label in ("2", "10"):
            write_rgb(tmp_path / "img" / f"{label}_{i}.png", seed=i + 10 * int(label))
            rows.append(f"img/{label}_{i}.png,{label}")
    rows.append("img/missing.png,2")
    rows.append("img/notes.txt,10")
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text(("path,label\n" if header else "") + "\n".join(rows) + "\n")
    split = load_source(str(csv_path))
    assert split.class_names == ["2", "10"]  # integer labels in numeric order
    assert split.source_name == "labels"
    assert sum(len(p) for p in (split.train, split.val, split.test)) == 12
    assert sorted(os.path.basename(p) for p, _ in split.skipped) == ["missing.png", "notes.txt"]
    with pytest.raises(DataError, match="2 unusable"):
        load_source(str(csv_path), strict=True)


def test_csv_with_split_column_uses_it(tmp_path: Path) -> None:
    lines = ["file,class,split"]
    for i, part in enumerate(["train", "train", "val", "test"] * 2):
        label = "ab"[i % 2]
        write_rgb(tmp_path / f"{i}.png", seed=i)
        lines.append(f"{i}.png,{label},{part}")
    (tmp_path / "s.csv").write_text("\n".join(lines))
    split = load_source(str(tmp_path / "s.csv"))
    assert (len(split.train), len(split.val), len(split.test)) == (4, 2, 2)


def test_builtin_digits() -> None:
    split = load_source("builtin:digits", seed=0)
    assert split.class_names == [str(d) for d in range(10)]
    assert split.recommended_size == 64
    assert split.source_name == "digits"
    total = len(split.train) + len(split.val) + len(split.test)
    assert total == 1797
    assert abs(len(split.train) / total - 0.6) < 0.01
    assert abs(len(split.test) / total - 0.2) < 0.01
    img = open_image(split.train[0].ref, channels=1)
    assert img.size == (8, 8) and img.mode == "L"
    pixels = np.asarray(img)
    # White ink on black: the border of a digit is background, so it is dark.
    assert pixels.max() > 200 and np.median(pixels[0]) < 60
    assert open_image(split.train[0].ref).mode == "RGB"
    with pytest.raises(DataError):
        load_source("builtin:nope")


def test_split_json_round_trip(tmp_path: Path) -> None:
    root = tmp_path / "猫 data"
    make_image_folder(root, {"café au lait": 5, "猫": 5})
    split = load_source(str(root), seed=4)
    split.skipped.append(("x.png", "cannot decode"))
    split.save(tmp_path / "split.json")
    loaded = DataSplit.load(tmp_path / "split.json")
    assert loaded == split
    assert isinstance(loaded.train[0], Sample)
    assert "猫" in (tmp_path / "split.json").read_text(encoding="utf-8")
    digits = load_source("builtin:digits")
    assert DataSplit.from_json(digits.to_json()) == digits
    with pytest.raises(DataError, match="malformed"):
        DataSplit.from_json('{"version": 1}')


# ----------------------------------------------------------------------------- awkward files


def test_awkward_folder_skips_bad_files_and_uses_the_rest(tmp_path: Path, caplog) -> None:
    expected = build_awkward_folder(tmp_path / "awk")
    with caplog.at_level(logging.WARNING, logger="pipeline.data.split"):
        split = load_source(str(tmp_path / "awk"))
    assert split.class_names == ["café au lait", "plain", "猫"]
    used = sorted(s.ref for part in (split.train, split.val, split.test) for s in part)
    assert used == sorted(expected["good"])
    assert sorted(p for p, _ in split.skipped) == sorted(expected["bad"])
    assert [r for r in caplog.records if "skipped 3 unusable" in r.getMessage()]
    with pytest.raises(DataError, match="3 unusable"):
        load_source(str(tmp_path / "awk"), strict=True)
    # Every used image really decodes to the model's input.
    dataset = ImageDataset(split.train + split.val + split.test, IMAGENET_PREPROCESS.at_size(32))
    for i in range(len(dataset)):
        tensor, _ = dataset[i]
        assert tensor.shape == (3, 32, 32) and torch.isfinite(tensor).all()


def test_cmyk_jpeg_decodes_to_its_rgb_colour(tmp_path: Path) -> None:
    img = open_image(write_cmyk_jpeg(tmp_path / "c.jpg", (255, 0, 0)))
    r, g, b = np.asarray(img)[8, 8].astype(int)
    assert img.mode == "RGB" and r > 230 and g < 30 and b < 30


def test_transparency_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.asarray(open_image(write_rgba_png(tmp_path / "a.png")))
    assert tuple(rgba[0, 0]) == (255, 0, 0) and tuple(rgba[0, 7]) == (255, 255, 255)
    pal = np.asarray(open_image(write_palette_transparent_png(tmp_path / "p.png")))
    assert tuple(pal[0, 0]) == (0, 0, 255) and tuple(pal[0, 7]) == (255, 255, 255)
    la = np.asarray(open_image(write_la_png(tmp_path / "la.png", gray=60), channels=1))
    assert la[0, 0] == 60 and la[7, 0] == 255


def test_16bit_mid_gray_stays_mid_gray(tmp_path: Path) -> None:
    path = write_gray16_png(tmp_path / "g.png", 32896)
    assert Image.open(path).mode.startswith("I")
    assert np.asarray(open_image(path, channels=1)).max() == 128
    assert tuple(np.asarray(open_image(path))[0, 0]) == (128, 128, 128)
    assert (
        np.asarray(open_image(write_gray16_png(tmp_path / "w.png", 65535), channels=1))[0, 0] == 255
    )


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    assert open_image(write_exif_rotated_jpeg(tmp_path / "r.jpg")).size == (10, 20)


def test_decompression_bomb_is_refused_quickly(tmp_path: Path) -> None:
    bomb = write_png_bomb(tmp_path / "bomb.png", side=30_000)
    assert bomb.stat().st_size < 1_000_000  # 900 megapixels in a few hundred KB
    start = time.perf_counter()
    with pytest.raises(UnreadableImage, match="bomb"):
        open_image(bomb)
    assert time.perf_counter() - start < 2
    # Below Pillow's own limit our configurable limit refuses from the header alone.
    small_bomb = write_png_bomb(tmp_path / "small.png", side=2_000)
    start = time.perf_counter()
    with pytest.raises(UnreadableImage, match="exceeds the limit"):
        open_image(small_bomb, max_pixels=1_000_000)
    assert time.perf_counter() - start < 2
    assert find_unreadable([str(bomb), str(small_bomb)], max_pixels=1_000_000).keys() == {
        str(bomb),
        str(small_bomb),
    }


# ----------------------------------------------------------------------------- class rules


def test_empty_class_folder_is_a_data_error_naming_it(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "d", {"a": 3})
    (tmp_path / "d" / "empty").mkdir()
    (tmp_path / "d" / "empty" / "readme.txt").write_text("no images")
    with pytest.raises(DataError, match="empty"):
        load_source(str(tmp_path / "d"))


def test_class_of_only_unreadable_files_is_a_data_error(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "d", {"a": 3})
    (tmp_path / "d" / "broken").mkdir()
    (tmp_path / "d" / "broken" / "x.png").write_bytes(b"")
    with pytest.raises(DataError, match="'broken'"):
        load_source(str(tmp_path / "d"))


def test_single_class_and_no_images_are_data_errors(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "one", {"only": 4})
    with pytest.raises(DataError, match="only one class"):
        load_source(str(tmp_path / "one"))
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match="no readable images"):
        load_source(str(tmp_path / "none"))
    with pytest.raises(DataError, match="does not exist"):
        load_source(str(tmp_path / "missing"))


def test_tiny_classes_fall_back_gracefully() -> None:
    labels = [0] * 1 + [1] * 2 + [2] * 3 + [3] * 50
    train, val, test = stratified_split(labels, seed=0, val_fraction=0.2, test_fraction=0.2)
    assert sorted(train + val + test) == list(range(len(labels)))
    part_of = {
        i: name for name, idx in (("train", train), ("val", val), ("test", test)) for i in idx
    }
    assert part_of[0] == "train"
    assert sorted(part_of[i] for i in (1, 2)) == ["train", "val"]
    assert sorted(part_of[i] for i in (3, 4, 5)) == ["test", "train", "val"]
    assert Counter(part_of[i] for i in range(6, 56)) == {"train": 30, "val": 10, "test": 10}


def test_subsample_per_class_is_seeded_and_capped() -> None:
    samples = [Sample(f"{i}", i % 3) for i in range(30)] + [Sample("x", 3)]
    picked = subsample_per_class(samples, 4, seed=1)
    assert Counter(s.label for s in picked) == {0: 4, 1: 4, 2: 4, 3: 1}
    assert picked == subsample_per_class(samples, 4, seed=1)
    assert picked != subsample_per_class(samples, 4, seed=2)
    assert picked == sorted(picked, key=samples.index)


# ----------------------------------------------------------------------------- preprocessing


def _solid(color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> Image.Image:
    return Image.new("RGB", size, color)


def test_known_pixel_gets_the_imagenet_value() -> None:
    out = preprocess_image(_solid((255, 128, 0)), IMAGENET_PREPROCESS.at_size(16))
    assert out.shape == (3, 16, 16) and out.dtype == np.float32
    expected = [(1 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, (0 - 0.406) / 0.225]
    np.testing.assert_allclose(out[:, 5, 5], expected, rtol=1e-5)


def test_bgr_caffe_order_and_nhwc_layout() -> None:
    caffe = Preprocess(mean=(104.0, 117.0, 123.0), std=(1.0, 1.0, 1.0), scale=1.0, bgr=True)
    out = preprocess_image(_solid((200, 100, 50)), caffe.at_size(8))
    np.testing.assert_allclose(out[:, 0, 0], [50 - 104, 100 - 117, 200 - 123])
    nhwc = dataclasses.replace(IMAGENET_PREPROCESS, layout="NHWC").at_size(12)
    out = preprocess_image(_solid((255, 0, 0)), nhwc)
    assert out.shape == (12, 12, 3)
    np.testing.assert_allclose(out[3, 3, 0], (1 - 0.485) / 0.229, rtol=1e-5)


def test_shorter_and_direct_resize_see_different_fields_of_view() -> None:
    # 80x40: left 20 columns red, the rest black.
    pixels = np.zeros((40, 80, 3), dtype=np.uint8)
    pixels[:, :20] = (255, 0, 0)
    img = Image.fromarray(pixels)
    shorter = Preprocess(mean=(0.0,), std=(1.0,), scale=1.0, resize=20, crop=20)
    direct = dataclasses.replace(shorter, resize_mode="direct")
    out_shorter, out_direct = preprocess_image(img, shorter), preprocess_image(img, direct)
    assert out_shorter.shape == out_direct.shape == (3, 20, 20)
    assert out_shorter[0, 10, 5] == 0  # the centre crop of 40x20 cuts the red stripe away
    assert out_direct[0, 10, 2] > 250  # squeezing keeps it in the left quarter


def test_single_channel_model_input() -> None:
    mnist = Preprocess(mean=(0.0,), std=(1.0,), scale=1.0, resize=28, crop=28, channels=1)
    out = preprocess_image(_solid((255, 255, 255)), mnist)
    assert out.shape == (1, 28, 28) and np.allclose(out, 255)
    dataset = ImageDataset([Sample("builtin:digits#0", 0)], mnist)
    assert dataset[0][0].shape == (1, 28, 28)


def test_augmentation_shapes_randomness_and_seeding(tmp_path: Path) -> None:
    path = write_rgb(tmp_path / "a.png", size=(48, 36), seed=9)
    samples = [Sample(str(path), 0)]
    pre = IMAGENET_PREPROCESS.at_size(32)
    evaluation = ImageDataset(samples, pre)
    assert torch.equal(evaluation[0][0], evaluation[0][0])  # eval is deterministic
    for level in ("light", "strong"):
        free = ImageDataset(samples, pre, augment=level)
        first, second = free[0][0], free[0][0]
        assert first.shape == (3, 32, 32) and first.dtype == torch.float32
        assert not torch.equal(first, second)
        seeded = ImageDataset(samples, pre, augment=level, seed=5)
        replay = ImageDataset(samples, pre, augment=level, seed=5)
        draws = [seeded[0][0] for _ in range(3)]  # three epochs of one sample
        assert all(torch.equal(d, replay[0][0]) for d in draws)  # the same sequence replays
        assert not torch.equal(draws[0], draws[1])  # and it varies from epoch to epoch
        pinned = ImageDataset(samples, pre, augment=level, seed=5)
        pinned.set_epoch(1)
        assert not torch.equal(pinned[0][0], draws[0])
    nhwc = ImageDataset(samples, dataclasses.replace(pre, layout="NHWC"), augment="strong")
    assert nhwc[0][0].shape == (32, 32, 3)
    with pytest.raises(DataError, match="unknown augmentation"):
        build_augmentation("extreme", pre)


def test_no_flip_never_mirrors_and_digits_forbid_flips(tmp_path: Path) -> None:
    halves = np.zeros((40, 40, 3), np.uint8)
    halves[:, 20:] = 255  # black left half, white right half
    path = tmp_path / "halves.png"
    Image.fromarray(halves).save(path)
    pre = IMAGENET_PREPROCESS.at_size(32)
    for level in ("light", "strong"):
        mirrored = {}
        for flip in (True, False):
            data = ImageDataset([Sample(str(path), 0)], pre, augment=level, flip=flip, seed=1)
            draws = [data[0][0].mean(0) for _ in range(40)]
            mirrored[flip] = sum(bool(d[:, :16].mean() > d[:, 16:].mean()) for d in draws)
        assert mirrored[False] == 0 and mirrored[True] >= 5, (level, mirrored)
    assert not mirror_safe(load_source("builtin:digits"))
    assert mirror_safe(load_source(make_image_folder(tmp_path / "folder", {"a": 3, "b": 3})))


def test_strong_augmentation_fills_borders_with_edge_pixels_not_black() -> None:
    # A white image stays white everywhere: a constant fill would leave black corners.
    pre = Preprocess(mean=(0.0,), std=(1.0,), scale=1.0, resize=32, crop=32)
    transform = build_augmentation("strong", pre)
    torch.manual_seed(0)
    for _ in range(10):
        out = np.asarray(transform(_solid((255, 255, 255), (32, 32))))
        assert out.shape == (32, 32, 3) and out.min() > 150


def test_symlink_cycles_and_broken_links_do_not_hang_or_crash(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "d", {"a": 3, "b": 3})
    os.symlink(tmp_path / "d" / "a", tmp_path / "d" / "a" / "loop")
    os.symlink(tmp_path / "nowhere.png", tmp_path / "d" / "b" / "dangling.png")
    split = load_source(str(tmp_path / "d"))
    assert sum(split.counts(p)[0] for p in ("train", "val", "test")) == 3
    assert [(os.path.basename(p), r) for p, r in split.skipped] == [
        ("dangling.png", "broken symlink")
    ]


def test_dataset_pickles_for_dataloader_workers(tmp_path: Path) -> None:
    path = write_rgb(tmp_path / "a.png", seed=1)
    dataset = ImageDataset(
        [Sample(str(path), 0)], IMAGENET_PREPROCESS.at_size(16), augment="strong"
    )
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone[0][0].shape == (3, 16, 16)


@pytest.mark.parametrize("size", [(300, 200), (199, 401), (256, 256)])
def test_eval_preprocessing_matches_torchvision_reference(size: tuple[int, int]) -> None:
    from torchvision import transforms

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    reference = transforms.Compose(
        [
            transforms.Resize(256),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_PREPROCESS.mean, IMAGENET_PREPROCESS.std),
        ]
    )(img)
    np.testing.assert_allclose(
        preprocess_image(img, IMAGENET_PREPROCESS), reference.numpy(), atol=1e-5
    )


def test_relative_source_path_gives_absolute_refs(tmp_path: Path, monkeypatch) -> None:
    make_image_folder(tmp_path / "rel", {"a": 3, "b": 3})
    monkeypatch.chdir(tmp_path)
    split = load_source("rel")
    assert split.source == str(tmp_path / "rel")
    assert all(os.path.isabs(s.ref) for s in split.train + split.val + split.test)


def test_dark_16bit_and_float_images_keep_their_brightness(tmp_path: Path) -> None:
    dark = write_gray16_png(tmp_path / "dark.png", 1)  # nearly black, must not become white
    assert np.asarray(open_image(dark, channels=1)).max() == 0
    ramp = Image.fromarray(np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4), mode="F")
    ramp.save(tmp_path / "ramp.tif")
    pixels = np.asarray(open_image(tmp_path / "ramp.tif", channels=1))
    assert pixels.min() == 0 and pixels.max() == 255


def test_single_channel_strong_augmentation(tmp_path: Path) -> None:
    mnist = Preprocess(mean=(0.5,), std=(0.5,), resize=28, crop=28, channels=1)
    dataset = ImageDataset([Sample("builtin:digits#5", 5)], mnist, augment="strong", seed=0)
    tensor, label = dataset[0]
    assert tensor.shape == (1, 28, 28) and label == 5
    assert tensor.min() >= -1 and tensor.max() <= 1


def test_seeded_augmentation_replays_and_varies_across_epochs_in_workers(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader

    paths = [write_rgb(tmp_path / f"{i}.png", size=(20, 20), seed=i) for i in range(4)]
    dataset = ImageDataset(
        [Sample(str(p), 0) for p in paths], IMAGENET_PREPROCESS.at_size(16), augment="light", seed=3
    )

    def two_epochs() -> list[torch.Tensor]:
        loader = DataLoader(
            dataset, batch_size=2, num_workers=2, generator=torch.Generator().manual_seed(0)
        )
        return [torch.cat([x for x, _ in loader]) for _ in range(2)]

    first, again = two_epochs(), two_epochs()
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], first[1])


def test_csv_without_train_rows_is_a_data_error_naming_the_split_column(tmp_path: Path) -> None:
    for i in range(4):
        write_rgb(tmp_path / f"{i}.png", seed=i)
    (tmp_path / "labels.csv").write_text(
        "path,label,split\n"
        + "".join(f"{i}.png,{c},{'val' if i < 2 else 'test'}\n" for i, c in enumerate("abab"))
    )
    with pytest.raises(DataError, match="only test/val rows; mark some rows train"):
        load_source(str(tmp_path / "labels.csv"))
