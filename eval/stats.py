"""Mergeable feature statistics (count, sum x, sum x x^T in float64) and the Frechet distance.

Workers each keep a Statistics over their share; merging is exact addition, so merged statistics
equal single-pass ones whatever the split. The covariance uses N - 1 (as numpy.cov in ADM's evaluator).
"""

from dataclasses import dataclass

import numpy as np


@dataclass
class Statistics:
    n: int
    sum: np.ndarray  # (d,) float64
    outer: np.ndarray  # (d, d) float64

    @classmethod
    def empty(cls, dim: int) -> "Statistics":
        return cls(0, np.zeros(dim), np.zeros((dim, dim)))

    @classmethod
    def of(cls, features: np.ndarray) -> "Statistics":
        f = np.asarray(features, dtype=np.float64)
        return cls(len(f), f.sum(0), f.T @ f)

    def add(self, features: np.ndarray) -> "Statistics":
        return self.merge(Statistics.of(features))

    def merge(self, other: "Statistics") -> "Statistics":
        return Statistics(self.n + other.n, self.sum + other.sum, self.outer + other.outer)

    @property
    def mu(self) -> np.ndarray:
        return self.sum / self.n

    @property
    def sigma(self) -> np.ndarray:
        if self.n < 2:
            raise ValueError("a covariance needs at least 2 samples")
        mu = self.mu
        return (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)

    def to_npz(self) -> dict:
        return {"n": np.array(self.n), "sum": self.sum, "outer": self.outer}

    @classmethod
    def from_npz(cls, data) -> "Statistics":
        return cls(int(data["n"]), np.asarray(data["sum"], np.float64), np.asarray(data["outer"], np.float64))


def sqrtm_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2, sqrt_sigma2=None) -> float:
    """|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2), in float64.

    tr sqrt(S1 S2) = tr sqrt(B S1 B) with B = sqrt(S2) symmetric PSD: a symmetric eigenproblem, so no
    complex parts to discard (ADM's evaluator takes the real part of scipy's sqrtm and fails above 1e-3).
    S2 is the reference's: pass its square root when it is known (cached per reference file), and the
    Frechet distance costs one eigvalsh instead of an eigh and an eigvalsh.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"statistics of different dimensions: mu {mu1.shape} and sigma {s1.shape} vs mu {mu2.shape} "
                         f"and sigma {s2.shape}")
    b = sqrtm_psd(s2) if sqrt_sigma2 is None else np.asarray(sqrt_sigma2, np.float64)
    m = b @ s1 @ b
    w = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sqrt(np.clip(w, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)
