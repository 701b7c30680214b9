"""Surgery stage: head replacement, block discovery and freezing strategies."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx_builders import TINY_GRAPHS, build_torch, import_cached, input_size, save

from pipeline.convert import ImportedModel, import_model
from pipeline.surgery import (
    STRATEGIES,
    AdaptedModel,
    calibrate_scales,
    discover_blocks,
    get_strategy,
    make_plan,
    register_strategy,
    replace_head,
    strategy_names,
)
from zoo.errors import NotFound

ARCHS_FAST = ["resnet18"]
ARCHS_SLOW = [
    "mobilenet_v2",
    "squeezenet1_0",
    "squeezenet1_1",
    "shufflenet_v2_x0_5",
    "googlenet",
    "densenet121",
    "efficientnet_b0",
    "efficientnet_lite0",
]
ALL_ARCHS = [pytest.param(a, id=a) for a in ARCHS_FAST] + [
    pytest.param(a, id=a, marks=pytest.mark.slow) for a in ARCHS_SLOW
]


_imported = import_cached  # one import per architecture and opset for the whole session


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny workloads on a shared 2-core box: OpenMP threads spin-waiting on each other cost 100x."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny(kind: str, tmp_path: Path) -> ImportedModel:
    return import_model(save(TINY_GRAPHS[kind][0](), tmp_path / f"{kind}.onnx"))


def images_for(imported: ImportedModel, batch: int, seed: int = 0) -> torch.Tensor:
    found = imported.probe
    height, width = found.input_size
    shape = (batch, height, width, 3) if found.layout == "NHWC" else (batch, 3, height, width)
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def onnx_features(imported: ImportedModel, images: torch.Tensor) -> np.ndarray:
    """The feature tensor computed by onnxruntime on the ONNX graph cut at probe.feature_name."""
    import onnxruntime as ort

    found = imported.probe
    cut = onnx.utils.Extractor(imported.onnx_model).extract_model(
        [found.input_name], [found.feature_name]
    )
    session = ort.InferenceSession(cut.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {found.input_name: images.numpy()})[0]


def check_head_replacement(imported: ImportedModel) -> AdaptedModel:
    adapted = replace_head(imported, imported.probe, 7).eval()
    for batch in (1, 5):
        images = images_for(imported, batch)
        with torch.no_grad():
            logits = adapted(images)
            assert logits.shape == (batch, 7)
            cached = torch.from_numpy(onnx_features(imported, images))
            np.testing.assert_allclose(
                adapted.head(adapted.pool(cached)).numpy(), logits.numpy(), atol=1e-4, rtol=1e-4
            )
            np.testing.assert_allclose(
                adapted.features(images).numpy(), cached.numpy(), atol=1e-4, rtol=1e-4
            )
    assert all(p.requires_grad for p in adapted.head.parameters())
    return adapted


@pytest.mark.parametrize("kind", list(TINY_GRAPHS))
def test_tiny_head_replacement(kind: str, tmp_path: Path) -> None:
    check_head_replacement(tiny(kind, tmp_path))


@pytest.mark.parametrize("opset", [13, 17])
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_arch_head_replacement(arch: str, opset: int, exported_onnx) -> None:
    adapted = check_head_replacement(_imported(str(exported_onnx(arch, opset))))
    # The old classifier's weights are gone: only backbone weights and the new head remain.
    old_head = adapted.probe.num_classes * adapted.probe.feature_dim
    assert all(p.numel() != old_head for p in adapted.backbone.parameters())


def test_hidden_layer_and_dropout_head(tmp_path: Path) -> None:
    imported = tiny("gemm", tmp_path)
    adapted = replace_head(imported, imported.probe, 3, hidden=16, dropout=0.2)
    kinds = [type(layer).__name__ for layer in adapted.head]
    assert kinds == ["Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert adapted.head[1].in_features == imported.probe.feature_dim
    assert adapted.eval()(images_for(imported, 4)).shape == (4, 3)


@pytest.mark.parametrize("opset", [13, 17])
@pytest.mark.parametrize("kind", ["nhwc_softmax", "conv_4d", "fixed_batch"])
def test_adapted_model_exports_to_onnx(kind: str, opset: int, tmp_path: Path) -> None:
    import onnxruntime as ort

    imported = tiny(kind, tmp_path)
    adapted = replace_head(imported, imported.probe, 4).eval()
    buffer = io.BytesIO()
    torch.onnx.export(
        adapted,
        images_for(imported, 2),
        buffer,
        dynamo=False,
        opset_version=opset,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    images = images_for(imported, 3, seed=5)
    (exported,) = session.run(None, {"input": images.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(exported, adapted(images).numpy(), atol=1e-5, rtol=1e-5)


def test_blocks_cover_the_backbone_in_order(exported_onnx) -> None:
    imported = _imported(str(exported_onnx("resnet18", 13)))
    adapted = replace_head(imported, imported.probe, 2)
    blocks = discover_blocks(adapted)
    assert [block.name for block in blocks] == [
        "conv1+bn1",
        "layer1",
        "layer2",
        "layer3",
        "layer4/0",
        "layer4/1",
    ]
    names = [name for block in blocks for name in block.param_names]
    backbone = {f"backbone.{name}" for name, _ in adapted.backbone.named_parameters()}
    assert len(names) == len(set(names)) and set(names) == backbone
    assert sum(block.num_params for block in blocks) == sum(
        p.numel() for p in adapted.backbone.parameters()
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("arch", "minimum"), [("efficientnet_lite0", 7), ("mobilenet_v2", 10), ("densenet121", 5)]
)
def test_block_counts(arch: str, minimum: int, exported_onnx) -> None:
    imported = _imported(str(exported_onnx(arch, 13)))
    blocks = discover_blocks(replace_head(imported, imported.probe, 2))
    assert minimum <= len(blocks) <= 20


def test_tiny_graph_falls_back_to_even_blocks(tmp_path: Path) -> None:
    imported = tiny("gemm", tmp_path)
    blocks = discover_blocks(replace_head(imported, imported.probe, 2))
    # Three weight layers (stem conv with its BN, two stage convs): one block each.
    assert [len(block.module_names) for block in blocks] == [2, 1, 1]


def test_strategy_registry() -> None:
    assert strategy_names()[:5] == ["feature", "finetune", "gradual", "full", "scratch"]
    with pytest.raises(ValueError, match="'full'"):
        register_strategy("full", description="again")(lambda e, n, k, every: n)
    with pytest.raises(NotFound, match="'frozen-ish'"):
        get_strategy("frozen-ish")
    assert STRATEGIES["scratch"].reinit and not STRATEGIES["full"].reinit


def test_gradual_schedule_and_apply(tmp_path: Path) -> None:
    imported = tiny("shared_weights", tmp_path)
    adapted = replace_head(imported, imported.probe, 2)
    plan = make_plan(adapted, "gradual", unfreeze=3, every=2)
    assert len(plan.blocks) == 4
    assert [plan.trainable_blocks(epoch) for epoch in range(9)] == [0, 0, 1, 1, 2, 2, 3, 3, 3]
    assert plan.apply(adapted, 0) is True
    assert plan.apply(adapted, 1) is False
    assert plan.apply(adapted, 2) is True
    trainable = {name for name, p in adapted.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in adapted.head.named_parameters(prefix="head")} | set(
        plan.blocks[-1].param_names
    )
    assert make_plan(adapted, "gradual").trainable_blocks(100) == len(plan.blocks)
    assert make_plan(adapted, "finetune").trainable_blocks(0) == 2


def test_param_groups_lower_rates_for_lower_blocks(exported_onnx) -> None:
    imported = _imported(str(exported_onnx("resnet18", 13)))
    adapted = replace_head(imported, imported.probe, 3)
    plan = make_plan(adapted, "finetune", unfreeze=2)
    plan.apply(adapted, 0)
    groups = plan.param_groups(adapted, lr=1e-3, decay=0.1)
    assert [g["name"] for g in groups] == ["head", "layer4/1", "layer4/0"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 1e-4, 1e-5])
    grouped = {id(p) for g in groups for p in g["params"]}
    assert grouped == {id(p) for p in adapted.parameters() if p.requires_grad}


def test_frozen_prefix_end_names_onnx_values(exported_onnx) -> None:
    imported = _imported(str(exported_onnx("resnet18", 13)))
    adapted = replace_head(imported, imported.probe, 3)
    values = {out for node in imported.onnx_model.graph.node for out in node.output}
    assert make_plan(adapted, "feature").frozen_prefix_end(0) == imported.probe.feature_name
    assert make_plan(adapted, "full").frozen_prefix_end(0) is None
    end = make_plan(adapted, "finetune", unfreeze=2).frozen_prefix_end(0)
    assert end in values and end.startswith("/layer3/")
    # The ONNX graph cut there computes the input of the trainable layer4.
    onnx.utils.Extractor(imported.onnx_model).extract_model([imported.probe.input_name], [end])


def _bn_stats(adapted: AdaptedModel) -> dict[str, torch.Tensor]:
    return {
        name: buffer.clone()
        for name, buffer in adapted.named_buffers()
        if name.endswith(("running_mean", "running_var"))
    }


def check_training_step(
    imported: ImportedModel, strategy: str, *, unfreeze: int | None = None
) -> None:
    """One SGD step changes exactly the parameters the plan trains; frozen BN statistics stay put."""
    torch.manual_seed(0)
    adapted = replace_head(imported, imported.probe, 3)
    before_init = {name: p.detach().clone() for name, p in adapted.named_parameters()}
    plan = make_plan(adapted, strategy, unfreeze=unfreeze)
    plan.apply(adapted, 0)
    count = plan.trainable_blocks(0)
    frozen_blocks = plan.blocks[: len(plan.blocks) - count]
    frozen = {name for block in frozen_blocks for name in block.param_names}
    if strategy == "scratch":
        weights = {n: p for n, p in adapted.named_parameters() if n.startswith("backbone.")}
        assert all(not torch.equal(before_init[n], p) for n, p in weights.items() if p.dim() > 1)
    params_before = {name: p.detach().clone() for name, p in adapted.named_parameters()}
    stats_before = _bn_stats(adapted)
    groups = plan.param_groups(adapted, lr=0.1)
    rate = {id(p): group["lr"] for group in groups for p in group["params"]}
    optimizer = torch.optim.SGD(groups, lr=0.1)
    plan.train_mode(adapted)
    images = images_for(imported, 4, seed=3)
    loss = torch.nn.functional.cross_entropy(adapted(images), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    optimizer.step()
    moved: set[str] = set()
    for name, param in adapted.named_parameters():
        if not torch.equal(param.detach(), params_before[name]):
            moved.add(name)
        if name in frozen:
            assert not param.requires_grad and param.grad is None and name not in moved, name
            continue
        assert param.requires_grad and param.grad is not None, name
        step = float((rate[id(param)] * param.grad).abs().max())
        if step > 1e-5 * (1 + float(params_before[name].abs().max())):
            assert name in moved, f"{name} has a gradient but did not change"
    assert {name for name, _ in adapted.head.named_parameters(prefix="head")} <= moved
    # Deep random networks pass back tiny gradients, but every trainable block must move somewhere.
    for block in plan.blocks[len(plan.blocks) - count :]:
        assert moved & set(block.param_names), f"trainable block {block.name} did not change"
    stats_after = _bn_stats(adapted)
    frozen_modules = {m for block in frozen_blocks for m in block.module_names}
    for name, value in stats_after.items():
        module = name.rsplit(".", 1)[0]
        if module in frozen_modules:
            assert torch.equal(value, stats_before[name]), f"frozen BN statistics moved: {name}"
        else:
            assert not torch.equal(value, stats_before[name]), (
                f"trainable BN statistics stuck: {name}"
            )


STRATEGY_CASES = [
    ("feature", None),
    ("finetune", 2),
    ("gradual", None),
    ("full", None),
    ("scratch", None),
]


@pytest.mark.parametrize(("strategy", "unfreeze"), STRATEGY_CASES)
def test_strategies_on_tiny_graph(strategy: str, unfreeze: int | None, tmp_path: Path) -> None:
    check_training_step(tiny("gemm", tmp_path), strategy, unfreeze=unfreeze)


@pytest.mark.parametrize(("strategy", "unfreeze"), STRATEGY_CASES)
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_strategies_on_archs(arch: str, strategy: str, unfreeze: int | None, exported_onnx) -> None:
    check_training_step(_imported(str(exported_onnx(arch, 13))), strategy, unfreeze=unfreeze)


def _output_stds(adapted: AdaptedModel, images: torch.Tensor) -> list[float]:
    """The output standard deviation of every convolution and linear layer, in forward order."""
    stds: list[float] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: stds.append(float(out.std())))
        for m in adapted.modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    ]
    with torch.no_grad():
        adapted.eval()(images)
    for hook in hooks:
        hook.remove()
    return stds


def test_calibrate_scales_revives_a_reinitialised_network_without_batchnorm(tmp_path: Path) -> None:
    # Exported as zoo files mostly are: eval mode, BatchNorm folded into the convolutions.
    size = input_size("resnet18")
    torch.onnx.export(
        build_torch("resnet18").eval(),
        torch.randn(1, 3, size, size),
        tmp_path / "folded.onnx",
        dynamo=False,
        opset_version=13,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    imported = import_model(tmp_path / "folded.onnx")
    torch.manual_seed(0)
    adapted = replace_head(imported, imported.probe, 3)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in adapted.modules())
    make_plan(adapted, "scratch")
    images = images_for(imported, 8, seed=5)
    faded = _output_stds(adapted, images)
    assert faded[-1] < 0.05  # torch's default init: the signal fades through 20 unnormalised layers
    adapted.train()
    adapted.backbone.eval()
    hooks_before = sum(len(m._forward_hooks) for m in adapted.modules())
    scaled = calibrate_scales(adapted, images, tolerance=0.1)
    assert adapted.training and not adapted.backbone.training  # each module's mode is restored
    assert sum(len(m._forward_hooks) for m in adapted.modules()) == hooks_before
    assert scaled == len(faded)
    assert all(0.9 - 1e-3 <= std <= 1.1 + 1e-3 for std in _output_stds(adapted, images))


def _renamed(path: Path, rename, tmp_path: Path) -> ImportedModel:
    model = onnx.load(str(path))
    for node in model.graph.node:
        node.name = rename(node.name)
    return import_model(save(model, tmp_path / "renamed.onnx"))


def test_blocks_from_mxnet_style_names(exported_onnx, tmp_path: Path) -> None:
    def mxnet(name: str) -> str:
        # '/layer1/layer1.0/conv1/Conv' -> 'resnetv15_layer1_0_conv1_fwd', as MXNet exports name nodes
        scope = name.strip("/").split("/")[:-1]
        return (
            "_".join(["resnetv15", *(scope[-1:] if len(scope) < 2 else scope[1:])]).replace(
                ".", "_"
            )
            + "_fwd"
        )

    imported = _renamed(exported_onnx("resnet18", 13), mxnet, tmp_path)
    blocks = discover_blocks(replace_head(imported, imported.probe, 2))
    assert 5 <= len(blocks) <= 20
    assert [block.name for block in blocks][:4] == [
        "resnetv15/conv1+bn1",
        "resnetv15/layer1",
        "resnetv15/layer2",
        "resnetv15/layer3",
    ]


def test_unnamed_nodes_fall_back_to_even_blocks(exported_onnx, tmp_path: Path) -> None:
    imported = _renamed(exported_onnx("resnet18", 13), lambda name: "", tmp_path)
    adapted = replace_head(imported, imported.probe, 2)
    blocks = discover_blocks(adapted)
    assert len(blocks) == 6
    sizes = [sum(1 for m in block.module_names if "Conv" in m) for block in blocks]
    assert max(sizes) - min(sizes) <= 3  # about equal numbers of conv layers
    assert sum(block.num_params for block in blocks) == sum(
        p.numel() for p in adapted.backbone.parameters()
    )
