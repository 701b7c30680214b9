"""Likely label errors: images whose given label the feature probe, cross-validated, finds unlikely.

The probe is the `feature` head itself: a linear classifier on the standardised frozen features,
solved with L-BFGS (pipeline.train.solve). Each image's class probabilities come from the probe
fitted on the other folds (out-of-fold), so no image vouches for its own label. cleanlab ranks the
images by the out-of-fold probability of their given label ("self-confidence") and flags those
its confident-learning rule counts as errors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.train.solve import FeatureSet, _solve_linear, standardisation

FOLDS = 5
# The inverse regularisation of the out-of-fold probe, as scikit-learn's C: strong, so that a
# fold cannot learn its own wrong labels (measured on flowers5 with 5% flipped labels: 0.01
# ranks more of them first than 0.1 or 1).
PROBE_C = 0.01
MAX_EVALUATIONS = 300  # L-BFGS passes per fold


@dataclass(frozen=True)
class LabelRanking:
    """Out-of-fold probabilities and what cleanlab makes of them."""

    probabilities: np.ndarray  # [N, C]
    quality: np.ndarray  # [N] the probability of the given label: low is suspicious
    order: np.ndarray  # indices, most suspicious first
    flagged: np.ndarray  # [N] bool: counted as label errors by confident learning


def _folds(labels: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """Stratified folds: each class's images dealt out in a seeded order."""
    rng = np.random.default_rng(seed)
    assigned = np.zeros(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        assigned[rng.permutation(members)] = np.arange(len(members)) % folds
    return [np.flatnonzero(assigned == fold) for fold in range(folds)]


def out_of_fold(
    features: np.ndarray, labels: np.ndarray, *, classes: int, seed: int = 0
) -> np.ndarray:
    """[N, classes] probabilities, each row from the probe fitted without that image's fold."""
    import torch

    inputs = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    targets = torch.from_numpy(labels.astype(np.int64))
    counts = np.bincount(labels)
    folds = min(FOLDS, max(2, int(counts[counts > 0].min())))
    probabilities = np.full((len(labels), classes), 1.0 / classes)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small problems: more threads only spin against each other
    try:
        for held in _folds(labels, folds, seed):
            train = np.setdiff1d(np.arange(len(labels)), held)
            if not len(held) or not len(train):
                continue
            mean, std = standardisation(inputs[train])
            fold_set = FeatureSet((inputs[train] - mean) / std, targets[train])
            weight, bias, _, _ = _solve_linear(
                fold_set,
                num_classes=classes,
                weight_decay=1.0 / (PROBE_C * len(train)),
                max_evaluations=MAX_EVALUATIONS,
                smoothing=0.0,
            )
            logits = ((inputs[held] - mean) / std) @ weight.T + bias
            probabilities[held] = torch.softmax(logits, dim=1).numpy()
    finally:
        torch.set_num_threads(threads)
    return probabilities


def rank_labels(
    features: np.ndarray, labels: np.ndarray, *, classes: int, seed: int = 0
) -> LabelRanking:
    """Every image ranked by how unlikely the out-of-fold probe finds its label."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    labels = np.asarray(labels, dtype=np.int64)
    probabilities = out_of_fold(features, labels, classes=classes, seed=seed)
    quality = get_label_quality_scores(labels, probabilities, method="self_confidence")
    try:
        flagged = find_label_issues(labels, probabilities, filter_by="prune_by_noise_rate")
    except ValueError:  # too few images of some class for its noise estimate
        flagged = np.zeros(len(labels), dtype=bool)
    return LabelRanking(probabilities, quality, np.argsort(quality, kind="stable"), flagged)
