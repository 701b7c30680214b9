"""Distributed `zoo adapt` on the CPU with gloo: torch's elastic launcher, DDP, sharded data."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli import _argv_of, main
from pipeline.core import distributed
from pipeline.core.distributed import DistContext, Launch, interleave
from zoo.errors import TrainingError, ZooError

REPO = Path(__file__).resolve().parent.parent
SMALL = ("--image-size", "64", "--device", "cpu")


def zoo_argv(*args: str, models_dir: Path) -> list[str]:
    """`zoo --models-dir DIR ARGS` as a fresh Python process running this checkout's cli.py."""
    return [sys.executable, "-c", "import cli; cli.run()", "--models-dir", str(models_dir), *args]


def run_zoo(*args: str, models_dir: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        zoo_argv(*args, models_dir=models_dir),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def zoo_in_process(*args: str, models_dir: Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(
        main, ["--models-dir", str(models_dir), *args], catch_exceptions=False
    )
    return result.exit_code, result.stdout, result.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_folder(root: Path, *, classes: int, per_class: int, seed: int = 0) -> Path:
    """Class folders of random 48x48 PNGs, each class with its own tint."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for label in range(classes):
        folder = root / f"class{label}"
        folder.mkdir(parents=True)
        for index in range(per_class):
            pixels = rng.integers(0, 200, (48, 48, 3)).astype(np.int16)
            pixels[..., label % 3] += 55
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{index}.png")
    return root


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(path)).items() if k.startswith("model.")}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, bundled_workspace: Path) -> Path:
    models_dir = tmp_path_factory.mktemp("distributed")
    shutil.copytree(bundled_workspace, models_dir, dirs_exist_ok=True, symlinks=True)
    return models_dir


# --- pieces -------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [2, 3, 5])
def test_shards_interleave_back_in_order(world: int) -> None:
    items = torch.arange(13 * 2).reshape(13, 2)
    parts = [items[list(DistContext(rank=r, world_size=world).shard(13))] for r in range(world)]
    assert sum(len(p) for p in parts) == 13
    assert torch.equal(interleave(parts), items)
    arrays = [p.numpy() for p in parts]
    assert np.array_equal(interleave(arrays), items.numpy())
    # More workers than items: the idle ranks contribute None (see shard_features).
    few = items[:2]
    assert torch.equal(interleave([few[0:1], few[1:2], *[None] * (world - 2)]), few)


def test_global_batch_is_split_evenly() -> None:
    assert DistContext(rank=1, world_size=4).per_rank_batch(32) == 8
    with pytest.raises(TrainingError, match="multiple of 3"):
        DistContext(world_size=3).per_rank_batch(32)


def test_a_single_process_is_the_identity_of_every_workers_method() -> None:
    single = distributed.SINGLE
    logits, labels = torch.randn(3, 2), torch.tensor([0, 1, 1])
    assert single.gather_split(logits, labels) == (logits, labels)
    assert single.gather_split(None, None) == (None, None)
    assert single.mean([0.5, 2.0]) == [0.5, 2.0] and single.broadcast_object(7) == 7
    assert single.shard_features(lambda s: [x * 2 for x in s], [1, 2]) == [2, 4]
    single.check_batch_can_shrink()  # one process may halve its batch
    loader = single.train_loader(list(range(10)), 4, seed=0)
    assert loader.batch_size == 4 and sum(len(b) for b in loader) == 10
    with pytest.raises(TrainingError, match="worker rank 1 ran out of memory"):
        DistContext(rank=1, world_size=2).check_batch_can_shrink()


def test_the_training_loop_sees_no_ranks() -> None:
    """train, fastpath and the checkpoints call Workers methods; only the edge counts processes."""
    import ast

    counted = {"rank", "world_size", "local_rank", "enabled", "backend"}
    names = {m for m in vars(distributed.Workers) if not m.startswith("_")}
    assert names <= set(dir(DistContext)), "DistContext lacks a method of the Workers interface"
    for module in ("train/loop", "train/fastpath", "core/checkpoint"):
        tree = ast.parse((REPO / "pipeline" / f"{module}.py").read_text())
        read = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)} & counted
        assert not read, f"pipeline/{module}.py reads {sorted(read)} of the distributed context"


def test_single_process_needs_no_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_from_env(device="cpu") is distributed.SINGLE
    assert not Launch().requested and Launch(nproc=2).requested and Launch(nnodes=2).requested


def test_sync_bn_is_refused_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TrainingError, match="--sync-bn needs CUDA"):
        distributed.init_from_env(device="cpu", sync_bn=True)


def test_launch_checks_its_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ZooError, match="--rdzv-endpoint"):
        distributed.launch(Launch(nnodes=2), argv=["adapt"])
    with pytest.raises(ZooError, match="--node-rank 2"):
        distributed.launch(Launch(nnodes=2, node_rank=2, rdzv_endpoint="h:1"), argv=["adapt"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ZooError, match="already runs as a worker"):
        distributed.launch(Launch(nproc=2), argv=["adapt"])


def test_worker_command_line_repeats_the_parsed_options(tmp_path: Path) -> None:
    import click

    seen: list[list[str]] = []
    adapt = main.commands["adapt"]
    original = adapt.callback

    @click.pass_context
    def capture(ctx: click.Context, **_: object) -> None:
        seen.append(_argv_of(ctx, skip=("nproc", "nnodes", "node_rank", "rdzv_endpoint")))

    adapt.callback = capture
    try:
        args = ["adapt", "m.onnx", "--classes", "3", "--nproc", "2", "--sync-bn", "--json"]
        for extra in ([], ["--no-flip"], ["--flip"]):
            CliRunner().invoke(
                main, ["--models-dir", str(tmp_path), *args, *extra], catch_exceptions=False
            )
    finally:
        adapt.callback = original
    argv = seen[0]
    assert argv[:3] == ["--models-dir", str(tmp_path), "adapt"]
    assert "--nproc" not in argv and "--sync-bn" in argv and "--json" in argv
    assert argv[argv.index("--classes") + 1] == "3" and argv[-2:] == ["--", "m.onnx"]
    # A three-way switch (unset, --no-flip, --flip) reaches the workers as it was given.
    assert [[a for a in run if "flip" in a] for run in seen] == [[], ["--no-flip"], ["--flip"]]


# --- acceptance: gradient equivalence -------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes x 6 images: 4 train (2 kept), 1 val, 1 test per class."""
    return write_folder(tmp_path_factory.mktemp("tiny"), classes=3, per_class=6)


@pytest.fixture(scope="module")
def initial_head(workspace: Path) -> dict[str, torch.Tensor]:
    """The new head's weights before any step (they depend on the seed alone)."""
    from pipeline.surgery.build import build_model

    onnx_path = workspace / "efficientnet-lite0" / "model.onnx"
    _, adapted = build_model(onnx_path, num_classes=3, hidden=None, dropout=0.0, seed=0)
    return {f"model.{k}": v for k, v in adapted.state_dict().items() if k.startswith("head.")}


FOLDED = "efficientnet-lite0-folded"


@pytest.fixture(scope="module")
def folded_model(tmp_path_factory: pytest.TempPathFactory, workspace: Path) -> str:
    """The bundled weights with BatchNorm folded into the convolutions, fetched via a private catalog.

    Train-mode BatchNorm normalises each worker's half of the batch by its own statistics (sharing
    them needs SyncBatchNorm, which torch runs on CUDA only), so only a model without it can match one
    process to 1e-6.
    """
    import hashlib

    from zoo.bundled import load_pretrained
    from zoo.cache import fetch
    from zoo.catalog import IMAGENET_PREPROCESS, load_catalog

    folder = tmp_path_factory.mktemp("folded")
    path = folder / "lite0-folded.onnx"
    torch.onnx.export(
        load_pretrained(),
        (torch.zeros(1, 3, 224, 224),),
        str(path),
        dynamo=False,
        opset_version=13,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    entry = {
        "name": FOLDED,
        "urls": [path.as_uri()],
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "size": path.stat().st_size,
        "input": {"name": "input", "shape": [None, 3, 224, 224], "layout": "NCHW"},
        "preprocess": IMAGENET_PREPROCESS.to_dict(),
    }
    catalog = folder / "catalog.json"
    catalog.write_text(json.dumps([entry]))
    fetch(FOLDED, models_dir=workspace, catalog=load_catalog(catalog), progress=False)
    return FOLDED


@pytest.mark.slow
@pytest.mark.parametrize(
    ("strategy", "extra"),
    [("feature", ()), ("finetune", ("--unfreeze", "1")), ("full", ())],
)
def test_one_step_on_two_workers_equals_one_process(
    workspace: Path,
    folded_model: str,
    tiny_folder: Path,
    initial_head: dict[str, torch.Tensor],
    tmp_path: Path,
    strategy: str,
    extra: tuple[str, ...],
) -> None:
    # 6 training images, global batch 6: one SGD step (SGD, not Adam: Adam's first step is
    # lr*sign(grad) and would hide a wrongly scaled gradient). Two workers take 3 images each.
    common = (
        "adapt",
        folded_model,
        "--data",
        str(tiny_folder),
        "--classes",
        "3",
        "--strategy",
        strategy,
        *extra,
        "--train-per-class",
        "2",
        "--batch-size",
        "6",
        "--epochs",
        "1",
        "--optimizer",
        "sgd",
        "--lr",
        "0.1",
        *SMALL,
    )
    code, _, err = zoo_in_process(*common, "--out", str(tmp_path / "one"), models_dir=workspace)
    assert code == 0, err
    done = run_zoo(*common, "--out", str(tmp_path / "two"), "--nproc", "2", models_dir=workspace)
    assert done.returncode == 0, done.stderr
    one, two = (
        weights(tmp_path / "one" / "last.safetensors"),
        weights(tmp_path / "two" / "last.safetensors"),
    )
    assert one.keys() == two.keys()
    max_diff = max(float((one[k] - two[k]).abs().max()) for k in one)
    print(f"{strategy}: max abs parameter difference {max_diff:.3g}")
    assert max_diff <= 1e-6
    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert run["distributed"] == {"world_size": 2, "backend": "gloo", "sync_bn": False}
    assert run["data"]["train"] == 6
    # The step moved the head by far more than the tolerance, so the comparison can fail.
    moved = max(float((one[k] - initial_head[k]).abs().max()) for k in initial_head)
    print(f"{strategy}: the step moved the head by up to {moved:.3g}")
    assert moved > 1e-3


# --- acceptance: whole runs ---------------------------------------------------------------


@pytest.mark.slow
def test_nproc_2_on_digits_tests_the_whole_split(workspace: Path, tmp_path: Path) -> None:
    from pipeline.adapt import AdaptOptions, prepare_data

    models_dir = tmp_path / "models"
    shutil.copytree(workspace, models_dir, symlinks=True)
    before = {p.name for p in models_dir.iterdir()} | {".cache"}  # features cache
    done = run_zoo(
        "adapt",
        "efficientnet-lite0",
        "--classes",
        "10",
        "--nproc",
        "2",
        "--epochs",
        "2",
        "--train-per-class",
        "10",
        "--json",
        *SMALL,
        models_dir=models_dir,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)  # one JSON object: only rank 0 printed
    new = {p.name for p in models_dir.iterdir()} - before
    assert new == {Path(result["run_dir"]).name}
    single = prepare_data(AdaptOptions(classes=10), run_dir=None)
    assert result["test_images"] == len(single.test) > 300
    metrics = json.loads((Path(result["run_dir"]) / "metrics.json").read_text())
    assert metrics["num_images"] == len(single.test)
    if result["strategy"] == "feature":  # the solved head ignores --epochs: it runs to convergence
        assert result["stopped"].startswith("converged after")
    else:
        assert result["epochs_run"] == 2


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes x 20 images: 12 train, 4 val, 4 test per class."""
    return write_folder(tmp_path_factory.mktemp("small"), classes=3, per_class=20, seed=1)


def full_run(folder: Path, out: Path, *, epochs: int) -> tuple[str, ...]:
    return (
        "adapt",
        "--data",
        str(folder),
        "--classes",
        "3",
        "--strategy",
        "full",
        "--epochs",
        str(epochs),
        "--batch-size",
        "4",
        "--out",
        str(out),
        *SMALL,
    )


@pytest.mark.slow
def test_two_machines_on_one_host(workspace: Path, small_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    endpoint = f"127.0.0.1:{free_port()}"
    # Both "machines" share this host's cores: one thread each, or OpenMP threads spin-wait.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def start(rank: int) -> subprocess.Popen:
        return subprocess.Popen(
            zoo_argv(
                *full_run(small_folder, out, epochs=1),
                "--nnodes",
                "2",
                "--node-rank",
                str(rank),
                "--rdzv-endpoint",
                endpoint,
                "--json",
                models_dir=workspace,
            ),
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    # Node 0 hosts the rendezvous store: start node 1 once it listens, as a scheduler would.
    nodes = [start(0)]
    host, port = endpoint.split(":")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and nodes[0].poll() is None:
        with socket.socket() as probe:
            if probe.connect_ex((host, int(port))) == 0:
                break
        time.sleep(0.2)
    nodes.append(start(1))
    # Watch both: when one node fails, the other would wait for it until its own timeout.
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and any(node.poll() is None for node in nodes):
        if any(node.poll() not in (None, 0) for node in nodes):
            break
        time.sleep(0.5)
    for node in nodes:
        if node.poll() is None:
            node.kill()
    outputs = [node.communicate(timeout=30) for node in nodes]
    logs = "\n".join(
        f"node {rank} (exit {node.returncode}): {err[-2000:]}"
        for rank, (node, (_, err)) in enumerate(zip(nodes, outputs, strict=True))
    )
    assert all(node.returncode == 0 for node in nodes), logs
    assert json.loads(outputs[0][0])["test_images"] == 12
    assert outputs[1][0] == ""  # node 1 holds rank 1, which prints nothing
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "done" and run["distributed"]["world_size"] == 2


def _worker_pid(launcher: int, rank: int) -> int | None:
    """The pid of the child of `launcher` whose environment says RANK=rank."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
def test_a_killed_worker_ends_the_run_and_resume_finishes_it(
    workspace: Path, small_folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    launcher = subprocess.Popen(
        zoo_argv(*full_run(small_folder, out, epochs=3), "--nproc", "2", models_dir=workspace),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not (out / "last.safetensors").exists():
            assert launcher.poll() is None, launcher.communicate()[1]
            assert time.monotonic() < deadline, "no epoch finished in time"
            time.sleep(0.05)
        victim = _worker_pid(launcher.pid, rank=1)
        assert victim is not None
        survivor = _worker_pid(launcher.pid, rank=0)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        _, err = launcher.communicate(timeout=90)
        assert time.monotonic() - killed_at < 60
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    assert "worker rank 1 was killed by SIGKILL" in err and "--resume --nproc 2" in err
    assert survivor is None or not Path(f"/proc/{survivor}").exists() or _is_zombie(survivor)
    saved = weights(out / "last.safetensors")  # the last complete epoch reads back whole
    assert saved
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "training"

    done = run_zoo("adapt", "--out", str(out), "--resume", "--nproc", "2", models_dir=workspace)
    assert done.returncode == 0, done.stderr
    assert "resuming after epoch" in done.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "done" and run["epochs_run"] == 3
    assert len((out / "history.csv").read_text().strip().splitlines()) == 1 + 3


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
