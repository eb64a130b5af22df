"""Fréchet Inception Distance: feature statistics, the Fréchet distance between two Gaussians, and reference
statistics computed once per (split, resolution, weights sha256, N, data) and cached under a content hash. N is
the number of images from the start of the split (`eval.reference_samples` for the gFID reference; 0 = the whole
split, the standard protocol: ADM's ImageNet reference statistics, for instance, cover the whole training set).

FID = ||mu1 - mu2||² + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})  (Heusel et al. 2017, eq. 6).

The trace term needs the eigenvalues of a D x D matrix (D = 2048: ~5-14 s of LAPACK on 2 cores). When one side
comes from n <= D feature vectors, its covariance is S = F^T F with F the (n, D) centred features / sqrt(n - 1),
and S1 F^T F has the same non-zero eigenvalues as the n x n symmetric PSD matrix F S1 F^T (AB and BA share them):
the same number, exactly, from an n x n problem. Statistics computed in this process keep that factor
(`FeatureStats.factor`); cached files hold mu and sigma only.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass

import numpy as np

from ulcore import storage


@dataclass(frozen=True)
class FeatureStats:
    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64, unbiased (N - 1) covariance
    n: int
    factor: np.ndarray | None = None  # (n, D) centred features / sqrt(n - 1), sigma = factor.T @ factor; n <= D only

    def to_npz_bytes(self, meta: dict | None = None) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, mu=self.mu, sigma=self.sigma, n=np.int64(self.n),
                 meta=np.array(json.dumps(meta or {}, sort_keys=True)))
        return buf.getvalue()

    @classmethod
    def from_npz_bytes(cls, data: bytes) -> tuple[FeatureStats, dict]:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return cls(z["mu"], z["sigma"], int(z["n"])), json.loads(str(z["meta"]))


def feature_statistics(features: np.ndarray) -> FeatureStats:
    """Mean and unbiased covariance of (N, D) features, in float64 (N >= 2)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need (N >= 2, D) features, got shape {f.shape}")
    mu = f.mean(axis=0)
    return FeatureStats(mu, np.cov(f, rowvar=False), f.shape[0], _factor(f, mu))


def _factor(f: np.ndarray, mu: np.ndarray) -> np.ndarray | None:
    """Centred features / sqrt(n - 1) when they are a smaller description of the covariance (n <= D)."""
    return (f - mu) / np.sqrt(f.shape[0] - 1) if f.shape[0] <= f.shape[1] else None


class RunningStats:
    """Accumulates sum and outer products batch by batch (float64); the features themselves are held only while
    there are at most D of them (then they are the cheaper description, see the module docstring)."""

    def __init__(self) -> None:
        self.n = 0
        self.total: np.ndarray | None = None
        self.outer: np.ndarray | None = None
        self.rows: list[np.ndarray] | None = []

    def add(self, features: np.ndarray) -> None:
        f = np.asarray(features, dtype=np.float64)
        if self.total is None:
            self.total = np.zeros(f.shape[1])
            self.outer = np.zeros((f.shape[1], f.shape[1]))
        self.n += f.shape[0]
        self.total += f.sum(axis=0)
        self.outer += f.T @ f
        if self.rows is not None and self.n <= f.shape[1]:
            self.rows.append(f)
        else:
            self.rows = None

    def stats(self) -> FeatureStats:
        if self.n < 2:
            raise ValueError(f"need at least 2 feature vectors, got {self.n}")
        mu = self.total / self.n
        sigma = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        factor = _factor(np.concatenate(self.rows), mu) if self.rows else None
        return FeatureStats(mu, (sigma + sigma.T) / 2, self.n, factor)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix via eigh, negative round-off eigenvalues clipped to 0."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _sqrt_eigenvalue_sum(m: np.ndarray) -> float:
    """sum sqrt(eig(m)) of a symmetric PSD m; eigenvalues within LAPACK's round-off of 0 (numpy's matrix_rank
    tolerance, n eps max|eig|) count as 0: their square roots would add sqrt(round-off) each."""
    w = np.linalg.eigvalsh((m + m.T) / 2)
    tolerance = w.shape[0] * np.finfo(np.float64).eps * np.abs(w).max(initial=0.0)
    return float(np.sqrt(w[w > tolerance]).sum())


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, factor2: np.ndarray | None = None) -> float:
    """tr((S1 S2)^{1/2}) = sum sqrt(eig(S1^{1/2} S2 S1^{1/2})): that matrix is symmetric PSD and similar to
    S1 S2 (when S1 is invertible; by continuity otherwise), so no complex sqrtm and no offset hack is needed.
    With `factor2` (S2 = F^T F, F (n, D)): sum sqrt(eig(F S1 F^T)), the same eigenvalues from an n x n matrix."""
    s1 = np.asarray(sigma1, dtype=np.float64)
    if factor2 is not None:
        f = np.asarray(factor2, dtype=np.float64)
        return _sqrt_eigenvalue_sum(f @ s1 @ f.T)
    r = _psd_sqrt(s1)
    return _sqrt_eigenvalue_sum(r @ np.asarray(sigma2, dtype=np.float64) @ r)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     factor2: np.ndarray | None = None) -> float:
    """||mu1 - mu2||² + tr(S1 + S2) - 2 tr((S1 S2)^{1/2}), clipped at 0 against round-off (FID, eq. 6)."""
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2, factor2)
    return float(max(value, 0.0))


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    """FID of two statistics; through the smaller of the two factors when either side has one (symmetric)."""
    if a.factor is not None and (b.factor is None or a.factor.shape[0] < b.factor.shape[0]):
        a, b = b, a
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma, b.factor)


