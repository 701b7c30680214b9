"""Backbone blocks: the ordered groups of layers a freezing plan trains or freezes.

How many of them train at each epoch is the strategy's schedule (pipeline.surgery.strategies).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

from pipeline.surgery.head import AdaptedModel

TARGET_BLOCKS = 6  # split name groups until at least this many blocks...
MAX_BLOCKS = 20  # ...without exceeding this many
MIN_BLOCKS = 4  # fewer named groups than this: fall back to evenly sized groups
# onnx2torch names unnamed nodes by op type and a counter ("Conv_12"): no path to group by.
GENERATED_NAME = re.compile(r"^[A-Z][A-Za-z0-9]*(_\d+)?$")


@dataclass(frozen=True)
class Block:
    """An ordered group of parametric layers of the backbone (bottom to top)."""

    name: str
    module_names: tuple[
        str, ...
    ]  # qualified in the adapted model, e.g. "backbone.layer1/0/conv1/Conv"
    param_names: tuple[str, ...]  # qualified parameter names in the adapted model
    num_params: int


class _Unit(NamedTuple):
    """One parametric layer in execution order."""

    path: tuple[str, ...]  # module-path tokens of its ONNX node name, without the op type
    module_name: str
    param_names: tuple[str, ...]
    numel: int
    norm_only: bool  # only 1-D parameters (a BatchNorm, a bias): belongs with the layer before it


def _units(adapted: AdaptedModel) -> list[_Unit]:
    backbone = adapted.backbone
    params = dict(backbone.named_parameters())
    targets = [n.target for n in backbone.graph.nodes if n.op == "call_module"]
    separator = "/" if any("/" in target for target in targets) else "_"
    units: list[_Unit] = []
    seen: set[str] = set()
    for node in backbone.graph.nodes:
        if node.op == "call_module":
            owner = node.target
            names = [
                f"{owner}.{name}" for name, _ in backbone.get_submodule(owner).named_parameters()
            ]
        elif node.op == "get_attr" and node.target in params:
            users = [user.target for user in node.users if user.op == "call_module"]
            owner, names = (users[0] if users else node.target), [node.target]
        else:
            continue
        names = [name for name in names if name not in seen]
        if not names:
            continue
        seen.update(names)
        module_name = node.target if node.op == "call_module" else node.target.rsplit(".", 1)[0]
        units.append(
            _Unit(
                path=() if GENERATED_NAME.match(owner) else tuple(owner.split(separator)[:-1]),
                module_name=f"backbone.{module_name}",
                param_names=tuple(f"backbone.{name}" for name in names),
                numel=sum(params[name].numel() for name in names),
                norm_only=all(params[name].dim() <= 1 for name in names),
            )
        )
    return units


class _Group(NamedTuple):
    """Consecutive units and the name keys (path prefixes) of the groups merged into it."""

    units: list[_Unit]
    keys: tuple[tuple[str, ...], ...]
    level: int  # path level its units share; splitting looks deeper


def _split(group: _Group) -> list[_Group] | None:
    """Split a group at the first path level where its units differ, keeping runs consecutive."""
    depth = max(len(unit.path) for unit in group.units)
    for at in range(group.level, depth):
        keys = [unit.path[: at + 1] for unit in group.units]
        if len(set(keys)) > 1:
            runs: list[_Group] = []
            for unit, key in zip(group.units, keys, strict=True):
                if runs and runs[-1].keys[0] == key:
                    runs[-1].units.append(unit)
                else:
                    runs.append(_Group([unit], (key,), at + 1))
            return runs
    return None


def _named_groups(units: list[_Unit]) -> list[_Group]:
    """Split the largest group by its next name level until there are enough blocks."""
    groups = [_Group(list(units), ((),), 0)]
    while len(_merge_norm_groups(groups)) < TARGET_BLOCKS:
        by_size = sorted(range(len(groups)), key=lambda i: -sum(u.numel for u in groups[i].units))
        for position in by_size:
            runs = _split(groups[position])
            if not runs:
                continue
            candidate = groups[:position] + runs + groups[position + 1 :]
            if len(_merge_norm_groups(candidate)) <= MAX_BLOCKS:
                groups[position : position + 1] = runs
                break
        else:
            break
    return groups


def _merge_norm_groups(groups: list[_Group]) -> list[_Group]:
    """Attach groups of only BatchNorms/biases to the layer group before them."""

    def join(first: _Group, second: _Group) -> _Group:
        return _Group(first.units + second.units, first.keys + second.keys, first.level)

    merged: list[_Group] = []
    for group in groups:
        if merged and all(unit.norm_only for unit in group.units):
            merged[-1] = join(merged[-1], group)
        else:
            merged.append(group)
    if len(merged) > 1 and all(unit.norm_only for unit in merged[0].units):
        merged[:2] = [join(merged[0], merged[1])]
    return merged


def _even_groups(units: list[_Unit]) -> list[_Group]:
    """Consecutive groups of about equal numbers of weight layers, norms staying with their layer."""
    layers: list[list[_Unit]] = []
    for unit in units:
        if layers and unit.norm_only:
            layers[-1].append(unit)
        else:
            layers.append([unit])
    count = max(1, min(TARGET_BLOCKS, len(layers)))
    bounds = [round(i * len(layers) / count) for i in range(count + 1)]
    return [
        _Group(sum(layers[start:end], []), (), 0)
        for start, end in zip(bounds[:-1], bounds[1:], strict=True)
    ]


def _compact(tokens: list[str]) -> list[str]:
    """Drop the repeats exporters write into scope names: features/features/0 -> features/0."""
    tokens = list(tokens)
    changed = True
    while changed:
        changed = False
        for width in range(1, len(tokens) // 2 + 1):
            for start in range(len(tokens) - 2 * width + 1):
                if tokens[start : start + width] == tokens[start + width : start + 2 * width]:
                    del tokens[start + width : start + 2 * width]
                    changed = True
                    break
            if changed:
                break
    return tokens


def _block_name(group: _Group, index: int) -> str:
    """The group's name prefix (e.g. layer4/0); merged groups join theirs with '+' (conv1+bn1)."""
    names = [_compact(list(key)) for key in group.keys if key]
    if not names:
        return f"block{index}"
    common = 0
    while all(len(name) > common + 1 and name[common] == names[0][common] for name in names):
        common += 1
    if len(names) == 1:
        return "/".join(names[0])
    head = "/".join(names[0][:common])
    tail = "+".join("/".join(name[common:]) for name in names)
    return f"{head}/{tail}" if head else tail


def discover_blocks(adapted: AdaptedModel) -> list[Block]:
    """Ordered blocks of the backbone, from module-path prefixes of the ONNX node names."""
    units = _units(adapted)
    if not units:
        return []
    groups = _merge_norm_groups(_named_groups(units))
    if len(groups) < MIN_BLOCKS:
        groups = _even_groups(units)
    blocks = []
    names: set[str] = set()
    for index, group in enumerate(groups):
        name = _block_name(group, index)
        if name in names:
            name = f"{name}#{index}"
        names.add(name)
        blocks.append(
            Block(
                name=name,
                module_names=tuple(unit.module_name for unit in group.units),
                param_names=tuple(name for unit in group.units for name in unit.param_names),
                num_params=sum(unit.numel for unit in group.units),
            )
        )
    return blocks
