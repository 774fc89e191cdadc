"""FID, KID, precision/recall and the classifier score of sets of image features (numpy only, float64).

    fid(features_a, features_b)                  # Fréchet distance of Gaussians fitted to each set
    kid(features_a, features_b)                  # (mean, std) of the unbiased MMD^2, cubic kernel
    precision_recall(real, fake)                 # k-NN manifold precision and recall (Kynkaanniemi et al. 2019)
    classifier_score(probabilities)              # (mean, std) of the Inception Score's formula over splits

The features come from whatever network :mod:`common.features` provides (Inception-v3 pool3, or a
classifier trained on the dataset by ``train_feature_net``); the numbers are only comparable between
runs that used the same features, which is why every report names them.

FID = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)) (Heusel et al. 2017). The trace of the
matrix square root is computed as the sum of the square roots of the eigenvalues of the symmetric PSD
matrix S_a^(1/2) S_b S_a^(1/2), which has the same eigenvalues as S_a S_b: no complex parts to discard,
and FID(a, a) is 0 to rounding. KID (Binkowski et al. 2018) averages the unbiased MMD^2 with the kernel
k(x, y) = (x.y / d + 1)^3 over random subsets, as torch-fidelity and torchmetrics do. Precision is the share of
generated samples inside the real data's manifold (the union of balls around each real feature reaching its k-th
nearest real neighbour), recall the share of real features inside the generated samples' manifold: FID mixes
the two (sharp samples of a few modes, or varied blurry ones), these tell them apart (LlamaGen's and ADM's
evaluators report them, k = 3). The classifier score is exp(E_x KL(p(y|x) || p(y))), Salimans et al.'s Inception
Score with whatever classifier gave the probabilities.
"""

from __future__ import annotations

import numpy as np


def _as_features(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"{name}: features must be (N >= 2, D), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: features contain NaN or inf")
    return x


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), covariance (D, D)) of features (N, D), in float64."""
    x = _as_features(features, "feature_stats")
    return x.mean(0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative rounding-noise eigenvalues clipped)."""
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray) -> float:
    """Fréchet distance between N(mu_a, cov_a) and N(mu_b, cov_b)."""
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    cov_a, cov_b = np.asarray(cov_a, np.float64), np.asarray(cov_b, np.float64)
    if mu_a.shape != mu_b.shape or cov_a.shape != cov_b.shape or cov_a.shape != (len(mu_a), len(mu_a)):
        raise ValueError(f"mismatched statistics: means {mu_a.shape} {mu_b.shape}, covariances {cov_a.shape} "
                         f"{cov_b.shape} (were both sets embedded with the same features?)")  # fmt: skip
    root_a = _sqrt_psd(cov_a)
    middle = root_a @ cov_b @ root_a  # same eigenvalues as cov_a @ cov_b, but symmetric PSD
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu_a - mu_b
    return float(max(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_covmean, 0.0))


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two feature sets (N_a, D) and (N_b, D)."""
    a, b = _as_features(features_a, "fid: first set"), _as_features(features_b, "fid: second set")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"fid: feature sizes differ ({a.shape[1]} vs {b.shape[1]})")
    return frechet_distance(*feature_stats(a), *feature_stats(b))


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    d, m = x.shape[1], len(x)
    k_xx = (x @ x.T / d + 1) ** 3
    k_yy = (y @ y.T / d + 1) ** 3
    k_xy = (x @ y.T / d + 1) ** 3
    off_diag = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(off_diag - 2 * k_xy.mean())


def kid(
    features_a: np.ndarray, features_b: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """(mean, std) over `subsets` random subsets (without replacement) of min(subset_size, N_a, N_b) rows."""
    a, b = _as_features(features_a, "kid: first set"), _as_features(features_b, "kid: second set")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"kid: feature sizes differ ({a.shape[1]} vs {b.shape[1]})")
    if subsets < 1 or subset_size < 2:  # one subset's MMD^2 reported with a spread of 0; 1 row divides by 0
        raise ValueError(f"kid: subsets must be >= 1 and subset_size >= 2, got {subsets} and {subset_size}")
    m = min(subset_size, len(a), len(b))
    rng = np.random.default_rng(seed)
    values = [_mmd2_unbiased(a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)])
              for _ in range(subsets)]  # fmt: skip
    return float(np.mean(values)), float(np.std(values))


DISTANCE_ROWS = 1024  # rows of a pairwise-distance block: 1,024 x 10,000 float64 = 80 MB


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances (len(a), len(b))."""
    squared = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.clip(squared, 0, None))


def _kth_neighbour_radii(x: np.ndarray, k: int) -> np.ndarray:
    """(N,) each row's distance to its k-th nearest other row (column 0 of the sorted distances is itself)."""
    return np.concatenate([np.partition(_distances(x[i : i + DISTANCE_ROWS], x), k, axis=1)[:, k]
                           for i in range(0, len(x), DISTANCE_ROWS)])  # fmt: skip


def _covered(points: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """(M,) whether each point lies in some centre's ball."""
    return np.concatenate([(_distances(points[i : i + DISTANCE_ROWS], centres) <= radii[None, :]).any(1)
                           for i in range(0, len(points), DISTANCE_ROWS)])  # fmt: skip


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """(precision, recall) of features `fake` (M, D) against `real` (N, D), with k-th-neighbour balls."""
    a, b = _as_features(real, "precision_recall: real"), _as_features(fake, "precision_recall: generated")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"precision_recall: feature sizes differ ({a.shape[1]} vs {b.shape[1]})")
    if not 1 <= k < min(len(a), len(b)):
        raise ValueError(f"precision_recall: k must be in [1, {min(len(a), len(b)) - 1}], got {k}")
    precision = _covered(b, a, _kth_neighbour_radii(a, k)).mean()
    recall = _covered(a, b, _kth_neighbour_radii(b, k)).mean()
    return float(precision), float(recall)


def classifier_score(probabilities: np.ndarray, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """(mean, std) over `splits` parts of exp(E KL(p(y|x) || p(y))) for class probabilities (N, K): from 1 (every
    image given the same distribution) to K (each image sure of its class, the classes equally often). The rows
    are shuffled (`seed`) before the split: samples come sorted by class, and a part of one class scores 1."""
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or len(p) < splits or splits < 1:
        raise ValueError(f"classifier_score: probabilities must be (N >= {splits}, K), got shape {p.shape}")
    p = p[np.random.default_rng(seed).permutation(len(p))]
    scores = []
    for part in np.array_split(p, splits):
        marginal = part.mean(0, keepdims=True)
        kl = (part * (np.log(np.clip(part, 1e-30, None)) - np.log(np.clip(marginal, 1e-30, None)))).sum(1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))