# ---------------------------------------------------------------------------------------------- reference stats


def reference_key(*, split: str, resolution: int, weights_sha256: str, n: int, data_fingerprint: str,
                  frames: int = 1) -> tuple[str, dict]:
    """(hash, key dict): what a cached reference-statistics file was computed from; n = 0 is the whole split."""
    key = {"split": split, "resolution": resolution, "frames": frames, "weights_sha256": weights_sha256, "n": n,
           "data": data_fingerprint, "resize": "tf-legacy-bilinear-299", "version": 1}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16], key


def data_fingerprint(shard_uris: list[str]) -> str:
    """Identity of the shards: names plus their stats JSON contents (written by the shard stage, cheap to read),
    without run statistics (shards.content_digest)."""
    from ulcore.data.shards import content_digest, read_stats

    digest = hashlib.sha256()
    for uri in shard_uris:
        digest.update(uri.rsplit("/", 1)[-1].encode())
        stats = read_stats(uri)
        if stats is not None:
            digest.update(content_digest(stats).encode())
    return digest.hexdigest()[:16]


def reference_uri(root: str, key_hash: str) -> str:
    return storage.join(root, "data", "fid_refs", f"{key_hash}.npz")


def floor_uri(root: str, train_key_hash: str, held_out_key_hash: str) -> str:
    """The cached FID floor of two reference statistics, next to them."""
    return storage.join(root, "data", "fid_refs", f"floor-{train_key_hash}-{held_out_key_hash}.json")


def load_reference_stats(root: str, key_hash: str, key: dict) -> tuple[FeatureStats, dict] | None:
    """The cached statistics for `key`, or None when absent or computed from something else."""
    uri = reference_uri(root, key_hash)
    if not storage.exists(uri):
        return None
    data = storage.read_bytes(uri)
    stats, meta = FeatureStats.from_npz_bytes(data)
    if meta != key:
        return None
    return stats, {"key_hash": key_hash, "file_sha256": hashlib.sha256(data).hexdigest(), "uri": uri,
                   "cached": True, "n": stats.n}


def store_reference_stats(root: str, key_hash: str, key: dict, stats: FeatureStats) -> dict:
    """Write the statistics (with their key inside) atomically; returns the info dict."""
    uri = reference_uri(root, key_hash)
    data = stats.to_npz_bytes(key)
    storage.write_bytes(uri, data)
    return {"key_hash": key_hash, "file_sha256": hashlib.sha256(data).hexdigest(), "uri": uri, "cached": False,
            "n": stats.n}


__all__ = ["FeatureStats", "RunningStats", "feature_statistics", "trace_sqrt_product", "frechet_distance",
           "fid_from_stats", "reference_key", "data_fingerprint", "reference_uri", "floor_uri", "load_reference_stats",
           "store_reference_stats"]
