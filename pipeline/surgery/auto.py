"""The `auto` strategy: what to freeze, from the data's size and its similarity to ImageNet.

The rule of thumb of the transfer-learning notes: small and similar data trains a head on frozen
features, small and unlike data fine-tunes a few top blocks, large data fine-tunes more (similar)
or everything (unlike). Similarity is measured, not asked: the pretrained head's mean confidence.
"""

from __future__ import annotations

from typing import Any

SMALL_PER_CLASS = 100  # "small" data, as the transfer-learning notes put it
SIMILAR_CONFIDENCE = (
    0.25  # mean top-1 probability of the ImageNet head above which data looks ImageNet-like
)


def choose_strategy(
    *, per_class: float, confidence: float, num_blocks: int
) -> tuple[str, int | None, str]:
    """The `auto` rule of thumb: dataset size x similarity to ImageNet -> (strategy, unfreeze, why)."""
    small = per_class < SMALL_PER_CLASS
    similar = confidence >= SIMILAR_CONFIDENCE
    size_word = f"{'small' if small else 'large'} data ({per_class:.0f} training images per class)"
    sim_word = (
        f"{'similar to' if similar else 'unlike'} ImageNet (the pretrained head's mean confidence "
        f"is {confidence:.2f})"
    )
    if small and similar:
        return "feature", None, f"{size_word}, {sim_word}: train only a new head on frozen features"
    if small:
        k = max(1, num_blocks // 4)
        return "finetune", k, f"{size_word}, {sim_word}: fine-tune the top {k} blocks"
    if similar:
        k = max(2, num_blocks // 2)
        return "finetune", k, f"{size_word}, {sim_word}: fine-tune the top {k} blocks"
    return "full", None, f"{size_word}, {sim_word}: fine-tune every layer from the pretrained start"


def imagenet_confidence(onnx_model: Any, *, input_name: str, batch: Any, output_kind: str) -> float:
    """Mean top-1 probability of the pretrained head on a batch: a cheap similarity estimate."""
    import numpy as np

    from pipeline.features import any_input_size, ort_session

    scores = ort_session(any_input_size(onnx_model)).run(
        None, {input_name: batch.astype(np.float32)}
    )[0]
    scores = scores.reshape(scores.shape[0], -1)
    if not output_kind.startswith("probabilities"):
        scores = np.exp(scores - scores.max(1, keepdims=True))
        scores /= scores.sum(1, keepdims=True)
    return float(scores.max(1).mean())
