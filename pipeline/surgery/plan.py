"""The freezing plan the training loop follows: requires_grad, BatchNorm modes and learning rates."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from pipeline.surgery.freeze import Block, discover_blocks
from pipeline.surgery.head import AdaptedModel
from pipeline.surgery.strategies import Strategy, get_strategy


@dataclass
class FreezePlan:
    """Which blocks train at each epoch under one strategy."""

    strategy: Strategy
    blocks: list[Block]
    unfreeze: int | None = None
    every: int = 1
    applied: int | None = field(default=None)  # trainable top blocks after the last apply()
    # ONNX value ending the frozen prefix, indexed by the number of trainable top blocks.
    boundaries: tuple[str | None, ...] = ()

    def trainable_blocks(self, epoch: int) -> int:
        """How many top blocks train at `epoch`."""
        return self.strategy.schedule(epoch, len(self.blocks), self.unfreeze, self.every)

    def _frozen(self, count: int) -> list[Block]:
        return self.blocks[: len(self.blocks) - count]

    def apply(self, adapted: AdaptedModel, epoch: int) -> bool:
        """Set requires_grad for `epoch`; True when the trainable set changed."""
        count = self.trainable_blocks(epoch)
        frozen = {name for block in self._frozen(count) for name in block.param_names}
        everything_trains = count >= len(self.blocks)
        blocked = {name for block in self.blocks for name in block.param_names}
        for name, param in adapted.named_parameters():
            if name in frozen:
                param.requires_grad_(False)
            elif name.startswith("backbone.") and name not in blocked:
                # A backbone weight in no block trains only when the whole backbone does.
                param.requires_grad_(everything_trains)
            else:
                param.requires_grad_(True)
        changed = count != self.applied
        self.applied = count
        return changed

    def train_mode(self, adapted: AdaptedModel) -> None:
        """Training mode, except BatchNorm layers of frozen blocks keep their running statistics."""
        adapted.train()
        count = self.applied if self.applied is not None else self.trainable_blocks(0)
        for block in self._frozen(count):
            for module_name in block.module_names:
                module = adapted.get_submodule(module_name)
                # BN stays in eval mode while frozen: small batches would overwrite the ImageNet statistics.
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def param_groups(
        self, adapted: AdaptedModel, *, lr: float, decay: float = 0.1, floor: float = 0.01
    ) -> list[dict[str, Any]]:
        """Optimizer groups: head at `lr`, the k-th unfrozen block below it at lr*max(decay**k, floor)."""
        params = dict(adapted.named_parameters())
        if self.strategy.reinit:
            decay = 1.0  # random weights need the full rate everywhere
        groups = [
            {
                "name": "head",
                "params": [
                    p
                    for n, p in params.items()
                    if not n.startswith("backbone.") and p.requires_grad
                ],
                "lr": lr,
            }
        ]
        in_blocks: set[str] = set()
        for depth, block in enumerate(reversed(self.blocks), start=1):
            in_blocks.update(block.param_names)
            trainable = [params[name] for name in block.param_names if params[name].requires_grad]
            if trainable:
                rate = lr * max(decay**depth, floor)
                groups.append({"name": block.name, "params": trainable, "lr": rate})
        stray = [
            p
            for n, p in params.items()
            if n.startswith("backbone.") and n not in in_blocks and p.requires_grad
        ]
        if stray:
            groups.append({"name": "other", "params": stray, "lr": groups[-1]["lr"]})
        return [group for group in groups if group["params"]]

    def frozen_prefix_end(self, epoch: int) -> str | None:
        """ONNX value where the frozen prefix ends: every frozen block is computed before it.

        None when nothing is frozen or no single tensor separates frozen from trainable layers.
        """
        count = self.trainable_blocks(epoch)
        return self.boundaries[count] if count < len(self.boundaries) else None


def _boundaries(adapted: AdaptedModel, blocks: list[Block]) -> tuple[str | None, ...]:
    """For each number of trainable top blocks, the single ONNX value below them (or None)."""
    found: list[str | None] = [adapted.probe.feature_name]
    for count in range(1, len(blocks)):
        found.append(_boundary(adapted, blocks[len(blocks) - count]))
    return tuple(found) + (None,)


def _boundary(adapted: AdaptedModel, first: Block) -> str | None:
    targets = {name.removeprefix("backbone.") for name in first.module_names}
    targets |= {name.removeprefix("backbone.") for name in first.param_names}
    nodes = list(adapted.backbone.graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    last_use = [max((position[user] for user in node.users), default=-1) for node in nodes]
    start = next(
        (
            i
            for i, n in enumerate(nodes)
            if n.op in ("call_module", "get_attr") and n.target in targets
        ),
        None,
    )
    if start is None:
        return None
    # Walk the cut down from the first trainable layer until one tensor alone crosses it.
    for cut in range(start, 0, -1):
        crossing = [
            node
            for i, node in enumerate(nodes[:cut])
            if node.op != "get_attr" and last_use[i] >= cut
        ]
        if len(crossing) == 1 and crossing[0].op != "placeholder":
            return _onnx_value(adapted, crossing[0])
    return None


def _onnx_value(adapted: AdaptedModel, node: fx.Node) -> str | None:
    if node.op == "call_module":
        outputs = adapted.onnx_outputs.get(node.target, ())
        return outputs[0] if len(outputs) == 1 else None
    if node.op == "call_function" and len(node.args) == 2 and isinstance(node.args[0], fx.Node):
        parent, index = node.args
        outputs = adapted.onnx_outputs.get(parent.target, ())
        return outputs[index] if isinstance(index, int) and index < len(outputs) else None
    return None


def reinitialise(adapted: AdaptedModel) -> None:
    """Re-initialise every weight as torch's layer defaults do (`reset_parameters()`)."""
    for module in adapted.modules():
        if module is not adapted and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    container = getattr(adapted.backbone, "initializers", None)
    if container is not None:
        with torch.no_grad():
            for param in container.parameters(recurse=False):
                # Weights onnx2torch kept outside layers (MatMul right-hand sides): init as nn.Linear does.
                if param.dim() >= 2:
                    nn.init.kaiming_uniform_(param, a=math.sqrt(5))
                else:
                    nn.init.zeros_(param)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """`model.eval()` for a while, then each module's own mode back.

    Restored per module: a frozen backbone keeps its BatchNorm in eval while the head trains.
    """
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes.items():
            module.training = training


