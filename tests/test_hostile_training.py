"""Training under attack and accident: divergence, a kill mid-checkpoint, out of memory, and a
checkpoint that is a pickle carrying code."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train import _data, _fit, _model

from pipeline.core.checkpoint import load_resume_point, load_weights
from pipeline.train.loop import BEST_CHECKPOINT, RESUME_POINT
from zoo.errors import InvalidModelFile, TrainingError

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


def _plain() -> torch.nn.Module:
    # No BatchNorm: it makes the tiny model scale-invariant, and then no learning rate diverges.
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))


def test_diverging_learning_rate_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    # Warm-up keeps epoch 1 sane; the full learning rate of 1e5 then sends the loss to NaN.
    with pytest.raises(TrainingError, match=r"nan in epoch 2.*best checkpoint \(epoch 1\) is kept"):
        _fit_model(_plain(), tmp_path, epochs=4, optimizer="sgd", lr=1e5, warmup_epochs=3.0)
    kept = _plain()
    load_weights(kept, tmp_path / BEST_CHECKPOINT)
    assert all(torch.isfinite(t).all() for t in kept.state_dict().values())
    _, state = load_resume_point(tmp_path / RESUME_POINT, model=_plain())
    assert state["epoch"] == 1
    assert list(tmp_path.rglob("*.onnx")) == []  # nothing exported from a diverged run


CHILD = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
import pipeline.core.checkpoint as checkpoint
from test_train import _fit

real_write = checkpoint.atomic_write
signal_file = Path({signal_file!r})

def stall_in_epoch_two(path, write, **options):
    if path.name == {resume!r} and signal_file.with_suffix(".epoch1").exists():
        def half(tmp):
            write(tmp)
            size = Path(tmp).stat().st_size
            with open(tmp, "r+b") as handle:
                handle.truncate(size // 2)
            signal_file.touch()
            time.sleep(120)  # killed here, half-way through the write
        return real_write(path, half, **options)
    real_write(path, write, **options)
    if path.name == {resume!r}:
        signal_file.with_suffix(".epoch1").touch()

checkpoint.atomic_write = stall_in_epoch_two
_fit(Path({run_dir!r}), epochs=3)
"""


@pytest.mark.slow
def test_killed_mid_checkpoint_the_previous_one_loads_and_resume_works(tmp_path: Path) -> None:
    _, reference = _fit(tmp_path / "reference", epochs=3)
    run_dir, signal_file = tmp_path / "run", tmp_path / "writing"
    script = CHILD.format(
        tests=str(TESTS), signal_file=str(signal_file), resume=RESUME_POINT, run_dir=str(run_dir)
    )
    child = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not signal_file.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert signal_file.exists(), "the child never reached the second checkpoint write"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=30)
    assert list(run_dir.glob(f".{RESUME_POINT}.*.tmp"))  # the half-written file is left behind
    _, state = load_resume_point(run_dir / RESUME_POINT, model=_model())
    assert state["epoch"] == 1  # the previous checkpoint, whole
    model, resumed = _fit(run_dir, epochs=3, resume=True)
    assert [r.epoch for r in resumed.history] == [1, 2, 3]
    assert [r.val_loss for r in resumed.history] == pytest.approx(
        [r.val_loss for r in reference.history]
    )


class OutOfMemoryAbove(torch.nn.Module):
    """The tiny model, raising the real CUDA out-of-memory error for batches above `limit`."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.inner, self.limit = _model(), limit

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs.shape[0] > self.limit and self.training:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner(inputs)


def _fit_model(model: torch.nn.Module, tmp_path: Path, **config: object):
    from test_train import HeadOnlyPlan
    from torch.utils.data import DataLoader

    from pipeline.train.loop import TrainConfig, fit

    train, val = _data(96, 0), _data(48, 1)
    return fit(
        model,
        HeadOnlyPlan(),
        make_train_loader=lambda bs: DataLoader(train, batch_size=bs, shuffle=True),
        val_loader=DataLoader(val, batch_size=32),
        config=TrainConfig(**{"epochs": 2, "batch_size": 32, "lr": 1e-2, **config}),  # type: ignore[arg-type]
        run_dir=tmp_path,
        log=lambda _: None,
    )


def test_out_of_memory_backs_off_the_batch_size_and_completes(tmp_path: Path) -> None:
    state = _fit_model(OutOfMemoryAbove(limit=8), tmp_path)
    assert state.epoch == 2 and state.batch_size <= 8
    assert (tmp_path / BEST_CHECKPOINT).exists()


def test_out_of_memory_at_batch_one_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="batch size 1") as caught:
        _fit_model(OutOfMemoryAbove(limit=0), tmp_path)
    assert "\n" not in str(caught.value)


class _Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("name", [BEST_CHECKPOINT, RESUME_POINT])
def test_a_pickle_checkpoint_with_code_is_refused_unrun(name: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / name
    torch.save({"weight": _Payload(marker)}, path)  # a torch .pt file: a zip with a pickle inside
    with pytest.raises(InvalidModelFile, match="safetensors|resume point"):
        if name == BEST_CHECKPOINT:
            load_weights(_model(), path)
        else:
            load_resume_point(path, model=_model())
    assert not marker.exists()
    if name == RESUME_POINT:  # and `--resume` over such a file refuses it the same way
        with pytest.raises(InvalidModelFile):
            _fit(tmp_path, epochs=1, resume=True)
    assert not marker.exists()


def test_no_code_path_unpickles() -> None:
    # torch.load without weights_only=True, pickle.load(s) and numpy allow_pickle execute code.
    risky = re.compile(
        r"torch\.load\((?![^)]*weights_only=True)|pickle\.loads?\(|allow_pickle=True"
    )
    offenders = [
        f"{path.relative_to(REPO)}:{number}"
        for folder in ("zoo", "pipeline")
        for path in (REPO / folder).rglob("*.py")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if risky.search(line)
    ]
    assert offenders == [], offenders
    assert not risky.search((REPO / "cli.py").read_text())
