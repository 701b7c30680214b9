"""Hostile model files and archives: nothing outside its folder is read or written, every bad file
is one clear ZooError, and a model that crashes onnxruntime cannot take `zoo` down."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from httpserver import HTML_PAGE, LFS_POINTER, tiny_model_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnx_builders import gemm_head
from test_archive import _file, _special, make_tar
from test_cache import catalog_of, entry

from cli import main
from zoo import cache, sandbox
from zoo.cache import fetch
from zoo.errors import InvalidModelFile, UnsafeFile, UnsupportedModel, ZooError
from zoo.onnxfile import load_onnx

REPO = Path(__file__).resolve().parent.parent
WEIGHTS = np.arange(12, dtype=np.float32).reshape(3, 4)

# ----------------------------------------------------------------------------- watching opens

_watched: set[str] = set()
_opened: list[str] = []


def _audit(event: str, args: tuple) -> None:
    # Python's audit hook sees every open() in this process, onnx's external-data loader included.
    if event == "open" and _watched and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(args[0])
        if os.path.realpath(path) in _watched:
            _opened.append(path)


sys.addaudithook(_audit)


def _atime_is_tracked(folder: Path) -> bool:
    """Whether reading a file here updates its access time (not on `noatime` mounts)."""
    control = folder / ".atime-control"
    control.write_bytes(b"x")
    os.utime(control, (0, control.stat().st_mtime))
    control.read_bytes()
    tracked = control.stat().st_atime > 0
    control.unlink()
    return tracked


@pytest.fixture
def sentinel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A file outside every model folder, holding exactly the bytes a hostile model asks for.

    Three witnesses say whether it was read: Python's audit hook (open() in Python), a wrapper
    around onnx's C-level external-data opener, and the file's access time where the mount keeps it.
    """
    from onnx import external_data_helper

    path = tmp_path / "secret.bin"
    path.write_bytes(WEIGHTS.tobytes())
    _watched.add(os.path.realpath(path))
    _opened.clear()
    real_open_fd = external_data_helper._open_external_data_fd

    def watched_open_fd(base_dir: str, location: str, *args: object) -> int:
        _opened.append(os.path.join(base_dir, location))  # any external read is one too many here
        return real_open_fd(base_dir, location, *args)

    monkeypatch.setattr(external_data_helper, "_open_external_data_fd", watched_open_fd)
    atime_tracked = _atime_is_tracked(tmp_path)
    os.utime(path, (0, path.stat().st_mtime))
    yield path
    _watched.clear()
    if atime_tracked:
        assert path.stat().st_atime == 0, "the sentinel outside the model folder was read"


