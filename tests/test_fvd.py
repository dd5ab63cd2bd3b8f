"""FVD: the Fréchet distance against closed forms and scipy, and streaming statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fvdm.eval.frechet import FeatureStats, frechet_distance, frechet_from_stats

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- Fréchet distance


def random_spd(rng, d: int, cond: float = 10.0) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return (q * np.geomspace(1.0, 1.0 / cond, d)) @ q.T


def rotated(diag: np.ndarray, q: np.ndarray) -> np.ndarray:
    return (q * diag) @ q.T


def test_equal_covariances_give_the_squared_mean_distance():
    rng = np.random.default_rng(0)
    s = random_spd(rng, 12) * 3.0
    mu1, mu2 = rng.normal(size=12), rng.normal(size=12)
    d = frechet_distance(mu1, s, mu2, s)
    assert d.value == pytest.approx(float(np.sum((mu1 - mu2) ** 2)), rel=1e-10)
    assert abs(d.trace_term) < 1e-10


@pytest.mark.parametrize("d, rank_a, rank_b", [(7, 7, 7), (7, 3, 3), (40, 5, 40)])
def test_commuting_covariances_match_the_closed_form(d, rank_a, rank_b):
    """S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T: d = |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2, also
    when they are rank-deficient (zeros in a or b: after rotation, rounding noise of ~1e-16 in
    the null space, whose square root would cost 1e-8 of accuracy if it were kept)."""
    rng = np.random.default_rng(d + rank_a)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a, b = rng.uniform(0.1, 5, d), rng.uniform(0.1, 5, d)
    a[rank_a:], b[rank_b:] = 0.0, 0.0
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)).value == pytest.approx(want, rel=1e-12)
    assert frechet_distance(mu1, rotated(a, q), mu2, rotated(b, q)).value == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("d", [2, 16, 64])
def test_matches_scipy_sqrtm_on_random_spd(d):
    from scipy import linalg

    rng = np.random.default_rng(d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d, cond=100.0) * 2.0
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    root = linalg.sqrtm(s1 @ s2)
    want = float(np.real(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * root)))
    got = frechet_distance(mu1, s1, mu2, s2)
    assert got.value == pytest.approx(want, rel=1e-9)
    assert got.trace_sqrt == pytest.approx(float(np.real(np.trace(root))), rel=1e-10)
    ref = frechet_distance(mu1, s1, mu2, s2, method="sqrtm")
    assert ref.value == pytest.approx(want, rel=1e-12) and ref.notes == ()


def test_rank_deficient_sample_covariances_give_a_finite_nonnegative_distance():
    """Fewer samples than dimensions (the reference's negative / 1e14 FVDs)."""
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(6, 40)) * 5 + 3, rng.normal(size=(5, 40))
    a, b = FeatureStats().update(x), FeatureStats().update(y)
    for method in ("eigh", "sqrtm"):
        d = frechet_from_stats(a, b, method=method)
        (m1, s1), (m2, s2) = a.mean_cov(), b.mean_cov()
        lower = np.sum((m1 - m2) ** 2) + (np.sqrt(np.trace(s1)) - np.sqrt(np.trace(s2))) ** 2
        upper = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2)
        assert np.isfinite(d.value) and lower * (1 - 1e-9) <= d.value <= upper
        same = frechet_from_stats(a, a, method=method)
        assert 0.0 <= same.value < 1e-9 * np.trace(s1)
    # identical rank-deficient sets: the eigen-method is exact to rounding
    assert frechet_from_stats(a, a).value < 1e-12 * np.trace(a.mean_cov()[1])


def test_symmetric_and_zero_for_identical_sets():
    rng = np.random.default_rng(4)
    a = FeatureStats().update(rng.normal(size=(50, 10)))
    b = FeatureStats().update(rng.normal(size=(60, 10)) @ rng.normal(size=(10, 10)) + 1)
    assert frechet_from_stats(a, b).value == pytest.approx(frechet_from_stats(b, a).value, rel=1e-11)
    d = frechet_from_stats(a, a)
    assert d.value == 0.0 or d.value < 1e-12
    assert frechet_from_stats(a, b).value > 1.0


def test_a_negative_rounding_result_is_clamped_with_a_reason():
    s = np.diag([1e6, 1.0, 1e-3])
    d = frechet_distance(np.zeros(3), s, np.zeros(3), s)
    assert d.value == 0.0
    assert all("rounding" in n for n in d.notes)


def test_bad_statistics_raise_naming_the_argument():
    eye = np.eye(3)
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance(np.zeros(3), eye, np.zeros(3), np.diag([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="sigma1"):
        frechet_distance(np.zeros(3), np.ones((3, 2)), np.zeros(3), eye)
    with pytest.raises(ValueError, match="mu2"):
        frechet_distance(np.zeros(3), eye, np.full(3, np.nan), eye)


def test_streaming_statistics_equal_batch_statistics():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(61, 8)) @ rng.normal(size=(8, 8)) + 4.0
    stats = FeatureStats()
    for lo, hi in [(0, 1), (1, 8), (8, 50), (50, 61)]:
        stats.update(torch.from_numpy(x[lo:hi]).float() if lo == 1 else x[lo:hi])
    mean, cov = stats.mean_cov()
    x[1:8] = x[1:8].astype(np.float32)  # the float32 batch, as it was added
    assert stats.count == 61
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(x, rowvar=False, bias=True), rtol=1e-10, atol=1e-12)  # 1/N
    # merging two partial statistics gives the statistics of the union
    merged = FeatureStats().update(x[:30]).merge(FeatureStats().update(x[30:]))
    np.testing.assert_allclose(merged.mean_cov()[1], cov, rtol=1e-10, atol=1e-12)


def test_covariance_is_one_over_n_and_survives_a_large_offset():
    assert FeatureStats().update(np.array([[0.0], [2.0]])).mean_cov()[1][0, 0] == 1.0
    rng = np.random.default_rng(6)
    x = rng.normal(size=(1000, 3)) + 1e8
    stats = FeatureStats()
    for chunk in np.array_split(x, 7):
        stats.update(chunk)
    exact = np.cov(x - x.mean(0), rowvar=False, bias=True)
    np.testing.assert_allclose(stats.mean_cov()[1], exact, rtol=1e-6, atol=1e-6)
