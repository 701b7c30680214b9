"""Out-of-distribution scores: how unlike the training images an input is ("none of these").

Each score is a small torch module over what the adapted model computes anyway, the pooled
features that enter the head and the (temperature-scaled) logits, so that it exports into the
ONNX graph as one more output and every runtime computes it. Higher always means more unusual.
The candidates are registered in `SCORES`; `DEFAULT_SCORE` is the one measured best
(BENCHMARKS.md, "Calibration and unknown inputs"): on a fine-tuned flowers5 model, `knn` had an
AUROC of 0.989 against textures10 and 0.998 against digits, `mahalanobis` 0.960 and 0.994,
`max_softmax` 0.883 and 0.961, `energy` 0.887 and 0.929.

- `max_softmax`: 1 - the top probability (Hendrycks and Gimpel 2017).
- `energy`: -logsumexp(logits) (Liu et al. 2020).
- `mahalanobis`: the smallest squared Mahalanobis distance to a class mean of the training
  features, with one covariance shared by the classes (Lee et al. 2018), shrunk by Ledoit-Wolf
  because a few hundred images do not determine a 1,280-dimensional covariance.
- `knn`: the cosine distance to the k-th nearest training feature (Sun et al. 2022).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import numpy as np
import torch
from sklearn.covariance import ledoit_wolf
from sklearn.metrics import roc_auc_score
from torch import nn

from pipeline.core.registry import Registry
from zoo.errors import DataError

DEFAULT_SCORE = "knn"
KNN_K = 5  # neighbours for `knn`: the k-th nearest training feature
# Training features `knn` keeps at most (evenly from each class): 2,048 x 1,280 float32 features
# of EfficientNet-Lite0 add 10 MB to the exported file. Sun et al. (2022) keep 1% of ImageNet.
KNN_BANK = 2048
EIGEN_FLOOR = 1e-6  # relative to the largest eigenvalue: directions without variance stay finite


class ScoreKind(NamedTuple):
    """A registered score: its module (rebuilt from saved tensors) and how it is fitted."""

    module: type[nn.Module]  # with `from_state(tensors)`: the module again from its state_dict
    fit: Callable[[np.ndarray, np.ndarray, int], nn.Module]  # (features, labels, classes) -> module


SCORES: Registry[ScoreKind] = Registry("out-of-distribution score", error=DataError)


class MaxSoftmax(nn.Module):
    """1 - max softmax probability."""

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor]) -> MaxSoftmax:
        return cls()

    def forward(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return 1.0 - torch.softmax(logits, dim=1).max(dim=1).values


class Energy(nn.Module):
    """-logsumexp of the logits: low energy (a high score here) for inputs unlike the training set."""

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor]) -> Energy:
        return cls()

    def forward(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return -torch.logsumexp(logits, dim=1)


class Mahalanobis(nn.Module):
    """min over classes of (f - mean_c)^T Σ^-1 (f - mean_c), computed as squared distances of
    whitened features (`whitening` W with W W^T = Σ^-1) to the whitened class means.

    The features are centred on the mean of the class means first: the expansion of the squared
    distance below then subtracts numbers of the size of the distances, not of the features'
    norms, and float32 keeps the score of an ordinary image to about 1e-5 of itself.
    """

    def __init__(
        self, whitening: torch.Tensor, projected_means: torch.Tensor, centre: torch.Tensor
    ) -> None:
        super().__init__()
        self.register_buffer("whitening", whitening.contiguous())
        self.register_buffer("projected_means", projected_means.contiguous())
        self.register_buffer("mean_norms", (projected_means * projected_means).sum(dim=1))
        self.register_buffer("centre", centre.contiguous())

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor]) -> Mahalanobis:
        return cls(state["whitening"], state["projected_means"], state["centre"])

    def forward(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        z = (features - self.centre) @ self.whitening
        # |z - m|^2 = |z|^2 - 2 z.m + |m|^2: a [N, C] matrix, never an [N, C, D] tensor.
        squared = (z * z).sum(dim=1, keepdim=True) - 2.0 * z @ self.projected_means.T
        distances = squared + self.mean_norms
        return torch.clamp(distances.min(dim=1).values, min=0.0)


class KNearest(nn.Module):
    """1 - cosine similarity to the k-th nearest training feature."""

    def __init__(self, bank: torch.Tensor, k: int = KNN_K) -> None:
        super().__init__()
        self.k = min(k, bank.shape[1])
        # [D, N]: the unit-length training features, as columns.
        self.register_buffer("bank", bank.contiguous())
        self.register_buffer("neighbours", torch.tensor(self.k))

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor]) -> KNearest:
        return cls(state["bank"], int(state["neighbours"]))

    def forward(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        similarity = nn.functional.normalize(features, dim=1) @ self.bank
        return 1.0 - torch.topk(similarity, self.k, dim=1).values[:, -1]


def _no_fit(module: type[nn.Module]) -> Callable[[np.ndarray, np.ndarray, int], nn.Module]:
    return lambda features, labels, num_classes: module()


def fit_mahalanobis(features: np.ndarray, labels: np.ndarray, num_classes: int) -> Mahalanobis:
    """Class means and one shrunk covariance of the training features (classes without any: left out)."""
    features = np.asarray(features, np.float64)
    labels = np.asarray(labels, np.int64)
    present = [c for c in range(num_classes) if (labels == c).any()]
    if not present or len(features) < 2:
        raise DataError(
            "too few training images to describe the training features; add training images"
        )
    means = np.stack([features[labels == c].mean(axis=0) for c in present])
    centred = features - means[np.searchsorted(present, labels)]
    covariance, _ = ledoit_wolf(centred, assume_centered=True)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    eigenvalues = np.maximum(eigenvalues, EIGEN_FLOOR * max(float(eigenvalues.max()), 1e-12))
    whitening = eigenvectors / np.sqrt(eigenvalues)
    centre = means.mean(axis=0)
    return Mahalanobis(
        torch.from_numpy(whitening.astype(np.float32)),
        torch.from_numpy(((means - centre) @ whitening).astype(np.float32)),
        torch.from_numpy(centre.astype(np.float32)),
    )


def fit_knn(features: np.ndarray, labels: np.ndarray, num_classes: int) -> KNearest:
    """The training features themselves at unit length, at most KNN_BANK of them."""
    if len(features) == 0:
        raise DataError("no training images to compare new images with; add training images")
    kept = _evenly(np.asarray(labels, np.int64), KNN_BANK)
    bank = torch.from_numpy(np.asarray(features, np.float32)[kept])
    return KNearest(nn.functional.normalize(bank, dim=1).T)


def _evenly(labels: np.ndarray, limit: int) -> np.ndarray:
    """Indices of at most `limit` rows, the classes taking turns (seeded: the same every run)."""
    if len(labels) <= limit:
        return np.arange(len(labels))
    rng = np.random.default_rng(0)
    queues = [rng.permutation(np.flatnonzero(labels == c)).tolist() for c in np.unique(labels)]
    chosen: list[int] = []
    while len(chosen) < limit:
        for queue in queues:
            if queue and len(chosen) < limit:
                chosen.append(queue.pop())
    return np.sort(np.asarray(chosen))


SCORES.add("max_softmax", ScoreKind(MaxSoftmax, _no_fit(MaxSoftmax)))
SCORES.add("energy", ScoreKind(Energy, _no_fit(Energy)))
SCORES.add("mahalanobis", ScoreKind(Mahalanobis, fit_mahalanobis))
SCORES.add("knn", ScoreKind(KNearest, fit_knn))


def fit_score(name: str, features: np.ndarray, labels: np.ndarray, num_classes: int) -> nn.Module:
    """The score `name` fitted to the training features (DataError for an unknown name)."""
    return SCORES.lookup(name).fit(features, labels, num_classes).eval()


def load_score(name: str, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """The score `name` rebuilt from its saved tensors."""
    return SCORES.lookup(name).module.from_state(state).eval()


def score(scorer: nn.Module, features: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """The scorer's values for arrays of features and (scaled) logits, as float64."""
    with torch.inference_mode():
        values = scorer(
            torch.from_numpy(np.asarray(features, np.float32)),
            torch.from_numpy(np.asarray(logits, np.float32)),
        )
    return values.double().numpy()


