"""zoo.archive: the model comes out of a .tar.gz, nothing else does, and hostile archives are refused."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from zoo.archive import extract_member
from zoo.errors import InvalidModelFile, UnsafeFile

MODEL = b"\x08\x07model bytes"


def _file(name: str, data: bytes = MODEL) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, None


def make_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_extracts_model_by_exact_name_ignoring_apple_double(tmp_path: Path) -> None:
    archive = make_tar(
        tmp_path / "m.tar.gz",
        [
            _file("resnet/._model.onnx", b"\x00\x05\x16\x07 AppleDouble"),
            _file("__MACOSX/resnet/._model.onnx", b"\x00\x05\x16\x07"),
            _file("resnet/model.onnx.bak", b"old"),
            _file("resnet/model.onnx"),
            _file("resnet/test_data_set_0/input_0.pb", b"pb"),
        ],
    )
    out = tmp_path / "out"
    path = extract_member(archive, "model.onnx", out)
    assert path == out / "model.onnx" and path.read_bytes() == MODEL
    assert all_files(out) == ["model.onnx"]  # no staging folder, no test data, no metadata


def test_without_exact_name_takes_the_only_onnx(tmp_path: Path) -> None:
    archive = make_tar(
        tmp_path / "m.tar.gz",
        [_file("squeezenet/squeezenet1.1.onnx"), _file("squeezenet/._squeezenet1.1.onnx", b"x")],
    )
    assert (
        extract_member(archive, "squeezenet1.1-7.onnx", tmp_path / "out").name
        == "squeezenet1.1.onnx"
    )
    assert extract_member(archive, None, tmp_path / "out2").read_bytes() == MODEL


def test_no_model_is_refused(tmp_path: Path) -> None:
    archive = make_tar(tmp_path / "m.tar.gz", [_file("readme.txt", b"hi"), _file("._x.onnx", b"x")])
    with pytest.raises(InvalidModelFile, match="holds no model.onnx"):
        extract_member(archive, "model.onnx", tmp_path / "out")


def test_two_members_with_the_name_are_refused(tmp_path: Path) -> None:
    archive = make_tar(
        tmp_path / "m.tar.gz", [_file("a/model.onnx"), _file("b/model.onnx", b"other")]
    )
    out = tmp_path / "out"
    with pytest.raises(UnsafeFile, match="2 candidate models"):
        extract_member(archive, "model.onnx", out)
    assert all_files(out) == []


@pytest.mark.parametrize(
    ("member", "says"),
    [
        pytest.param(lambda: _file("../evil"), "'..'", id="dotdot"),
        pytest.param(lambda: _file("resnet/../../evil"), "'..'", id="nested-dotdot"),
        pytest.param(lambda: _file("/tmp/zoo-evil-absolute"), "absolute", id="absolute"),
        pytest.param(
            lambda: _special("resnet/link", tarfile.SYMTYPE, "/etc/passwd"),
            "symbolic link",
            id="symlink",
        ),
        pytest.param(
            lambda: _special("resnet/hard", tarfile.LNKTYPE, "resnet/model.onnx"),
            "hard link",
            id="hardlink",
        ),
        pytest.param(lambda: _special("resnet/fifo", tarfile.FIFOTYPE), "FIFO", id="fifo"),
        pytest.param(lambda: _special("resnet/tty", tarfile.CHRTYPE), "device", id="chardev"),
        pytest.param(lambda: _special("resnet/disk", tarfile.BLKTYPE), "device", id="blockdev"),
    ],
)
def test_unsafe_members_refuse_the_archive(
    tmp_path: Path, member: Callable[[], tuple[tarfile.TarInfo, bytes | None]], says: str
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    # The hostile member comes first and last: it must not matter where it sits.
    archive = make_tar(tmp_path / "m.tar.gz", [member(), _file("resnet/model.onnx"), member()])
    out = work / "out"
    with pytest.raises(UnsafeFile, match=says):
        extract_member(archive, "model.onnx", out)
    assert all_files(work) == ["out"]
    assert not (tmp_path / "evil").exists() and not Path("/tmp/zoo-evil-absolute").exists()


def test_garbage_is_not_an_archive(tmp_path: Path) -> None:
    garbage = tmp_path / "m.tar.gz"
    garbage.write_bytes(b"<html>not an archive</html>")
    with pytest.raises(InvalidModelFile, match="not a readable"):
        extract_member(garbage, "model.onnx", tmp_path / "out")
