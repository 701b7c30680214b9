"""The `feature` head fitted to its optimum on cached features, its scaling folded into the head.

With a frozen backbone the head sees the same features every epoch, so a linear head is a small
convex problem: full-batch L-BFGS solves it in about a second, for each weight decay of a small
grid, and the validation split picks the weight decay. A few hundred Adam steps on raw features
stop far from that optimum (the issue measured 1 to 24 points lost against a scikit-learn probe).

Features are standardised with the training split's mean and std first (the conditioning matters
more than the optimizer); afterwards the scaling is folded into the first Linear layer, so the
head, its checkpoint and the exported ONNX take raw features exactly as before.

Heads with a hidden layer or dropout are not convex: Adam on the standardised features, with early
stopping on the validation loss. The test split takes no part in any choice made here.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from pipeline.core.checkpoint import save_resume_point, save_weights
from pipeline.core.results import EpochRecord
from pipeline.train.loop import (
    BEST_CHECKPOINT,
    RESUME_POINT,
    TrainConfig,
    TrainState,
    make_optimizer,
    seed_everything,
)
from zoo.errors import TrainingError

if TYPE_CHECKING:
    import torch
    from torch import nn

# The weight-decay grid as scikit-learn's inverse regularisation C (the penalty on the mean
# cross-entropy is 1/(C * N), N training images), so the grid follows the amount of data.
INVERSE_REGULARISATION = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
LINEAR_MAX_EVALUATIONS = 1000  # L-BFGS passes over the features per weight decay (most need < 200)
HIDDEN_MAX_EPOCHS = 300  # Adam epochs for a head with a hidden layer or dropout
HIDDEN_PATIENCE = 30  # epochs without a better validation loss before that stops
GRADIENT_TOLERANCE = 1e-5  # L-BFGS stops when every gradient entry is below this
LBFGS_PASS = "lbfgs"  # history.csv's lr column of a solve's passes: "lbfgs wd=<weight decay>"


@dataclass(frozen=True)
class FeatureSet:
    """Pooled [N, D] features and their labels for one split."""

    features: torch.Tensor
    labels: torch.Tensor
    # Balance the classes (pipeline.train.balance): these weights in the loss of a head with a
    # hidden layer; the log class priors in the bias of a linear head. None: no balancing.
    class_weights: torch.Tensor | None = None


@dataclass(frozen=True)
class Candidate:
    """One weight decay of the grid and what it scored on the validation split."""

    weight_decay: float
    val_loss: float
    val_acc: float
    iterations: int


@dataclass
class HeadFit:
    """What the solver did: the loop state (history, best epoch) and the weight decay it picked."""

    state: TrainState
    method: str  # "lbfgs" or "adam"
    weight_decay: float
    candidates: list[Candidate]
    summary: str  # one line for the log and run.json

    def to_dict(self) -> dict[str, object]:
        return {
            "method": self.method,
            "weight_decay": self.weight_decay,
            "candidates": [dataclasses.asdict(c) for c in self.candidates],
            "summary": self.summary,
        }


def is_solve(history: Sequence[EpochRecord]) -> bool:
    """Whether `history` holds the passes of an L-BFGS solve rather than training epochs.

    A solver pass is one evaluation of the loss and its gradient on all the training features (an
    L-BFGS step takes one or more: its line search). The head kept is the solution, the last pass:
    an earlier pass may show a lower validation loss on the way, but the solver does not stop there
    (the weight decay, chosen on validation, is what keeps the solution from over-fitting).
    """
    return bool(history) and all(r.lr.startswith(LBFGS_PASS) for r in history)


def standardisation(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and std of the training features (constant features get std 1)."""
    import torch

    mean = features.mean(0)
    std = features.std(0, unbiased=False)
    constant = std <= 1e-6 * max(float(std.max()), 1e-12)
    return mean, torch.where(constant, torch.ones_like(std), std)


