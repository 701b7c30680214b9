"""Training: one epoch, evaluation, and the loop around them (early stopping, checkpoints, resume).

The loop is strategy-agnostic: a `FreezePlan` (pipeline.surgery) says what trains at each epoch,
and the loop rebuilds the optimizer's parameter groups when the plan unfreezes more blocks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.checkpoint import BEST_CHECKPOINT, RESUME_POINT, RunCheckpoints
from pipeline.core.device import resolve_device  # re-exported: its old home
from pipeline.core.distributed import SINGLE
from pipeline.core.results import EpochRecord
from zoo.errors import Interrupted, TrainingError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from pipeline.core.distributed import Workers

OPTIMIZERS = ("adam", "adamax", "adamw", "sgd")


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one run; written to run.json as they are."""

    epochs: int = 20
    batch_size: int = 32
    lr: float = 3e-4  # for the new head; unfrozen pretrained blocks get lr * decay^depth
    lr_decay: float = 0.1  # discriminative factor between neighbouring unfrozen blocks
    optimizer: str = "adam"
    weight_decay: float = 0.0
    warmup_epochs: float = 1.0
    patience: int = 10  # epochs without a better validation loss before stopping
    label_smoothing: float = 0.0
    seed: int = 0
    device: str = "cpu"  # resolved: "cpu" or "cuda"
    amp: bool = False  # bf16 autocast (CUDA only)
    channels_last: bool = False
    # Unequal classes (pipeline.train.balance): "none", "weights" (in the loss) or "sampler"
    # (each class drawn equally often); class_weights per class, mean 1 over the training images.
    balance: str = "none"
    class_weights: tuple[float, ...] | None = None

    def loss_weights(self, device: str) -> torch.Tensor | None:
        """The per-class weights of the training loss; None unless balancing by weights."""
        if self.balance != "weights" or not self.class_weights:
            return None
        import torch

        return torch.tensor(self.class_weights, dtype=torch.float32, device=device)


@dataclass
class TrainState:
    """What a resumed run needs besides the weights and the optimizer."""

    epoch: int = 0  # epochs completed
    best_val_loss: float = math.inf
    best_epoch: int = 0
    stale_epochs: int = 0
    batch_size: int = 32
    history: list[EpochRecord] = field(default_factory=list)
    stopped: str = ""  # why training ended: "", "early stop", "epochs done"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["best_val_loss"] = None if math.isinf(self.best_val_loss) else self.best_val_loss
        return data

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainState:
        raw = dict(raw)
        raw["history"] = [EpochRecord(**row) for row in raw.get("history", [])]
        if raw.get("best_val_loss") is None:
            raw["best_val_loss"] = math.inf
        return cls(**raw)


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    logits: Any  # torch.Tensor [N, C] on CPU
    labels: Any  # torch.Tensor [N]


def seed_everything(seed: int) -> None:
    """Same seed, same numbers: Python, NumPy and torch generators."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(groups: list[dict[str, Any]], config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer named by the config over the given parameter groups."""
    import torch

    if not groups or not any(g["params"] for g in groups):
        raise TrainingError(
            "nothing to train: every parameter is frozen; choose another --strategy"
        )
    for group in groups:
        group.setdefault("initial_lr", group["lr"])
    kinds = {
        "adam": lambda: torch.optim.Adam(groups, weight_decay=config.weight_decay),
        "adamax": lambda: torch.optim.Adamax(groups, weight_decay=config.weight_decay),
        "adamw": lambda: torch.optim.AdamW(groups, weight_decay=config.weight_decay or 1e-2),
        "sgd": lambda: torch.optim.SGD(
            groups, momentum=0.9, nesterov=True, weight_decay=config.weight_decay
        ),
    }
    if config.optimizer not in kinds:
        raise TrainingError(
            f"unknown optimizer {config.optimizer!r}; use one of {', '.join(OPTIMIZERS)}"
        )
    return kinds[config.optimizer]()


