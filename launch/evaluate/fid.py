"""FID and KID from feature matrices: pure float64 numpy, no model.

- FID (Heusel et al. 2017): |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)). The trace of the matrix
  square root is computed as the sum of square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2), which is
  symmetric positive semi-definite, so two `eigh` calls replace a general (and for rank-deficient
  covariances, i.e. fewer images than feature dimensions, unstable) `sqrtm`; small sets are reduced to
  the span of their features first (`fid_from_features`), which leaves the value unchanged.
- KID (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3,
  averaged over random subsets; its expectation is 0 when both sets come from one distribution (it can be
  slightly negative), unlike FID, which is biased upwards for small sets.
"""
from __future__ import annotations

import numpy as np


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], covariance [D, D]) of features [N, D] (N >= 2), float64, unbiased covariance."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need a [N >= 2, D] feature matrix, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """tr((S1 S2)^(1/2)) for symmetric PSD S1, S2."""
    r = _sqrt_psd(s1)
    m = r @ s2 @ r
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(w, 0, None)).sum())


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(s1, np.float64)), np.atleast_2d(np.asarray(s2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"statistics of different sizes: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt_product(s1, s2))
    return max(value, 0.0)   # rounding can leave -1e-12 for identical statistics


def fid_from_features(f1: np.ndarray, f2: np.ndarray) -> float:
    """FID of two feature sets. With fewer rows than dimensions (N1 + N2 + 1 < D) the features are first
    expressed in an orthonormal basis of the span of both centered sets and the mean difference: every
    term of the distance lives in that span, so the value is the same, and the eigen-decompositions are
    N-sized instead of D-sized (2048 for Inception)."""
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    mu1, mu2 = f1.mean(axis=0), f2.mean(axis=0)
    if f1.shape[0] + f2.shape[0] + 1 < f1.shape[1]:
        basis, _ = np.linalg.qr(np.concatenate([f1 - mu1, f2 - mu2, (mu1 - mu2)[None]]).T)
        f1, f2 = f1 @ basis, f2 @ basis
    return frechet_distance(*feature_stats(f1), *feature_stats(f2))


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.0) -> np.ndarray:
    return (x @ y.T / x.shape[1] + coef0) ** degree


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, degree: int = 3) -> float:
    """Unbiased MMD^2 between samples x [m, D] and y [n, D] (m, n >= 2)."""
    m, n = x.shape[0], y.shape[0]
    kxx, kyy, kxy = polynomial_kernel(x, x, degree), polynomial_kernel(y, y, degree), polynomial_kernel(x, y, degree)
    sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(sxx + syy - 2 * kxy.sum() / (m * n))


def kernel_inception_distance(f1: np.ndarray, f2: np.ndarray, num_subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0, degree: int = 3) -> tuple[float, float]:
    """(mean, std) of the unbiased MMD^2 over `num_subsets` random subsets of min(subset_size, N1, N2)
    rows drawn without replacement from each set."""
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    size = min(subset_size, f1.shape[0], f2.shape[0])
    if size < 2:
        raise ValueError("KID needs at least 2 feature rows in each set")
    rng = np.random.default_rng(seed)
    values = [mmd2_unbiased(f1[rng.choice(f1.shape[0], size, replace=False)],
                            f2[rng.choice(f2.shape[0], size, replace=False)], degree) for _ in range(num_subsets)]
    return float(np.mean(values)), float(np.std(values))
