"""Surgery stage: replace the classifier head and plan which backbone blocks train.

    adapted = replace_head(imported, imported.probe, num_classes, hidden=None, dropout=0.0)
    plan = make_plan(adapted, "finetune", unfreeze=2, every=1)   # "scratch" re-initialises here
    plan.apply(adapted, epoch)            # requires_grad for that epoch; True when it changed
    plan.train_mode(adapted)              # train(), but BatchNorm of frozen blocks stays in eval
    plan.param_groups(adapted, lr=3e-4, decay=0.1)   # head at lr, k-th block below at lr*decay**k
    plan.frozen_prefix_end(epoch)         # ONNX value below the first trainable block, or None
    calibrate_scales(adapted, images)     # after "scratch": unit-variance layers (LSUV) on real images

    get_strategy("finetune")              # one registered Strategy: schedule, default epochs, lr
                                          # decay, augmentation, fast path, whether auto picks it

`adapted.features(x)` is the ONNX value `probe.feature_name`; `adapted.head(adapted.pool(f))`
turns such cached features into the same logits as `adapted(x)`.
"""

from pipeline.surgery.freeze import Block, discover_blocks
from pipeline.surgery.head import AdaptedModel, GlobalPool, make_head, replace_head
from pipeline.surgery.plan import FreezePlan, calibrate_scales, make_plan, reinitialise
from pipeline.surgery.strategies import (
    STRATEGIES,
    Strategy,
    get_strategy,
    register_strategy,
    strategy_names,
)

__all__ = [
    "STRATEGIES",
    "AdaptedModel",
    "Block",
    "FreezePlan",
    "GlobalPool",
    "Strategy",
    "calibrate_scales",
    "discover_blocks",
    "get_strategy",
    "make_head",
    "make_plan",
    "register_strategy",
    "reinitialise",
    "replace_head",
    "strategy_names",
]
