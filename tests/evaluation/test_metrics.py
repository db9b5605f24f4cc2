"""ADM-style metrics: Frechet distance, IS, precision/recall, streaming moments, npz I/O."""

import numpy as np
import pytest
from scipy import linalg

from patch_forcing.evaluation import metrics as M


def _random_cov(rng, d, rank=None, scale=1.0):
    a = rng.standard_normal((d, rank or 2 * d)) * scale
    return a @ a.T / a.shape[1], a


# ----------------------------------------------------------------------------- FID

def test_frechet_zero_for_identical_stats():
    rng = np.random.default_rng(0)
    mu, (sigma, _) = rng.standard_normal(32), _random_cov(rng, 32)
    assert abs(M.frechet_distance(mu, sigma, mu, sigma)) < 1e-9


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    v1, v2 = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    exact = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    for method in ("eigh", "sqrtm"):
        got = M.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2), method=method)
        assert got == pytest.approx(exact, rel=1e-10)


def test_frechet_matches_scipy_sqrtm_formula():
    rng = np.random.default_rng(2)
    d = 48
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, _ = _random_cov(rng, d)
    s2, _ = _random_cov(rng, d, scale=0.7)
    covmean = linalg.sqrtm(s1 @ s2).real
    ref = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1 + s2 - 2 * covmean)
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-9)
    assert M.frechet_distance(mu1, s1, mu2, s2, method="sqrtm") == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("d,r", [(64, 5), (256, 40)])
def test_frechet_rank_deficient_is_exact(d, r):
    # S1 = A A^T, S2 = B B^T of rank r < d: tr (S1 S2)^(1/2) = nuclear norm of A^T B.
    rng = np.random.default_rng(d)
    a, b = rng.standard_normal((d, r)), rng.standard_normal((d, r))
    s1, s2 = a @ a.T, b @ b.T
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    exact = ((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2)
             - 2 * np.linalg.svd(a.T @ b, compute_uv=False).sum())
    got = M.frechet_distance(mu1, s1, mu2, s2)
    # (scipy's sqrtm route is off by ~1e-8 relative here; the eigh route by rounding only.)
    assert np.isfinite(got) and got == pytest.approx(exact, rel=1e-12, abs=1e-9)
    # Identical rank-deficient statistics give 0, not sqrt(rounding noise) artefacts.
    assert abs(M.frechet_distance(mu1, s1, mu1, s1)) < 1e-9


def test_frechet_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="do not match"):
        M.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="method='svd'"):
        M.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3), method="svd")


# ----------------------------------------------------------------------------- moments

def test_streaming_moments_equal_concatenation():
    rng = np.random.default_rng(4)
    feats = (rng.standard_normal((203, 24)) * rng.uniform(0.1, 2, 24) + 1000).astype(np.float32)
    m = M.moments_init()
    for lo, hi in [(0, 7), (7, 8), (8, 100), (100, 203)]:
        m = M.moments_update(m, feats[lo:hi])
    mu, sigma = M.moments_result(m)
    x = feats.astype(np.float64)
    assert m.count == 203
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="feats.shape"):
        M.moments_update(m, feats[:3, :5])


# ----------------------------------------------------------------------------- IS

def test_inception_score_uniform_identical_is_one():
    assert M.inception_score(np.zeros((100, 1008))) == pytest.approx(1.0, abs=1e-12)
    same = np.tile(np.random.default_rng(5).standard_normal(1008), (50, 1))
    assert M.inception_score(same) == pytest.approx(1.0, abs=1e-9)


def test_inception_score_one_hot_classes_evenly_spread():
    logits = np.full((120, 1008), -200.0)
    logits[np.arange(120), np.arange(120) % 12] = 200.0  # 12 classes, 10 samples each
    assert M.inception_score(logits) == pytest.approx(12.0, rel=1e-9)
    # ADM's splits are consecutive chunks: 2 chunks of 60 each cover all 12 classes.
    assert M.inception_score(logits, split_size=60) == pytest.approx(12.0, rel=1e-9)
    # chunks of 6 see 6 classes each.
    assert M.inception_score(logits, split_size=6) == pytest.approx(6.0, rel=1e-9)


def test_inception_score_matches_direct_formula():
    rng = np.random.default_rng(6)
    logits = rng.standard_normal((300, 20)) * 3
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = []
    for part in (p[:100], p[100:200], p[200:]):
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    assert M.inception_score(logits, split_size=100) == pytest.approx(np.mean(scores), rel=1e-10)


# ----------------------------------------------------------------------------- P/R

def _brute_pr(ref, smp, k):
    def radii(x):
        d = ((x[:, None] - x[None]) ** 2).sum(-1)
        return np.sort(d, axis=1)[:, k]

    d = ((ref[:, None] - smp[None]) ** 2).sum(-1)  # (R, S)
    precision = (d <= radii(ref)[:, None]).any(0).mean()
    recall = (d <= radii(smp)[None, :]).any(1).mean()
    return precision, recall


def test_precision_recall_identical_and_disjoint():
    x = np.random.default_rng(7).standard_normal((60, 16))
    assert M.precision_recall(x, x) == (1.0, 1.0)
    assert M.precision_recall(x, x + 100.0) == (0.0, 0.0)


def test_precision_recall_partial_overlap_constructed():
    # ref: 20 points on a line; samples: the first 10 of them plus 10 far away.
    ref = np.stack([np.arange(20.0), np.zeros(20)], 1)
    smp = np.concatenate([ref[:10], ref[:10] + [1000.0, 0.0]])
    precision, recall = M.precision_recall(ref, smp, k=3, batch_size=7)
    assert precision == pytest.approx(0.5)
    # sample balls: point 9 has radius 3 (neighbours 8, 7, 6) and point 8 radius 2, so ref
    # points 0..12 are covered: recall 13/20.
    assert recall == pytest.approx(13 / 20)
    assert (precision, recall) == pytest.approx(_brute_pr(ref, smp, 3))


