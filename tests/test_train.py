"""The training loop: early stopping, checkpoints, resume, non-finite loss, out-of-memory back-off."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pipeline.core.checkpoint import load_weights
from pipeline.train.loop import BEST_CHECKPOINT, RESUME_POINT, TrainConfig, fit, lr_factor
from zoo.errors import Interrupted, TrainingError

ROOT = Path(__file__).resolve().parent.parent


class HeadOnlyPlan:
    """A plan under which every parameter of the given module trains: the loop alone is under test."""

    def apply(self, model: nn.Module, epoch: int) -> bool:
        return False

    def train_mode(self, model: nn.Module) -> None:
        model.train()

    def param_groups(self, model: nn.Module, *, lr: float, decay: float = 0.1) -> list[dict]:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]


def _data(n: int = 96, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=generator)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return TensorDataset(x, y)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))


class Sabotage:
    """A loader that misbehaves at one global batch: raise an exception, or feed NaN."""

    def __init__(
        self, dataset, batch_size: int, *, at_batch: int, action: str, seed: int = 0
    ) -> None:
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
        )
        self.generator = self.loader.generator
        self.at_batch, self.action, self.count = at_batch, action, 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for inputs, labels in self.loader:
            self.count += 1
            if self.count == self.at_batch:
                if self.action == "interrupt":
                    raise KeyboardInterrupt
                if self.action == "oom" and inputs.shape[0] > 8:
                    raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
                if self.action == "nan":
                    inputs = inputs * float("nan")
            yield inputs, labels


def _fit(tmp_path, *, epochs: int = 6, resume: bool = False, loader_factory=None, **config):
    model = _model()
    train, val = _data(96, 0), _data(48, 1)
    factory = loader_factory or (
        lambda bs: DataLoader(
            train, batch_size=bs, shuffle=True, generator=torch.Generator().manual_seed(0)
        )
    )
    state = fit(
        model,
        HeadOnlyPlan(),
        make_train_loader=factory,
        val_loader=DataLoader(val, batch_size=32),
        config=TrainConfig(epochs=epochs, batch_size=16, lr=config.pop("lr", 1e-2), **config),
        run_dir=tmp_path,
        resume=resume,
        log=lambda _: None,
    )
    return model, state


def test_training_learns_and_keeps_the_best_epoch(tmp_path) -> None:
    model, state = _fit(tmp_path)
    assert state.epoch == 6 and len(state.history) == 6
    assert state.history[-1].train_loss < state.history[0].train_loss
    assert state.best_val_loss == min(r.val_loss for r in state.history)
    assert (tmp_path / BEST_CHECKPOINT).exists() and (tmp_path / RESUME_POINT).exists()
    best = _model()
    load_weights(best, tmp_path / BEST_CHECKPOINT)
    for a, b in zip(model.state_dict().values(), best.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert not list(tmp_path.glob(".*tmp"))


def test_same_seed_gives_the_same_history(tmp_path) -> None:
    _, first = _fit(tmp_path / "a")
    _, second = _fit(tmp_path / "b")
    assert [r.val_loss for r in first.history] == [r.val_loss for r in second.history]


def test_early_stopping_after_patience(tmp_path) -> None:
    _, state = _fit(tmp_path, epochs=20, patience=2, lr=0.0)
    assert state.epoch == 3 and state.best_epoch == 1
    assert state.stopped.startswith("early stop")


def test_interrupted_run_resumes_to_the_same_result(tmp_path) -> None:
    reference, ref_state = _fit(tmp_path / "ref", epochs=5)
    train = _data(96, 0)
    with pytest.raises(Interrupted, match="--resume"):
        _fit(
            tmp_path / "run",
            epochs=5,
            loader_factory=lambda bs: Sabotage(train, bs, at_batch=15, action="interrupt"),
        )
    model, state = _fit(tmp_path / "run", epochs=5, resume=True)
    assert [r.epoch for r in state.history] == [1, 2, 3, 4, 5]
    assert [r.val_loss for r in state.history] == pytest.approx(
        [r.val_loss for r in ref_state.history]
    )
    for a, b in zip(model.state_dict().values(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def test_non_finite_loss_stops_and_keeps_the_good_checkpoint(tmp_path) -> None:
    train = _data(96, 0)
    with pytest.raises(TrainingError, match="non-finite|nan.*epoch 3.*best checkpoint \\(epoch"):
        _fit(tmp_path, loader_factory=lambda bs: Sabotage(train, bs, at_batch=14, action="nan"))
    kept = _model()
    load_weights(kept, tmp_path / BEST_CHECKPOINT)
    assert all(torch.isfinite(t).all() for t in kept.state_dict().values() if t.is_floating_point())


def test_out_of_memory_halves_the_batch_and_completes(tmp_path) -> None:
    train = _data(96, 0)
    _, state = _fit(
        tmp_path, epochs=2, loader_factory=lambda bs: Sabotage(train, bs, at_batch=2, action="oom")
    )
    assert state.epoch == 2 and state.batch_size == 8
    assert [r.batch_size for r in state.history] == [8, 8]


def test_out_of_memory_at_batch_one_is_a_clear_error(tmp_path) -> None:
    class AlwaysOOM(Sabotage):
        def __iter__(self):
            raise RuntimeError("CUDA out of memory")
            yield

    with pytest.raises(TrainingError, match="batch size 1"):
        _fit(
            tmp_path,
            epochs=1,
            loader_factory=lambda bs: AlwaysOOM(_data(), bs, at_batch=1, action="oom"),
        )


def test_warmup_then_cosine() -> None:
    assert lr_factor(0, total_steps=100, warmup_steps=10) == pytest.approx(0.1)
    assert lr_factor(9, total_steps=100, warmup_steps=10) == pytest.approx(1.0)
    assert lr_factor(55, total_steps=100, warmup_steps=10) == pytest.approx(0.5)
    assert lr_factor(100, total_steps=100, warmup_steps=10) == pytest.approx(0.0, abs=1e-12)
    assert not math.isnan(lr_factor(0, total_steps=1, warmup_steps=0))


_FAULTS_PROBE = """
import ctypes, resource, sys
from pipeline.core.device import hold_freed_memory
held = hold_freed_memory() if sys.argv[1] == "hold" else False
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
def step():  # like a training step: buffers allocated, written, then freed together
    blocks = [libc.malloc(1 << 20) for _ in range(48)]
    for block in blocks:
        ctypes.memset(block, 1, 1 << 20)
    for block in blocks:
        libc.free(block)
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    step()
print(held, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator only")
def test_held_memory_is_reused_without_faulting_it_in_again() -> None:
    """After hold_freed_memory, memory a step frees serves the next step: glibc's default trims
    it back to the kernel, and every later step faults 48 MiB in again (12,288 pages)."""

    def faults(mode: str) -> tuple[str, int]:
        done = subprocess.run(
            [sys.executable, "-c", _FAULTS_PROBE, mode],
            capture_output=True, text=True, check=True, cwd=ROOT,
        )  # fmt: skip
        held, count = done.stdout.split()
        return held, int(count)

    _, default_faults = faults("default")
    held, held_faults = faults("hold")
    if held != "True":
        pytest.skip("the C library has no mallopt (not glibc)")
    assert default_faults > 8 * 10_000  # the default returns the freed blocks every step
    assert held_faults < 2_000, (held_faults, default_faults)