def fold_standardisation(linear: nn.Linear, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Make `linear`, trained on (x - mean) / std, compute the same logits from raw x."""
    import torch

    with torch.no_grad():
        weight = linear.weight / std.to(linear.weight)
        linear.bias -= weight @ mean.to(weight)
        linear.weight.copy_(weight)


def is_linear_head(head: nn.Module) -> bool:
    """A head L-BFGS can solve: one Linear layer and nothing stochastic before it."""
    from torch import nn

    layers = list(head.children()) if isinstance(head, nn.Sequential) else [head]
    return len(layers) == 1 and isinstance(layers[0], nn.Linear)


def _first_linear(head: nn.Module) -> nn.Linear:
    from torch import nn

    return next(m for m in head.modules() if isinstance(m, nn.Linear))


def _scores(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(cross-entropy, accuracy); NaN for an empty split."""
    import torch.nn.functional as F

    if not len(labels):
        return math.nan, math.nan
    loss = float(F.cross_entropy(logits.float(), labels))
    return loss, float((logits.argmax(1) == labels).float().mean())


def _solve_linear(
    train: FeatureSet,
    *,
    num_classes: int,
    weight_decay: float,
    max_evaluations: int,
    smoothing: float,
    start: tuple[torch.Tensor, torch.Tensor] | None = None,
    each: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
    """Minimise mean cross-entropy + weight_decay/2 * |W|^2 (bias not penalised) with L-BFGS.

    Returns (weight, bias, evaluations, converged). Each evaluation is one pass over the training
    features, the solver's epoch; `each(evaluation, W, b)` sees the point it evaluated.
    """
    import torch
    import torch.nn.functional as F

    inputs, labels = train.features, train.labels
    weight = torch.zeros(num_classes, inputs.shape[1], dtype=inputs.dtype)
    bias = torch.zeros(num_classes, dtype=inputs.dtype)
    if start is not None:
        weight.copy_(start[0])
        bias.copy_(start[1])
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_evaluations,
        max_eval=max_evaluations,
        history_size=20,
        tolerance_grad=GRADIENT_TOLERANCE,
        tolerance_change=1e-10,
        line_search_fn="strong_wolfe",
    )
    evaluations = 0

    def closure() -> torch.Tensor:
        nonlocal evaluations
        optimizer.zero_grad(set_to_none=False)
        logits = inputs @ weight.T + bias
        loss = F.cross_entropy(logits, labels, label_smoothing=smoothing)
        loss = loss + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        evaluations += 1
        # The line search may overshoot the cap by a few evaluations; the history stops at it.
        if each is not None and evaluations <= max_evaluations:
            each(evaluations, weight.detach(), bias.detach())
        return loss

    optimizer.step(closure)
    converged = evaluations < max_evaluations
    return weight.detach(), bias.detach(), min(evaluations, max_evaluations), converged


class _Scaled(NamedTuple):
    """Both splits standardised with the training split's mean and std, kept to fold into the head."""

    mean: torch.Tensor
    std: torch.Tensor
    train: FeatureSet
    val: FeatureSet
    shift: torch.Tensor | float = 0.0  # added to the bias: -log class priors when balancing


def _balanced_by_bias(scaled: _Scaled) -> _Scaled:
    """For a linear head with class weights: the unweighted solve, its bias shifted by the log
    class priors (logit adjustment, Menon et al. 2021). Both aim at the balanced posterior; with
    one flowers5 class cut to 10% of its images, the shift gained 5.1 macro-F1 points over no
    balancing and the weighted loss 2.3 (mean of three seeds, BENCHMARKS.md benchmark 11)."""
    import torch

    if scaled.train.class_weights is None:
        return scaled
    labels = scaled.train.labels
    counts = torch.bincount(labels, minlength=len(scaled.train.class_weights)).double()
    prior = counts / counts.sum()
    shift = torch.where(counts > 0, -torch.log(prior.clamp_min(1e-12)), torch.zeros_like(prior))
    return scaled._replace(train=dataclasses.replace(scaled.train, class_weights=None), shift=shift)


def _standardised(train: FeatureSet, val: FeatureSet) -> _Scaled:
    mean, std = standardisation(train.features)
    return _Scaled(
        mean,
        std,
        FeatureSet((train.features - mean) / std, train.labels, train.class_weights),
        FeatureSet((val.features - mean) / std, val.labels),
    )


def fit_linear(
    linear: nn.Linear,
    *,
    train: FeatureSet,
    val: FeatureSet,
    max_evaluations: int,
    smoothing: float = 0.0,
    log: Callable[[str], None] = print,
) -> HeadFit:
    """Solve `linear` on standardised features for each weight decay; keep the best on validation."""
    import torch

    scaled = _balanced_by_bias(
        _standardised(
            dataclasses.replace(train, features=train.features.double()),
            FeatureSet(val.features.double(), val.labels),
        )
    )
    num_classes = linear.out_features
    candidates = _weight_decay_grid(
        scaled, num_classes=num_classes, max_evaluations=max_evaluations, smoothing=smoothing
    )
    best = _pick(candidates)
    history: list[EpochRecord] = []
    # The chosen weight decay once more from zero, so that history.csv shows its whole path.
    weight, bias, iterations, converged = _solve_linear(
        scaled.train,
        num_classes=num_classes,
        weight_decay=best.weight_decay,
        max_evaluations=max_evaluations,
        smoothing=smoothing,
        each=_history_recorder(
            scaled,
            history,
            lr=f"{LBFGS_PASS} wd={best.weight_decay:.3g}",
            trainable_params=linear.weight.numel() + linear.bias.numel(),
        ),
    )
    with torch.no_grad():
        linear.weight.copy_(weight.to(linear.weight))
        linear.bias.copy_((bias + scaled.shift).to(linear.bias))
    fold_standardisation(linear, scaled.mean, scaled.std)
    state = TrainState(
        epoch=iterations,
        best_val_loss=history[-1].val_loss if history else math.inf,
        best_epoch=iterations,
        batch_size=len(train.labels),
        history=history,
        stopped=f"converged after {iterations} passes of L-BFGS" if converged else "epochs done",
    )
    grid = ", ".join(f"{c.weight_decay:.2g}: {c.val_acc:.3f}" for c in candidates)
    balanced = (
        "" if train.class_weights is None else ", classes balanced by the log priors in its bias"
    )
    summary = (
        f"head solved with L-BFGS on standardised features{balanced}; weight decay {best.weight_decay:.2g} "
        f"picked on validation (val acc {best.val_acc:.3f}, loss {best.val_loss:.3f}; grid {grid})"
    )
    log(summary)
    return HeadFit(state, "lbfgs", best.weight_decay, candidates, summary)


def _weight_decay_grid(
    scaled: _Scaled, *, num_classes: int, max_evaluations: int, smoothing: float
) -> list[Candidate]:
    """Solve for each weight decay of the grid and score each solution on the validation split."""
    candidates: list[Candidate] = []
    start = None
    # From strong to weak regularisation, each solve warm-starts from the previous one.
    for inverse in INVERSE_REGULARISATION:
        weight_decay = 1.0 / (inverse * len(scaled.train.labels))
        weight, bias, iterations, _ = _solve_linear(
            scaled.train,
            num_classes=num_classes,
            weight_decay=weight_decay,
            max_evaluations=max_evaluations,
            smoothing=smoothing,
            start=start,
        )
        start = (weight, bias)
        logits = scaled.val.features @ weight.T + bias + scaled.shift
        val_loss, val_acc = _scores(logits, scaled.val.labels)
        candidates.append(Candidate(weight_decay, val_loss, val_acc, iterations))
    return candidates


def _pick(candidates: list[Candidate]) -> Candidate:
    """The best validation accuracy; among equals the strongest weight decay, the simplest model
    the evidence allows (a finer tie-break overfits a validation split of 80 images: measured).
    Without a validation split, the middle of the grid."""
    scored = [c for c in candidates if not math.isnan(c.val_acc)]
    if scored:
        return max(scored, key=lambda c: (c.val_acc, c.weight_decay))
    return candidates[len(candidates) // 2]


def _history_recorder(
    scaled: _Scaled, history: list[EpochRecord], *, lr: str, trainable_params: int
) -> Callable[[int, torch.Tensor, torch.Tensor], None]:
    """An `each` for `_solve_linear` that appends a history row for every point it evaluates."""
    started = time.perf_counter()

    def record(iteration: int, weight: torch.Tensor, bias: torch.Tensor) -> None:
        train_loss, train_acc = _scores(
            scaled.train.features @ weight.T + bias + scaled.shift, scaled.train.labels
        )
        val_loss, val_acc = _scores(
            scaled.val.features @ weight.T + bias + scaled.shift, scaled.val.labels
        )
        history.append(
            EpochRecord(
                epoch=iteration,
                train_loss=train_loss,
                train_acc=train_acc,
                val_loss=val_loss,
                val_acc=val_acc,
                lr=lr,
                trainable_params=trainable_params,
                batch_size=len(scaled.train.labels),
                seconds=round(time.perf_counter() - started, 4),
            )
        )

    return record


def fit_adam(
    head: nn.Module,
    *,
    train: FeatureSet,
    val: FeatureSet,
    config: TrainConfig,
    max_epochs: int,
    log: Callable[[str], None] = print,
) -> HeadFit:
    """A head with a hidden layer or dropout: Adam on standardised features, early stopping on val loss."""
    import torch

    scaled = _standardised(train, val)
    optimizer = make_optimizer(
        [{"params": [p for p in head.parameters()], "lr": config.lr}], config
    )
    seed_everything(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    state = TrainState(batch_size=config.batch_size)
    best_weights = copy.deepcopy(head.state_dict())
    for epoch in range(1, max_epochs + 1):
        record = _adam_epoch(
            head, optimizer, scaled, epoch=epoch, config=config, generator=generator
        )
        state.history.append(record)
        state.epoch = epoch
        if record.val_loss < state.best_val_loss or math.isnan(record.val_loss):
            state.best_val_loss, state.best_epoch, state.stale_epochs = record.val_loss, epoch, 0
            best_weights = copy.deepcopy(head.state_dict())
        else:
            state.stale_epochs += 1
            if state.stale_epochs >= HIDDEN_PATIENCE:
                state.stopped = (
                    f"early stop: no better validation loss for {HIDDEN_PATIENCE} epochs"
                )
                break
    else:
        state.stopped = "epochs done"
    head.load_state_dict(best_weights)
    fold_standardisation(_first_linear(head), scaled.mean, scaled.std)
    best = state.history[state.best_epoch - 1]
    summary = (
        f"head trained with Adam on standardised features for {state.epoch} epochs; best "
        f"validation loss {best.val_loss:.3f} (acc {best.val_acc:.3f}) at epoch {state.best_epoch}"
    )
    log(summary)
    return HeadFit(state, "adam", config.weight_decay, [], summary)


def _adam_epoch(
    head: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaled: _Scaled,
    *,
    epoch: int,
    config: TrainConfig,
    generator: torch.Generator,
) -> EpochRecord:
    """One shuffled pass of minibatch Adam over the training features, then the validation scores."""
    import torch
    import torch.nn.functional as F

    started = time.perf_counter()
    features, labels = scaled.train.features, scaled.train.labels
    count = len(labels)
    head.train()
    order = torch.randperm(count, generator=generator)
    loss_sum, correct = 0.0, 0
    for first in range(0, count, config.batch_size):
        batch = order[first : first + config.batch_size]
        logits = head(features[batch])
        loss = F.cross_entropy(
            logits,
            labels[batch],
            weight=scaled.train.class_weights,
            label_smoothing=config.label_smoothing,
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += float(loss.detach()) * len(batch)
        correct += int((logits.argmax(1) == labels[batch]).sum())
    head.eval()
    with torch.no_grad():
        val_loss, val_acc = _scores(head(scaled.val.features), scaled.val.labels)
    return EpochRecord(
        epoch=epoch,
        train_loss=loss_sum / count,
        train_acc=correct / count,
        val_loss=val_loss,
        val_acc=val_acc,
        lr=f"{config.lr:.3g}",
        trainable_params=sum(p.numel() for p in head.parameters()),
        batch_size=config.batch_size,
        seconds=round(time.perf_counter() - started, 4),
    )


def fit_head(
    head: nn.Module,
    *,
    train: FeatureSet,
    val: FeatureSet,
    config: TrainConfig,
    max_epochs: int | None,
    run_dir: Path,
    saved_model: nn.Module,
    log: Callable[[str], None] = print,
) -> HeadFit:
    """Fit the head on cached features and write the checkpoints `fit` would have written.

    `max_epochs` caps L-BFGS iterations (or Adam epochs); None runs to convergence. Solving takes
    seconds, so a resumed run solves again from the start.
    """
    import torch

    if not len(train.labels):
        raise TrainingError(
            "the training split is empty; add images or lower the validation/test share"
        )
    threads = torch.get_num_threads()
    # The problems are tiny: more threads only spin against each other (10x slower, measured).
    torch.set_num_threads(1)
    try:
        result = _fit(head, train=train, val=val, config=config, max_epochs=max_epochs, log=log)
    finally:
        torch.set_num_threads(threads)
    run_dir = Path(run_dir)
    save_weights(saved_model, run_dir / BEST_CHECKPOINT)
    # The resume point holds the solved head; its optimizer state is empty (a resume solves again).
    placeholder = torch.optim.SGD(head.parameters(), lr=0.0)
    save_resume_point(
        run_dir / RESUME_POINT,
        model=saved_model,
        optimizer=placeholder,
        state=result.state.to_dict(),
    )
    return result


def _fit(
    head: nn.Module,
    *,
    train: FeatureSet,
    val: FeatureSet,
    config: TrainConfig,
    max_epochs: int | None,
    log: Callable[[str], None],
) -> HeadFit:
    # A sampler's balance, in expectation, is the weights' balance: the solver weights the loss.
    weights = config.class_weights if config.balance in ("weights", "sampler") else None
    if weights:
        import torch

        train = dataclasses.replace(train, class_weights=torch.tensor(weights))
    if is_linear_head(head):
        result = fit_linear(
            _first_linear(head),
            train=train,
            val=val,
            max_evaluations=max_epochs or LINEAR_MAX_EVALUATIONS,
            smoothing=config.label_smoothing,
            log=log,
        )
    else:
        result = fit_adam(
            head,
            train=train,
            val=val,
            config=config,
            max_epochs=max_epochs or HIDDEN_MAX_EPOCHS,
            log=log,
        )
    return result
