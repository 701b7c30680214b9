"""Which device a run computes on: the one choice that both training and the workers' process group need."""

from __future__ import annotations

from zoo.errors import TrainingError


def resolve_device(requested: str = "auto") -> str:
    """'auto' picks CUDA when torch can use it, else the CPU."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise TrainingError(
            "--device cuda was asked for, but torch sees no CUDA device; use --device cpu"
        )
    if requested not in ("cpu", "cuda"):
        raise TrainingError(f"unknown device {requested!r}; use auto, cpu or cuda")
    return requested