def lr_factor(step: int, *, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up, then cosine decay to zero over the run."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    *,
    config: TrainConfig,
    set_train_mode: Callable[[nn.Module], None],
    step_offset: int,
    total_steps: int,
    progress: Callable[[int, float, float], None] | None = None,
) -> tuple[float, float, int]:
    """One pass over the training data; returns (mean loss, accuracy, steps taken)."""
    import torch
    import torch.nn.functional as F

    set_train_mode(model)
    warmup_steps = int(config.warmup_epochs * total_steps / max(1, config.epochs))
    weights = config.loss_weights(config.device)
    loss_sum, correct, seen, step = 0.0, 0, 0, 0
    for inputs, labels in loader:
        inputs = inputs.to(config.device, non_blocking=True)
        labels = labels.to(config.device, non_blocking=True)
        if config.channels_last and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        _set_lr(
            optimizer,
            lr_factor(step_offset + step, total_steps=total_steps, warmup_steps=warmup_steps),
        )
        with torch.autocast(device_type=config.device, dtype=torch.bfloat16, enabled=config.amp):
            logits = model(inputs)
            loss = F.cross_entropy(
                logits.float(), labels, weight=weights, label_smoothing=config.label_smoothing
            )
        if not torch.isfinite(loss):
            raise NonFiniteLoss(float(loss.detach()))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        batch = labels.shape[0]
        loss_sum += float(loss.detach()) * batch
        correct += int((logits.argmax(1) == labels).sum())
        seen += batch
        step += 1
        if progress is not None:
            progress(batch, loss_sum / seen, correct / seen)
    if seen == 0:
        raise TrainingError(
            "the training split is empty; add images or lower the validation/test share"
        )
    return loss_sum / seen, correct / seen, step


class NonFiniteLoss(Exception):
    """Raised inside an epoch; the loop turns it into a TrainingError after keeping the good checkpoint."""


def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    config: TrainConfig,
    dist: Workers | None = None,
) -> EvalResult:
    """Loss, accuracy and all logits over a split, in eval mode without gradients.

    Under several workers each one's loader holds its shard (`Workers.shard`); the shards are
    gathered, so every worker gets the metrics of the whole split.
    """
    import torch
    import torch.nn.functional as F

    model.eval()
    all_logits, all_labels = [], []
    with torch.inference_mode():
        for inputs, labels in loader:
            inputs = inputs.to(config.device, non_blocking=True)
            if config.channels_last and inputs.dim() == 4:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            with torch.autocast(
                device_type=config.device, dtype=torch.bfloat16, enabled=config.amp
            ):
                logits = model(inputs)
            all_logits.append(logits.float().cpu())
            all_labels.append(labels.cpu())
    # Each worker holds its shard of the split: all of them get the whole split, in split order.
    logits, labels = (dist or SINGLE).gather_split(
        torch.cat(all_logits) if all_logits else None,
        torch.cat(all_labels) if all_labels else None,
    )
    if logits is None:
        return EvalResult(math.nan, math.nan, torch.empty(0), torch.empty(0, dtype=torch.long))
    loss = float(F.cross_entropy(logits, labels))
    accuracy = float((logits.argmax(1) == labels).float().mean())
    return EvalResult(loss, accuracy, logits, labels)


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def fit(
    model: nn.Module,
    plan: Any,
    *,
    make_train_loader: Callable[[int], Iterable],
    val_loader: Iterable,
    config: TrainConfig,
    run_dir: Path,
    resume: bool = False,
    saved_model: nn.Module | None = None,
    log: Callable[[str], None] = print,
    progress_factory: Callable[..., Any] | None = None,
    dist: Workers | None = None,
) -> TrainState:
    """Train with early stopping on validation loss; returns the loop state, best weights loaded.

    `model` is what runs on the batches (the whole adapted model, or only its head when the
    batches are cached features); `saved_model` is what checkpoints hold (default: `model`).
    `plan` is a FreezePlan: apply(model, epoch), train_mode(model), param_groups(model, lr=, decay=).
    Under several workers (`dist`), batches go through DistributedDataParallel.
    """
    workers = dist or SINGLE
    saved = saved_model if saved_model is not None else model
    checkpoints = RunCheckpoints(Path(run_dir), saved, workers)
    state, optimizer_state = _starting_state(checkpoints, config, resume=resume, log=log)
    loop = _EpochLoop(model, plan, config, workers, make_train_loader, optimizer_state)
    loop.use_batch_size(state.batch_size)
    epoch = state.epoch
    try:
        for epoch in range(state.epoch + 1, config.epochs + 1):
            record = _run_epoch(
                loop,
                state,
                checkpoints,
                epoch=epoch,
                val_loader=val_loader,
                progress_factory=progress_factory,
                log=log,
            )
            _keep_epoch(record, state, checkpoints, loop.optimizer)
            log(_epoch_line(record, config, best=state.best_epoch == epoch))
            if state.stale_epochs >= config.patience:
                state.stopped = (
                    f"early stop: no better validation loss for {config.patience} epochs"
                )
                log(state.stopped)
                break
        else:
            state.stopped = "epochs done"
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted during epoch {epoch}; epochs up to {state.epoch} are saved in {run_dir}. "
            f"Continue with: zoo adapt --out {run_dir} --resume"
        ) from None
    checkpoints.load_best()  # every worker tests the best weights
    return state


