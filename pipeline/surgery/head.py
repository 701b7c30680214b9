"""Head replacement: cut the converted graph at the feature tensor and attach a new classifier."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

from zoo.errors import UnsupportedModel

if TYPE_CHECKING:
    import onnx

    from pipeline.convert.probe import ProbeResult


class GlobalPool(nn.Module):
    """Average over every spatial axis of an NCHW feature map, then flatten to [N, C].

    With `channels_last` the channels are the last axis ([N, H, W, C]: a MatMul head of a TF
    export reads its features so).
    """

    def __init__(self, *, channels_last: bool = False) -> None:
        super().__init__()
        self.channels_last = channels_last

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() > 2:
            spatial = (
                range(1, features.dim() - 1) if self.channels_last else range(2, features.dim())
            )
            features = features.mean(dim=tuple(spatial))
        return features.flatten(1)


class AdaptedModel(nn.Module):
    """A pretrained backbone up to the feature tensor, a global pool and a new classifier head.

    `features(x)` equals the ONNX value `probe.feature_name`, so `head(pool(cached_features))`
    computes the same logits as `model(x)`.
    """

    def __init__(
        self,
        backbone: fx.GraphModule,
        pool: nn.Module,
        head: nn.Sequential,
        *,
        probe: ProbeResult,
        onnx_outputs: dict[str, tuple[str, ...]],
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.pool = pool
        self.head = head
        self.probe = probe
        # ONNX output values of each backbone module, to name cut points in the ONNX graph.
        self.onnx_outputs = onnx_outputs

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The feature tensor that fed the old head (spatial or flat, as in the ONNX graph)."""
        return self.backbone(images)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled [N, C] features, the input of `head`."""
        return self.pool(self.backbone(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.backbone(images)))


def make_head(
    in_features: int, num_classes: int, *, hidden: int | None = None, dropout: float = 0.0
) -> nn.Sequential:
    """A Linear classifier, optionally with one hidden ReLU layer; dropout before each Linear."""
    layers: list[nn.Module] = []
    if hidden:
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers += [nn.Linear(in_features, hidden), nn.ReLU(inplace=False)]
        in_features = hidden
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(in_features, num_classes))
    return nn.Sequential(*layers)


def onnx_outputs_by_module(onnx_model: onnx.ModelProto) -> dict[str, tuple[str, ...]]:
    """ONNX output value names of each module onnx2torch created, keyed by module name."""
    from onnx2torch.onnx_graph import OnnxGraph

    return {
        name: tuple(node.output_values) for name, node in OnnxGraph(onnx_model.graph).nodes.items()
    }


def _value_node(
    module: fx.GraphModule, onnx_outputs: dict[str, tuple[str, ...]], value: str
) -> fx.Node:
    """The fx node that computes the ONNX value `value`."""
    for node in module.graph.nodes:
        if node.op == "call_module" and node.target in onnx_outputs:
            outputs = onnx_outputs[node.target]
            if len(outputs) == 1 and outputs[0] == value:
                return node
        if node.op == "call_function" and len(node.args) == 2 and isinstance(node.args[0], fx.Node):
            parent, position = node.args
            if parent.op == "call_module" and isinstance(position, int):
                outputs = onnx_outputs.get(parent.target, ())
                if position < len(outputs) and outputs[position] == value:
                    return node
    raise UnsupportedModel(
        f"feature tensor {value!r} was not found in the converted graph; report this model"
    )


def cut_graph(module: fx.GraphModule, end: fx.Node) -> fx.GraphModule:
    """A new GraphModule computing `end` from the same inputs, sharing no state with `module`."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in module.graph.nodes:
        if node.op == "output":
            continue
        env[node] = graph.node_copy(node, lambda arg: env[arg])
        if node is end:
            break
    graph.output(env[end])
    cut = fx.GraphModule(copy.deepcopy(module), graph)
    cut.graph.eliminate_dead_code()
    cut.recompile()
    cut.delete_all_unused_submodules()
    _drop_unused_initializers(cut)
    return cut


def _drop_unused_initializers(module: fx.GraphModule) -> None:
    """Remove old-head weights left in onnx2torch's initializer container: they would never train."""
    used = {
        node.target.split(".", 1)[1]
        for node in module.graph.nodes
        if node.op == "get_attr" and node.target.startswith("initializers.")
    }
    try:
        container = module.get_submodule("initializers")
    except AttributeError:
        return
    for store in (container._parameters, container._buffers):
        for name in [name for name in store if name not in used]:
            del store[name]


def replace_head(
    imported_or_module: Any,
    probe: ProbeResult,
    num_classes: int,
    *,
    hidden: int | None = None,
    dropout: float = 0.0,
    onnx_model: onnx.ModelProto | None = None,
) -> AdaptedModel:
    """Keep the graph up to `probe.feature_name`, pool it if spatial, and attach a new N-way head."""
    module = getattr(imported_or_module, "module", imported_or_module)
    onnx_model = (
        onnx_model if onnx_model is not None else getattr(imported_or_module, "onnx_model", None)
    )
    if onnx_model is None:
        raise TypeError(
            "replace_head needs the normalised ONNX graph: pass an ImportedModel or onnx_model="
        )
    if num_classes < 1:
        raise UnsupportedModel(
            f"a classifier needs at least one class, not {num_classes}; check the data"
        )
    onnx_outputs = onnx_outputs_by_module(onnx_model)
    end = _value_node(module, onnx_outputs, probe.feature_name)
    backbone = cut_graph(module, end)
    head = make_head(probe.feature_dim, num_classes, hidden=hidden, dropout=dropout)
    # A MatMul multiplies the last axis: its spatial features carry their channels last.
    pool = GlobalPool(channels_last=probe.head_kind == "matmul_add" and probe.feature_spatial)
    return AdaptedModel(backbone, pool, head, probe=probe, onnx_outputs=onnx_outputs)
