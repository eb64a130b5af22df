"""Fréchet distance against scipy's sqrtm, its zero and symmetry, streaming statistics, and the reference cache."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from ulcore.eval.fid import (FeatureStats, RunningStats, feature_statistics, fid_from_stats, frechet_distance,
                             load_reference_stats, reference_key, store_reference_stats, trace_sqrt_product)


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


@pytest.mark.parametrize("n1,n2", [(30, 20), (20, 64), (64, 64), (300, 40)])
def test_low_rank_factor_gives_the_scipy_value(n1, n2):
    """Statistics of n <= D features carry F (S = F^T F); the n x n route equals scipy's sqrtm on the D x D
    product, whichever side (or both) has the factor, and the full route when the factor is dropped."""
    rng = np.random.default_rng(n1 + n2)
    d = 64
    a = feature_statistics(rng.normal(size=(n1, d)) @ rng.normal(size=(d, d)) * 0.3)
    b = feature_statistics(rng.normal(size=(n2, d)) * 1.5 + 0.4)
    assert (a.factor is not None) == (n1 <= d) and b.factor is not None
    np.testing.assert_allclose(b.factor.T @ b.factor, b.sigma, rtol=1e-9, atol=1e-12)
    ref = _scipy_fid(a.mu, a.sigma, b.mu, b.sigma)
    full = fid_from_stats(FeatureStats(a.mu, a.sigma, a.n), FeatureStats(b.mu, b.sigma, b.n))
    assert fid_from_stats(a, b) == pytest.approx(ref, rel=1e-6)
    assert fid_from_stats(b, a) == pytest.approx(ref, rel=1e-6)
    assert fid_from_stats(a, b) == pytest.approx(full, rel=1e-7)
    # against 40-digit arithmetic (mpmath, a sympy dependency of torch) the n x n route is the more exact one
    mpmath = pytest.importorskip("mpmath")
    other, factored = (a, b) if a.factor is None or (b.factor is not None and b.n < a.n) else (b, a)
    with mpmath.workdps(40):
        f, s = mpmath.matrix(factored.factor.tolist()), mpmath.matrix(other.sigma.tolist())
        root_sum = sum(mpmath.sqrt(max(e, 0)) for e in mpmath.eigsy(f * s * f.T, eigvals_only=True))
        d = mpmath.matrix((a.mu - b.mu).tolist())
        exact = float((d.T * d)[0] + sum(a.sigma[i, i] for i in range(64)) + sum(b.sigma[i, i] for i in range(64))
                      - 2 * root_sum)
    assert abs(fid_from_stats(a, b) - exact) <= 1e-9 * exact


def test_running_stats_keep_the_factor_only_while_it_is_smaller():
    rng = np.random.default_rng(6)
    feats = rng.normal(size=(40, 32))
    run = RunningStats()
    for start in range(0, 30, 10):
        run.add(feats[start:start + 10])
    np.testing.assert_allclose(run.stats().factor, feature_statistics(feats[:30]).factor, rtol=1e-12)
    run.add(feats[30:])  # 40 > D = 32 features: the factor would be the larger description
    assert run.rows is None and run.stats().factor is None


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
    st1 = feature_statistics(rng.normal(size=(30, 8)))
    key_hash, key = reference_key(split="train", resolution=32, weights_sha256="abc", n=30, data_fingerprint="d1")
    assert load_reference_stats(str(tmp_path), key_hash, key) is None
    info1 = store_reference_stats(str(tmp_path), key_hash, key, st1)
    st2, info2 = load_reference_stats(str(tmp_path), key_hash, key)
    assert not info1["cached"] and info2["cached"]
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