@pytest.fixture
def untouchable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if onnxruntime or onnx2torch is handed the model."""
    import onnx2torch
    import onnxruntime

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a hostile model reached onnxruntime or onnx2torch")

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)
    monkeypatch.setattr(onnx2torch, "convert", refuse)


def external_model(folder: Path, location: str, *, offset: int = 0, length: int | None = None) -> Path:  # fmt: skip
    """A Gemm model in `folder` whose weight W lives in external data at `location`."""
    weight = numpy_helper.from_array(WEIGHTS, "W")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    info = {"location": location, "offset": str(offset)}
    info["length"] = str(length if length is not None else WEIGHTS.nbytes)
    for key, value in info.items():
        weight.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)],
        "ext",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _escape_case(kind: str, root: Path, secret: Path) -> Path:
    """A model under `root` whose external data reaches `secret` in the way `kind` names."""
    if kind == "dotdot":
        return external_model(root / "a" / "b", "../../secret.bin")
    if kind == "sub-dotdot":
        (root / "m" / "sub").mkdir(parents=True)
        return external_model(root / "m", "sub/../../secret.bin")
    if kind == "absolute":
        return external_model(root / "m", str(secret))
    folder = root / "m"
    folder.mkdir()
    link = folder / "w.bin"
    if kind == "symlink":
        link.symlink_to(secret)
    else:
        os.link(secret, link)
        _watched.add(os.path.realpath(link))
    return external_model(folder, "w.bin")


ESCAPES = {
    "dotdot": "leaves the model folder",
    "sub-dotdot": "leaves the model folder",
    "absolute": "absolute path",
    "symlink": "symbolic link",
    "hardlink": "hard link",
}


@pytest.mark.parametrize("kind", list(ESCAPES))
def test_external_data_outside_the_folder_is_refused_unread(
    kind: str, tmp_path: Path, sentinel: Path, untouchable: None
) -> None:
    from pipeline.convert import import_model

    path = _escape_case(kind, tmp_path, sentinel)
    for load in (load_onnx, import_model):
        with pytest.raises(UnsafeFile, match=ESCAPES[kind]):
            load(path)
    models = tmp_path / "models"
    # fetch copies only the .onnx into its staging folder: the reference is refused there too.
    with pytest.raises((UnsafeFile, InvalidModelFile)):
        fetch(str(path), models_dir=models, catalog=catalog_of(), progress=False)
    assert _opened == []  # the secret's bytes never entered this process
    assert not (models / "model").exists() and list((models / "blobs").iterdir()) == []


@pytest.mark.parametrize(
    ("offset", "length"), [(WEIGHTS.nbytes, None), (0, WEIGHTS.nbytes + 4), (-4, None)]
)
def test_external_data_past_the_end_of_its_file_is_refused(
    tmp_path: Path, untouchable: None, offset: int, length: int | None
) -> None:
    from pipeline.convert import import_model

    (tmp_path / "w.bin").write_bytes(WEIGHTS.tobytes())
    path = external_model(tmp_path, "w.bin", offset=offset, length=length)
    for load in (load_onnx, import_model):
        with pytest.raises(InvalidModelFile, match="past the end"):
            load(path)


def test_export_writes_only_inside_its_output_folder(tmp_path: Path) -> None:
    import torch

    from pipeline.export.write import export_model

    def tree() -> set[str]:
        return {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")}

    (tmp_path / "neighbour.onnx.data").write_bytes(b"keep me")
    before = tree()
    # Weights over onnx's 1 KiB external-data threshold (a smaller model gets no .data file).
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 2)).eval()
    out = tmp_path / "out" / "model.onnx"
    # A zero threshold forces external data: the data file is named after the model, beside it.
    result = export_model(
        model,
        out,
        input_name="image",
        layout="NCHW",
        input_shape=(3, 16, 16),
        metadata={"labels": ["a", "b"]},
        external_data_threshold_bytes=0,
    )
    assert result.external_data == out.parent / "model.onnx.data"
    new = tree() - before
    assert new and all(name.startswith("out") for name in new), new
    assert (tmp_path / "neighbour.onnx.data").read_bytes() == b"keep me"
    locations = {
        entry.value
        for tensor in onnx.load(str(out), load_external_data=False).graph.initializer
        for entry in tensor.external_data
        if entry.key == "location"
    }
    assert locations == {"model.onnx.data"}


# ----------------------------------------------------------------------------- not models


def _deep_protobuf(depth: int = 3000) -> bytes:
    """ModelProto.graph -> node -> attribute.g -> node -> ... nested `depth` times."""

    def field(number: int, payload: bytes) -> bytes:
        size, varint = len(payload), b""
        while True:
            byte, size = size & 0x7F, size >> 7
            varint += bytes([byte | (0x80 if size else 0)])
            if not size:
                break
        return bytes([(number << 3) | 2]) + varint + payload

    graph = b""
    for _ in range(depth):
        graph = field(1, field(5, field(6, graph)))  # Graph.node / Node.attribute / Attribute.g
    return b"\x08\x08" + field(7, graph)  # ir_version 8, then ModelProto.graph


NOT_MODELS: dict[str, Callable[[], bytes]] = {
    "truncated": lambda: tiny_model_bytes()[: len(tiny_model_bytes()) // 2],
    "random": lambda: np.random.default_rng(0).bytes(4096),
    "empty": lambda: b"",
    "lfs-pointer": lambda: LFS_POINTER,
    "html": lambda: HTML_PAGE,
    "deep-protobuf": _deep_protobuf,
}


@pytest.mark.parametrize("kind", list(NOT_MODELS))
def test_not_a_model_is_one_clear_error_from_the_real_cli(kind: str, tmp_path: Path) -> None:
    path = tmp_path / f"{kind}.onnx"
    path.write_bytes(NOT_MODELS[kind]())
    models = tmp_path / "models"
    process = subprocess.run(
        [
            sys.executable,
            "-c",
            "import cli; cli.run()",
            "--models-dir",
            str(models),
            "fetch",
            str(path),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert process.returncode == 1, process.stderr
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zoo: error: "), process.stderr
    assert "Traceback" not in process.stderr and "internal error" not in process.stderr
    assert not (models / kind).exists()
    # `zoo inspect PATH` (no fetch) says the same kind of thing, in-process.
    result = CliRunner().invoke(
        main, ["--models-dir", str(models), "inspect", str(path)], catch_exceptions=False
    )
    assert result.exit_code == 1 and result.stderr.startswith("zoo: error: "), result.stderr


def test_deep_protobuf_is_invalid_model_file(tmp_path: Path) -> None:
    path = tmp_path / "deep.onnx"
    path.write_bytes(_deep_protobuf())
    with pytest.raises(InvalidModelFile):
        load_onnx(path)


# ----------------------------------------------------------------------------- crashes in a child

SEGFAULT_ON_RUN = (
    "import os, signal, onnxruntime\n"
    "onnxruntime.InferenceSession.run = lambda *a, **k: os.kill(os.getpid(), signal.SIGSEGV)\n"
)


def test_a_model_crashing_onnxruntime_is_refused_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Simulated: the child's own onnxruntime is made to segfault in session.run, after the real
    # child program has created the session. No genuinely crashing model is pinned here.
    monkeypatch.setattr(sandbox, "CHILD_SCRIPT", SEGFAULT_ON_RUN + sandbox.CHILD_SCRIPT)
    source = tmp_path / "crashy.onnx"
    source.write_bytes(tiny_model_bytes())
    models = tmp_path / "models"
    with pytest.raises(UnsupportedModel, match="crashes onnxruntime .*SIGSEGV while running it"):
        fetch(str(source), models_dir=models, catalog=catalog_of(), progress=False)
    assert not (models / "crashy").exists() and list((models / "blobs").iterdir()) == []
    assert [p.name for p in models.iterdir() if p.name.startswith(".fetch")] == []


def test_the_cli_reports_a_crash_in_the_child(tmp_path: Path) -> None:
    source = tmp_path / "crashy.onnx"
    source.write_bytes(tiny_model_bytes())
    program = (
        "import zoo.sandbox as s\n"
        "s.CHILD_SCRIPT = 'import os; os.abort()\\n' + s.CHILD_SCRIPT\n"
        "import cli; cli.run()\n"
    )
    process = subprocess.run(
        [sys.executable, "-c", program, "--models-dir", str(tmp_path / "m"), "fetch", str(source)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert process.returncode == 1
    assert "this model crashes onnxruntime (killed by SIGABRT" in process.stderr
    assert "Traceback" not in process.stderr


def test_a_hanging_child_is_refused_in_bounded_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sandbox, "CHILD_SCRIPT", "import time; time.sleep(60)")
    source = tmp_path / "m.onnx"
    source.write_bytes(tiny_model_bytes())
    with pytest.raises(UnsupportedModel, match="did not finish"):
        sandbox.probe_in_child(source, timeout=1.0)


def test_the_child_opens_and_runs_real_models(tmp_path: Path) -> None:
    for index, model_bytes in enumerate((tiny_model_bytes(), gemm_head().SerializeToString())):
        path = tmp_path / f"{index}.onnx"
        path.write_bytes(model_bytes)
        sandbox.probe_in_child(path)  # no exception: these do not crash
    assert signal.SIGSEGV  # the platform has the signal the crash test relies on


def test_catalog_files_with_their_sha256_skip_the_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(cache, "probe_in_child", lambda path, **_: calls.append(Path(path)))
    model = tiny_model_bytes(seed=1)
    source = tmp_path / "tiny-1.onnx"
    source.write_bytes(model)
    trusted = catalog_of(entry((str(source),)))
    fetch("tiny-1", models_dir=tmp_path / "a", catalog=trusted, progress=False)
    assert calls == []
    # The same file by path is not vouched for by the catalog: it opens in the child.
    fetch(str(source), models_dir=tmp_path / "b", catalog=catalog_of(), progress=False)
    assert calls == [tmp_path / "b" / calls[0].relative_to(tmp_path / "b")]


# ----------------------------------------------------------------------------- archives


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


HOSTILE_MEMBERS = {
    "dotdot": (lambda: _file("../evil"), "'..'"),
    "absolute": (lambda: _file("/tmp/zoo-hostile-absolute"), "absolute"),
    "symlink-out": (lambda: _special("m/link", tarfile.SYMTYPE, "../../outside"), "symbolic"),
    "hardlink-out": (lambda: _special("m/hard", tarfile.LNKTYPE, "../../outside"), "hard link"),
    "fifo": (lambda: _special("m/fifo", tarfile.FIFOTYPE), "FIFO"),
    "device": (lambda: _special("m/tty", tarfile.CHRTYPE), "device"),
}


@pytest.mark.parametrize("kind", list(HOSTILE_MEMBERS))
def test_hostile_archive_is_refused_and_writes_nothing(kind: str, tmp_path: Path) -> None:
    member, says = HOSTILE_MEMBERS[kind]
    (tmp_path / "outside").write_bytes(b"keep")
    archive = make_tar(
        tmp_path / "hostile.tar.gz", [member(), _file("m/model.onnx", tiny_model_bytes())]
    )
    before = _tree(tmp_path)
    models = tmp_path / "models"
    with pytest.raises(UnsafeFile, match=says):
        fetch(str(archive), models_dir=models, catalog=catalog_of(), progress=False)
    assert _tree(tmp_path) - before == {"models", "models/blobs", "models/.locks", "models/.locks/hostile.lock"}  # fmt: skip
    assert (tmp_path / "outside").read_bytes() == b"keep"
    assert not Path("/tmp/zoo-hostile-absolute").exists() and not (tmp_path / "evil").exists()


def test_apple_double_beside_the_model_is_never_chosen(tmp_path: Path) -> None:
    real = tiny_model_bytes(seed=4)
    archive = make_tar(
        tmp_path / "m.tar.gz",
        [
            _file("m/._model.onnx", b"\x00\x05\x16\x07AppleDouble"),
            _file("m/model.onnx", real),
            _file("__MACOSX/m/._model.onnx", b"\x00\x05\x16\x07"),
        ],
    )
    result = fetch(str(archive), models_dir=tmp_path / "models", catalog=catalog_of(), progress=False)  # fmt: skip
    assert result.path.read_bytes() == real


def test_two_members_named_like_the_model_are_refused(tmp_path: Path) -> None:
    archive = make_tar(
        tmp_path / "m.tar.gz",
        [
            _file("a/model.onnx", tiny_model_bytes(seed=1)),
            _file("b/model.onnx", tiny_model_bytes(seed=2)),
        ],  # fmt: skip
    )
    with pytest.raises(UnsafeFile, match="2 candidate models"):
        fetch(str(archive), models_dir=tmp_path / "models", catalog=catalog_of(), progress=False)


# ----------------------------------------------------------------------------- fuzzing

BASE_MODEL = gemm_head().SerializeToString()
_fuzz_root = Path(tempfile.mkdtemp(prefix="zoo-fuzz-"))
_outcomes: dict[str, int] = {"fetched": 0, "refused": 0}
_inspect_leaks: list[BaseException] = []  # non-ZooErrors out of `zoo inspect`, judged below


@pytest.mark.slow
@pytest.mark.timeout(240)
@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    edits=st.lists(
        st.tuples(st.integers(0, len(BASE_MODEL) - 1), st.integers(0, 255)), min_size=1, max_size=6
    ),
    cut=st.one_of(st.none(), st.integers(1, len(BASE_MODEL))),
)
def test_fuzzed_models_fetch_and_inspect_or_fail_with_a_zoo_error(
    edits: list[tuple[int, int]], cut: int | None
) -> None:
    from pipeline.surgery.inspect import inspect_model

    data = bytearray(BASE_MODEL)
    for position, value in edits:
        data[position] = value
    path = _fuzz_root / "fuzz.onnx"
    path.write_bytes(bytes(data[:cut]))
    try:
        result = fetch(
            str(path),
            models_dir=_fuzz_root / "models",
            catalog=catalog_of(),
            force=True,
            progress=False,  # fmt: skip
        )
    except ZooError:
        _outcomes["refused"] += 1
        return
    _outcomes["fetched"] += 1
    # Only what the child process opened without crashing reaches onnxruntime in this process.
    try:
        inspect_model(result.path, name="fuzz")
    except ZooError:
        pass
    except Exception as exc:  # judged in the next test, so that one known gap does not hide others
        _inspect_leaks.append(exc)


def test_fuzzing_reached_both_outcomes_and_inspect_leaks_only_the_known_gap() -> None:
    # Runs after the fuzz test (file order): the mutations must both break and spare the model.
    if sum(_outcomes.values()) == 0:
        pytest.skip("the fuzz test did not run")
    assert _outcomes["fetched"] > 0 and _outcomes["refused"] > 0, _outcomes
    # Every failure of zoo inspect on a damaged model must be a ZooError (one clear line).
    assert _inspect_leaks == [], _inspect_leaks[:3]
