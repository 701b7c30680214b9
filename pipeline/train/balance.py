"""Unequal classes: class weights in the loss, or a sampler that draws each class equally often.

`zoo adapt` and `zoo compare` balance by default when the largest training class has at least
IMBALANCE_RATIO times the images of the smallest (pipeline.data.check), with class weights: they
work on every path (the epoch loop, several workers). A linear head solved on cached features
reaches the same balanced target by shifting its bias by the log class priors (logit adjustment,
pipeline.train.solve), measured better than weighting its loss. `--balance` overrides.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.data.check import Balance, balance_line

BALANCE_MODES = ("none", "weights", "sampler")  # what --balance takes; not given: by the data


@dataclass(frozen=True)
class BalancePlan:
    """How training makes up for unequal classes."""

    mode: str  # one of BALANCE_MODES
    class_weights: tuple[float, ...] | None  # per class: the mean over the training images is 1
    reason: str  # the line that says so ("" when nothing is balanced and nobody asked)


def class_weights(counts: Sequence[int]) -> tuple[float, ...]:
    """total / (classes present x count) per class, as scikit-learn's "balanced"; 0 for an empty class."""
    counts_array = np.asarray(counts, dtype=np.float64)
    present = counts_array > 0
    weights = np.where(
        present, counts_array.sum() / (max(1, present.sum()) * np.maximum(counts_array, 1)), 0.0
    )
    return tuple(round(float(w), 6) for w in weights)


def plan_balance(requested: str | None, balance: Balance, *, workers: int = 1) -> BalancePlan:
    """--balance as given; by default class weights when the classes are IMBALANCE_RATIO apart.

    A sampler cannot follow several workers' shards: there it becomes class weights, and says so.
    """
    mode = requested or ("weights" if balance.imbalanced else "none")
    counts = list(balance.counts.values())
    if mode == "none" or not sum(counts):
        return BalancePlan(
            "none", None, "" if requested is None else "no class balancing (--balance none)"
        )
    note = ""
    if mode == "sampler" and workers > 1:
        mode, note = (
            "weights",
            " (class weights instead of a sampler: the workers each draw their own shard)",
        )
    how = (
        "class weights in the loss (a solved feature head: the log class priors in its bias)"
        if mode == "weights"
        else "a sampler drawing each class equally often"
    )
    why = f"--balance {requested}" if requested else f"the classes are {balance_line(balance)}"
    off = " (--balance none turns it off)" if requested is None else ""
    return BalancePlan(mode, class_weights(counts), f"balancing with {how}: {why}{off}{note}")
