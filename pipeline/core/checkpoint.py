"""Checkpoints as data: safetensors for tensors, JSON for the rest, every write atomic.

No pickle anywhere: a checkpoint from someone else cannot run code when loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zoo.errors import InvalidModelFile
from zoo.files import atomic_write

if TYPE_CHECKING:
    import torch
    from torch import nn

    from pipeline.core.distributed import Workers


RESUME_NEXT_STEP = "write elsewhere, then resume"  # what a full disk during training asks for


def save_weights(model: nn.Module, path: Path, *, metadata: dict[str, str] | None = None) -> None:
    """The model's state dict (parameters and buffers) as safetensors, atomically."""
    from safetensors.torch import save_file

    state = {
        name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()
    }
    atomic_write(
        path, lambda tmp: save_file(state, tmp, metadata=metadata or {}), next_step=RESUME_NEXT_STEP
    )


def load_weights(model: nn.Module, path: Path) -> None:
    """Load safetensors weights into `model`; anything else is refused."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InvalidModelFile(
            f"{path} is not a safetensors checkpoint ({exc}); zoo only loads safetensors, never pickles"
        ) from exc
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InvalidModelFile(
            f"{path} does not fit this model ({len(missing)} missing, {len(unexpected)} unexpected tensors, "
            f"e.g. {(missing or unexpected)[0]}); was it written by another run?"
        )


def save_resume_point(
    path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Weights, optimizer state and loop state in one safetensors file: one atomic commit per epoch."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    optim = optimizer.state_dict()
    scalars: dict[str, Any] = {}
    for index, values in optim["state"].items():
        for key, value in values.items():
            if hasattr(value, "detach"):
                tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    metadata = {
        "param_groups": json.dumps(optim["param_groups"]),
        "optim_scalars": json.dumps(scalars),
        "state": json.dumps(state, default=str),
    }
    atomic_write(
        path, lambda tmp: save_file(tensors, tmp, metadata=metadata), next_step=RESUME_NEXT_STEP
    )


def load_resume_point(path: Path, *, model: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load the weights into `model`; return (optimizer state dict, loop state)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise InvalidModelFile(
            f"{path} is not a readable resume point ({exc}); start a new run"
        ) from exc
    weights = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(weights, strict=True)
    optim_state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            index, name = key[len("optim.") :].split(".", 1)
            optim_state.setdefault(int(index), {})[name] = value
    for key, value in json.loads(metadata.get("optim_scalars", "{}")).items():
        index, name = key.split(".", 1)
        optim_state.setdefault(int(index), {})[name] = value
    optimizer_state = {"state": optim_state, "param_groups": json.loads(metadata["param_groups"])}
    return optimizer_state, json.loads(metadata["state"])


BEST_CHECKPOINT = "checkpoint.safetensors"  # the best epoch's weights: what export uses
RESUME_POINT = "last.safetensors"  # the last complete epoch: weights, optimizer, loop state


class RunCheckpoints:
    """The two checkpoints of a run directory, written and read by the main process alone.

    The other workers get what the main one read (no shared disk is needed), so training code
    calls these methods on every process and never asks which one it is.
    """

    def __init__(self, run_dir: Path, model: nn.Module, workers: Workers) -> None:
        self.model = model  # what the checkpoints hold: the whole adapted model
        self.workers = workers
        self.best_path = run_dir / BEST_CHECKPOINT
        self.resume_path = run_dir / RESUME_POINT

    def read_resume_point(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """(optimizer state, loop state) of the last complete epoch, its weights loaded; None if none."""
        found = None
        if self.workers.is_main and self.resume_path.exists():
            found = load_resume_point(self.resume_path, model=self.model)
        found = self.workers.broadcast_object(found)
        if found is not None:
            self.workers.sync_module(self.model)
        return found

    def roll_back(self) -> dict[str, Any] | None:
        """The last complete epoch's weights back in the model (one process only, after running
        out of memory mid-epoch); returns its optimizer state, None before the first epoch."""
        if not self.resume_path.exists():
            return None
        optimizer_state, _ = load_resume_point(self.resume_path, model=self.model)
        return optimizer_state

    def save_best(self) -> None:
        if self.workers.is_main:
            save_weights(self.model, self.best_path)

    def save_resume_point(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        if self.workers.is_main:
            save_resume_point(self.resume_path, model=self.model, optimizer=optimizer, state=state)

    def load_best(self) -> None:
        """The best epoch's weights into the model, on every process."""
        if self.workers.is_main and self.best_path.exists():
            load_weights(self.model, self.best_path)
        self.workers.sync_module(self.model)
