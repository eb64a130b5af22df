"""Fréchet distance against scipy's sqrtm, its zero and symmetry, streaming statistics, and the reference cache."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from ulcore.eval.fid import (FeatureStats, RunningStats, cached_reference_stats, feature_statistics,
                             fid_from_stats, frechet_distance, load_reference_stats, reference_key,
                             trace_sqrt_product)


def _random_stats(rng, d: int, n: int):
    a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3 + rng.normal(size=d)
    return a.mean(0), np.cov(a, rowvar=False)


def _scipy_fid(mu1, s1, mu2, s2) -> float:
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("d,n,seed", [(8, 50, 0), (64, 500, 1), (128, 1000, 2)])
def test_frechet_equals_scipy_sqrtm_reference(d, n, seed):
    rng = np.random.default_rng(seed)
    mu1, s1 = _random_stats(rng, d, n)
    mu2, s2 = _random_stats(rng, d, n)
    ours, ref = frechet_distance(mu1, s1, mu2, s2), _scipy_fid(mu1, s1, mu2, s2)
    assert ours == pytest.approx(ref, rel=1e-6)
    # the cross term on its own, too
    assert trace_sqrt_product(s1, s2) == pytest.approx(np.trace(scipy.linalg.sqrtm(s1 @ s2)).real, rel=1e-6)


def test_frechet_of_identical_statistics_is_zero_and_symmetric():
    rng = np.random.default_rng(3)
    feats = rng.normal(size=(40, 256))  # N < D: a singular covariance, the usual small-N FID case
    st = feature_statistics(feats)
    assert fid_from_stats(st, st) == pytest.approx(0.0, abs=1e-8)
    other = feature_statistics(rng.normal(size=(40, 256)) + 0.5)
    assert fid_from_stats(st, other) == pytest.approx(fid_from_stats(other, st), rel=1e-8)


def test_frechet_closed_form_for_diagonal_gaussians():
    # diagonal: FID = |mu1-mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    expected = 5.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_running_stats_match_numpy():
    rng = np.random.default_rng(4)
    feats = rng.normal(size=(103, 16)) * 3 + 1
    run = RunningStats()
    for start in range(0, 103, 25):
        run.add(feats[start:start + 25])
    st = run.stats()
    assert st.n == 103
    np.testing.assert_allclose(st.mu, feats.mean(0), rtol=1e-12)
    np.testing.assert_allclose(st.sigma, np.cov(feats, rowvar=False), rtol=1e-9, atol=1e-12)


def test_reference_stats_are_cached_by_key(tmp_path):
    rng = np.random.default_rng(5)
    batches = [rng.normal(size=(10, 8)) for _ in range(3)]
    key_hash, key = reference_key(split="train", resolution=32, weights_sha256="abc", n=30, data_fingerprint="d1")
    calls = []

    def compute():
        calls.append(1)
        yield from batches

    st1, info1 = cached_reference_stats(str(tmp_path), key_hash, key, compute)
    st2, info2 = cached_reference_stats(str(tmp_path), key_hash, key, compute)
    assert len(calls) == 1 and not info1["cached"] and info2["cached"]
    assert info1["file_sha256"] == info2["file_sha256"] and st2.n == 30
    assert (tmp_path / "data" / "fid_refs" / f"{key_hash}.npz").is_file()
    np.testing.assert_allclose(st1.sigma, st2.sigma)
    # a different N, weights file or data gives a different key; a file whose key differs is not reused
    other_hash, other = reference_key(split="train", resolution=32, weights_sha256="xyz", n=30, data_fingerprint="d1")
    assert other_hash != key_hash
    assert load_reference_stats(str(tmp_path), other_hash, other) is None
    (tmp_path / "data" / "fid_refs" / f"{other_hash}.npz").write_bytes(
        FeatureStats(st1.mu, st1.sigma, 30).to_npz_bytes(key))  # right name, wrong key inside
    assert load_reference_stats(str(tmp_path), other_hash, other) is None