def threshold_for(scores: np.ndarray, keep: float) -> float:
    """The threshold that keeps `keep` of new images like `scores`' (score <= threshold).

    The ceil(keep * (n + 1))-th smallest of the n scores, as split conformal prediction takes
    it: a new image drawn like them then scores at most that with probability >= `keep`. (The
    plain quantile, the ceil(keep * n)-th, keeps a little less than `keep` of new images.)
    """
    if not 0.0 < keep <= 1.0:
        raise DataError(
            f"--keep {keep} is not a share of images; give a number in (0, 1], e.g. 0.95"
        )
    ordered = np.sort(np.asarray(scores, np.float64))
    if len(ordered) == 0:
        raise DataError(
            "no validation images to choose the unknown threshold on; add a val/ folder"
        )
    kept = min(len(ordered), max(1, math.ceil(keep * (len(ordered) + 1) - 1e-9)))
    return float(ordered[kept - 1])


def auroc(in_distribution: np.ndarray, out_of_distribution: np.ndarray) -> float:
    """The probability that an unknown image scores higher than a known one (ties count half)."""
    known = np.asarray(in_distribution, np.float64)
    unknown = np.asarray(out_of_distribution, np.float64)
    if not len(known) or not len(unknown):
        return float("nan")
    truth = np.concatenate([np.zeros(len(known)), np.ones(len(unknown))])
    return float(roc_auc_score(truth, np.concatenate([known, unknown])))