def _starting_state(
    checkpoints: RunCheckpoints, config: TrainConfig, *, resume: bool, log: Callable[[str], None]
) -> tuple[TrainState, dict[str, Any] | None]:
    """A fresh loop state, or with `resume` the last complete epoch's (and its optimizer state)."""
    resumed = checkpoints.read_resume_point() if resume else None
    if resumed is None:
        return TrainState(batch_size=config.batch_size), None
    optimizer_state, raw_state = resumed
    state = TrainState.from_dict(raw_state)
    log(
        f"resuming after epoch {state.epoch} of {config.epochs} (best so far: epoch {state.best_epoch})"
    )
    return state, optimizer_state


class _EpochLoop:
    """What the loop rebuilds as it goes: the loader when the batch size changes, the optimizer
    and the DDP wrapper when the plan unfreezes more blocks."""

    def __init__(
        self,
        model: nn.Module,
        plan: Any,
        config: TrainConfig,
        workers: Workers,
        make_train_loader: Callable[[int], Iterable],
        optimizer_state: dict[str, Any] | None,
    ) -> None:
        self.model, self.plan, self.config, self.workers = model, plan, config, workers
        self.make_train_loader = make_train_loader
        self.optimizer_state = optimizer_state  # a resumed run's, loaded into the first optimizer
        self.optimizer: Any = None
        self.train_model = model  # what the batches go through: `model`, or DDP around it
        self.loader: Any = None
        self.steps_per_epoch = 1

    def use_batch_size(self, batch_size: int) -> None:
        self.loader = self.make_train_loader(batch_size)
        self.steps_per_epoch = max(1, len(self.loader)) if hasattr(self.loader, "__len__") else 1

    def update_trainable(self, epoch: int) -> None:
        """Apply the plan for `epoch`; a new optimizer (and DDP) when what trains has changed."""
        if self.plan.apply(self.model, epoch - 1) or self.optimizer is None:
            groups = self.plan.param_groups(
                self.model, lr=self.config.lr, decay=self.config.lr_decay
            )
            self.optimizer = make_optimizer(groups, self.config)
            self.restore_optimizer(self.optimizer_state)
            self.optimizer_state = None
            # DDP registers the parameters that train now, so it is rebuilt when they change.
            self.train_model = self.workers.wrap(self.model)

    def restore_optimizer(self, optimizer_state: dict[str, Any] | None) -> None:
        if optimizer_state is not None:
            self.optimizer.load_state_dict(optimizer_state)

    def set_train_mode(self, _: nn.Module) -> None:
        self.train_model.train()
        self.plan.train_mode(self.model)  # the plan knows the module names of `model`, not of DDP

    def seed_epoch(self, epoch: int) -> None:
        """Each epoch's randomness depends on (seed, epoch) alone, so a resumed run replays
        exactly what the uninterrupted one would have done."""
        seed_everything(self.config.seed * 1000 + epoch)
        if getattr(self.loader, "generator", None) is not None:
            self.loader.generator.manual_seed(self.config.seed * 1000 + epoch)
        if hasattr(getattr(self.loader, "sampler", None), "set_epoch"):
            self.loader.sampler.set_epoch(epoch)  # DistributedSampler: shuffle by (seed, epoch)