class _Measured(Exception):
    """Raised by a hook once the layer being calibrated has produced its output."""


def calibrate_scales(
    adapted: AdaptedModel, batch: torch.Tensor, *, tolerance: float = 0.1, max_steps: int = 8
) -> int:
    """Layer-sequential unit variance (Mishkin & Matas, 2016) after `reinitialise`; returns layers scaled.

    Zoo files mostly come with BatchNorm folded into the convolutions, so a re-initialised network
    has nothing that normalises its activations, and with torch's default init the signal fades
    within a few blocks: `scratch` then stays at chance (digits, 20 images per class: 10% test
    accuracy). Scaling each convolution and linear layer, in the order the forward pass meets
    them, until its output has unit variance on real images makes it trainable (88%).
    """
    # Eval: no dropout; BatchNorm, if any, holds fresh statistics and passes values through.
    with eval_mode(adapted), torch.no_grad():
        order = _forward_order(adapted, batch)
        for layer in order:
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
            for _ in range(max_steps):
                std = _output_std(adapted, layer, batch)
                if not math.isfinite(std) or std < 1e-8 or abs(std - 1.0) < tolerance:
                    break
                layer.weight.div_(std)
    return len(order)


def _forward_order(adapted: AdaptedModel, batch: torch.Tensor) -> list[nn.Module]:
    """The convolution and linear layers in the order one forward pass on `batch` runs them."""
    order: list[nn.Module] = []
    hooks = [
        layer.register_forward_hook(lambda m, _i, _o: order.append(m) if m not in order else None)
        for layer in adapted.modules()
        if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Linear))
    ]
    try:
        adapted(batch)
    finally:
        for hook in hooks:
            hook.remove()
    return order


def _output_std(adapted: AdaptedModel, layer: nn.Module, batch: torch.Tensor) -> float:
    """The standard deviation of `layer`'s output on `batch`; the forward pass stops right there."""
    seen: list[torch.Tensor] = []

    def stop(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        seen.append(output)
        raise _Measured

    hook = layer.register_forward_hook(stop)
    try:
        adapted(batch)
    except _Measured:
        pass
    finally:
        hook.remove()
    return float(seen[0].float().std()) if seen else float("nan")


def make_plan(
    adapted: AdaptedModel, strategy: str, *, unfreeze: int | None = None, every: int = 1
) -> FreezePlan:
    """A freezing plan for `strategy`; for `scratch` this re-initialises `adapted` in place."""
    chosen = get_strategy(strategy)
    blocks = discover_blocks(adapted)
    plan = FreezePlan(
        chosen,
        blocks,
        unfreeze=unfreeze,
        every=max(1, every),
        boundaries=_boundaries(adapted, blocks),
    )
    if chosen.reinit:
        reinitialise(adapted)
    return plan