def test_precision_recall_random_matches_brute_force_and_batching():
    rng = np.random.default_rng(8)
    ref, smp = rng.standard_normal((70, 8)), rng.standard_normal((90, 8)) * 1.3 + 0.3
    expect = _brute_pr(ref, smp, 3)
    assert 0 < expect[0] < 1 and 0 < expect[1] < 1
    assert M.precision_recall(ref, smp, batch_size=13) == pytest.approx(expect)
    assert M.precision_recall(ref, smp, batch_size=1000) == pytest.approx(expect)
    radii = M.manifold_radii(ref, k=3, batch_size=9)
    d = ((ref[:, None] - ref[None]) ** 2).sum(-1)
    np.testing.assert_allclose(radii, np.sort(d, 1)[:, 3], rtol=1e-4)


# ----------------------------------------------------------------------------- I/O

def test_samples_npz_round_trip_and_streaming(tmp_path):
    rng = np.random.default_rng(9)
    images = rng.integers(0, 256, (11, 8, 6, 3), dtype=np.uint8)
    labels = rng.integers(0, 1000, 11)
    path = tmp_path / "samples.npz"
    M.save_samples_npz(path, images, labels)
    with np.load(path) as f:
        assert sorted(f.files) == ["arr_0", "arr_1"]
        np.testing.assert_array_equal(f["arr_1"], labels)
    np.testing.assert_array_equal(M.load_samples_npz(path), images)
    batches = list(M.iter_npz_batches(path, 4))
    assert [len(b) for b in batches] == [4, 4, 3]
    np.testing.assert_array_equal(np.concatenate(batches), images)
    with pytest.raises(ValueError, match="uint8"):
        M.save_samples_npz(tmp_path / "bad.npz", images.astype(np.float32))
    with pytest.raises(ValueError, match="expected uint8"):
        M.save_samples_npz(tmp_path / "bad.npz", images.transpose(0, 3, 1, 2))
    with pytest.raises(ValueError, match="arr_7"):
        next(M.iter_npz_batches(path, 4, key="arr_7"))


def test_reference_stats_round_trip(tmp_path):
    rng = np.random.default_rng(10)
    stats = dict(mu=rng.standard_normal(5), sigma=np.eye(5), mu_s=rng.standard_normal(3),
                 sigma_s=2 * np.eye(3), count=123, network="inception-2015-12-05/adm")
    images = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    path = tmp_path / "ref.npz"
    M.save_reference_stats(path, stats, images=images)
    back = M.load_reference_stats(path)
    assert sorted(back) == sorted(stats)
    for key in ("mu", "sigma", "mu_s", "sigma_s"):
        np.testing.assert_array_equal(back[key], stats[key])
    assert back["count"] == 123 and back["network"] == stats["network"]
    np.testing.assert_array_equal(np.concatenate(list(M.iter_npz_batches(path, 3))), images)
    np.savez(tmp_path / "nostats.npz", arr_0=images)
    with pytest.raises(ValueError, match="no 'mu'"):
        M.load_reference_stats(tmp_path / "nostats.npz")


# ----------------------------------------------------------------------------- end to end

def _fake_features_fn(images):
    """Deterministic stand-in for the Inception: per-image statistics of the pixels."""
    x = np.asarray(images, np.float64) / 255.0
    pool = np.concatenate([x.mean((1, 2)), (x ** 2).mean((1, 2)), x[:, ::4, ::4].reshape(len(x), -1)], 1)
    return dict(pool=pool, spatial=x[:, ::2, ::2, 0].reshape(len(x), -1), logits=pool[:, :6] * 10)


def test_reference_stats_and_compute_metrics_end_to_end(tmp_path):
    rng = np.random.default_rng(11)
    images = rng.integers(0, 256, (70, 8, 8, 3), dtype=np.uint8)
    path = tmp_path / "ref.npz"
    M.save_samples_npz(path, images)
    stats = M.reference_stats_from_images(M.iter_npz_batches(path, 16), _fake_features_fn,
                                          keep_pool=30, network="fake")
    feats = M.extract_features(M.iter_npz_batches(path, 16), _fake_features_fn)
    direct = _fake_features_fn(images)
    for key in ("pool", "spatial", "logits"):
        np.testing.assert_allclose(feats[key], direct[key], rtol=1e-6)
    mu, sigma = M.feature_stats(direct["pool"])
    np.testing.assert_allclose(stats["mu"], mu, rtol=1e-6)
    np.testing.assert_allclose(stats["sigma"], sigma, rtol=1e-5, atol=1e-9)
    assert stats["count"] == 70 and stats["pool"].shape == (30, direct["pool"].shape[1])

    same = M.compute_metrics(feats, stats, network="fake")
    assert same["network"] == "fake" and same["num_samples"] == 70
    assert abs(same["fid"]) < 1e-6 and abs(same["sfid"]) < 1e-6
    assert same["is"] == pytest.approx(M.inception_score(direct["logits"]))
    assert same["recall"] == 1.0  # the 30 kept reference features are among the samples
    shifted = {k: v + 0.5 for k, v in feats.items()}
    other = M.compute_metrics(shifted, stats, ref_feats=feats["pool"])
    assert other["fid"] == pytest.approx(0.25 * feats["pool"].shape[1], rel=1e-6)
    assert other["network"] == "fake"
    with pytest.raises(ValueError, match="differs from ref_stats"):
        M.compute_metrics(feats, stats, network="inception")