def _train_epoch(
    loop: _EpochLoop,
    state: TrainState,
    checkpoints: RunCheckpoints,
    *,
    epoch: int,
    progress_factory: Callable[..., Any] | None,
    log: Callable[[str], None],
) -> tuple[float, float]:
    """One epoch, retried at half the batch size when it runs out of memory; (loss, accuracy)
    averaged over the workers."""
    while True:
        loop.seed_epoch(epoch)
        bar = progress_factory(epoch, len(loop.loader)) if progress_factory else None
        try:
            loss, accuracy, _ = train_one_epoch(
                loop.train_model,
                loop.loader,
                loop.optimizer,
                config=loop.config,
                set_train_mode=loop.set_train_mode,
                step_offset=(epoch - 1) * loop.steps_per_epoch,
                total_steps=loop.steps_per_epoch * loop.config.epochs,
                progress=bar.update if bar else None,
            )
        except NonFiniteLoss as exc:
            kept = (
                f"the best checkpoint (epoch {state.best_epoch}) is kept"
                if state.best_epoch
                else "no checkpoint was written"
            )
            raise TrainingError(
                f"the training loss became {exc} in epoch {epoch}; training stopped and {kept}. "
                "Lower --lr and start a new run"
            ) from None
        except RuntimeError as exc:
            if not is_out_of_memory(exc):
                raise
            _halve_batch(loop, state, checkpoints, epoch=epoch, log=log, error=exc)
            continue
        finally:
            if bar:
                bar.close()
        loss, accuracy = loop.workers.mean([loss, accuracy])
        return loss, accuracy


def _run_epoch(
    loop: _EpochLoop,
    state: TrainState,
    checkpoints: RunCheckpoints,
    *,
    epoch: int,
    val_loader: Iterable,
    progress_factory: Callable[..., Any] | None,
    log: Callable[[str], None],
) -> EpochRecord:
    """Train one epoch with what the plan unfreezes for it, then evaluate; the history row."""
    loop.update_trainable(epoch)
    started = time.perf_counter()
    train_loss, train_acc = _train_epoch(
        loop, state, checkpoints, epoch=epoch, progress_factory=progress_factory, log=log
    )
    val = evaluate(loop.model, val_loader, config=loop.config, dist=loop.workers)
    return EpochRecord(
        epoch=epoch,
        train_loss=train_loss,
        train_acc=train_acc,
        val_loss=val.loss,
        val_acc=val.accuracy,
        lr=";".join(f"{g['lr']:.3g}" for g in loop.optimizer.param_groups),
        trainable_params=count_trainable(loop.model),
        batch_size=state.batch_size,
        seconds=round(time.perf_counter() - started, 3),
    )


def _halve_batch(
    loop: _EpochLoop,
    state: TrainState,
    checkpoints: RunCheckpoints,
    *,
    epoch: int,
    log: Callable[[str], None],
    error: RuntimeError,
) -> None:
    """Out of memory: the epoch starts again from the last complete one at half the batch size."""
    import torch

    loop.workers.check_batch_can_shrink()  # several workers cannot shrink their batch in step
    if state.batch_size <= 1:
        raise TrainingError(
            "out of memory even at batch size 1; use a smaller --image-size or --device cpu"
        ) from error
    state.batch_size //= 2
    log(f"out of memory: retrying epoch {epoch} with batch size {state.batch_size}")
    if loop.config.device == "cuda":
        torch.cuda.empty_cache()
    loop.restore_optimizer(checkpoints.roll_back())
    loop.use_batch_size(state.batch_size)


def _keep_epoch(
    record: EpochRecord, state: TrainState, checkpoints: RunCheckpoints, optimizer: Any
) -> None:
    """Record the epoch; checkpoint it as the best when its validation loss is, and as the last."""
    state.history.append(record)
    state.epoch = record.epoch
    if record.val_loss < state.best_val_loss:
        state.best_val_loss, state.best_epoch, state.stale_epochs = record.val_loss, record.epoch, 0
        checkpoints.save_best()
    else:
        state.stale_epochs += 1
    checkpoints.save_resume_point(optimizer, state.to_dict())


def _epoch_line(record: EpochRecord, config: TrainConfig, *, best: bool) -> str:
    return (
        f"epoch {record.epoch:>3}/{config.epochs}  train loss {record.train_loss:.4f} acc {record.train_acc:.3f}  "
        f"val loss {record.val_loss:.4f} acc {record.val_acc:.3f}  {record.seconds:.1f}s"
        + ("  *" if best else "")
    )


__all__ = [
    "BEST_CHECKPOINT",
    "RESUME_POINT",
    "fit",
    "EvalResult",
    "NonFiniteLoss",
    "TrainConfig",
    "TrainState",
    "count_trainable",
    "evaluate",
    "is_out_of_memory",
    "lr_factor",
    "make_optimizer",
    "resolve_device",
    "seed_everything",
    "train_one_epoch",
]
