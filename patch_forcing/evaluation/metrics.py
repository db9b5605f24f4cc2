"""Sample-quality metrics as in the ADM evaluation suite (guided-diffusion/evaluations).

FID (Inception pool features), sFID (mixed_6/conv spatial features), Inception Score and
improved precision/recall (Kynkaanniemi et al. 2019, k = 3), in float64 numpy; plus the `.npz`
formats: sample batches (`arr_0` uint8 NHWC, optional `arr_1` labels) and reference statistics
(`mu`, `sigma`, `mu_s`, `sigma_s`; ADM's reference batches also hold `arr_0`, 10k images for
precision/recall).

`features_fn` arguments below are callables images uint8 (B, H, W, 3) -> dict(pool (B, 2048),
spatial (B, 2023), logits (B, 1008)), e.g. `functools.partial(inception.features_fn, params)`.
Every result names the feature network that produced it (`network`).
"""

from __future__ import annotations

import zipfile
from typing import Iterable, Iterator, NamedTuple

import numpy as np
from scipy import linalg, special

from patch_forcing import paths

# ----------------------------------------------------------------------------- moments


class Moments(NamedTuple):
    """Streaming float64 moments: count, a shift (first batch mean, for stability), sum and
    sum of outer products of (x - shift)."""

    count: int
    shift: np.ndarray | None
    sum: np.ndarray | None
    sum_outer: np.ndarray | None


def moments_init() -> Moments:
    return Moments(0, None, None, None)


def moments_update(m: Moments, feats) -> Moments:
    """Add a batch feats (B, D); returns the new Moments."""
    x = np.asarray(feats, np.float64)
    if x.ndim != 2:
        raise ValueError(f"feats.shape={x.shape} is not (B, D)")
    if m.count == 0:
        shift = x.mean(0)
        z = x - shift
        return Moments(len(x), shift, z.sum(0), z.T @ z)
    if x.shape[1] != m.shift.shape[0]:
        raise ValueError(f"feats.shape[1]={x.shape[1]} differs from earlier batches' "
                         f"{m.shift.shape[0]}")
    z = x - m.shift
    return Moments(m.count + len(x), m.shift, m.sum + z.sum(0), m.sum_outer + z.T @ z)


def moments_result(m: Moments):
    """-> mu (D,), sigma (D, D): the mean and unbiased covariance (np.cov, as ADM)."""
    if m.count < 2:
        raise ValueError(f"moments.count={m.count}; need at least 2 feature vectors")
    mean_z = m.sum / m.count
    sigma = (m.sum_outer - m.count * np.outer(mean_z, mean_z)) / (m.count - 1)
    return m.shift + mean_z, (sigma + sigma.T) / 2


def feature_stats(feats):
    """mu, sigma of feats (N, D), same as moments over any batching."""
    return moments_result(moments_update(moments_init(), feats))


# ----------------------------------------------------------------------------- FID


def _clip_noise(w):
    """Eigenvalues of a PSD matrix with those below the rounding-noise floor set to 0 (their
    square roots would otherwise add ~sqrt(eps) each for rank-deficient covariances)."""
    floor = len(w) * np.finfo(np.float64).eps * max(np.abs(w).max(), 1e-300)
    return np.where(w > floor, w, 0.0)


def _sqrt_psd(s):
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(_clip_noise(w))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2, method: str = "eigh") -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64.

    method='eigh': tr (S1 S2)^(1/2) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2))), a symmetric PSD
    problem; exact for rank-deficient covariances. method='sqrtm': ADM/pytorch-fid's
    scipy.linalg.sqrtm with the 1e-6 diagonal offset fallback (for parity checks).
    """
    mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
    s1, s2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise ValueError(f"mu/sigma shapes {mu1.shape}, {s1.shape} vs {mu2.shape}, {s2.shape} "
                         f"do not match")
    diff = mu1 - mu2
    if method == "eigh":
        r = _sqrt_psd((s1 + s1.T) / 2)
        m = r @ s2 @ r
        tr_covmean = np.sqrt(_clip_noise(np.linalg.eigvalsh((m + m.T) / 2))).sum()
    elif method == "sqrtm":
        covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
        if not np.isfinite(covmean).all():
            offset = np.eye(len(s1)) * 1e-6
            covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
        tr_covmean = np.trace(covmean).real
    else:
        raise ValueError(f"method={method!r} is not one of ['eigh', 'sqrtm']")
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


# ----------------------------------------------------------------------------- IS


def inception_score(logits, split_size: int = 5000) -> float:
    """ADM's IS: softmax over all logits (1008 for the FID Inception), the samples cut into
    consecutive chunks of `split_size` (50k samples -> 10 splits), mean over chunks of
    exp(mean KL(p(y|x) || p(y))). Computed in log space in float64."""
    logp = np.asarray(logits, np.float64)
    if logp.ndim != 2 or len(logp) == 0:
        raise ValueError(f"logits.shape={logp.shape} is not (N, classes) with N > 0")
    logp = logp - special.logsumexp(logp, axis=1, keepdims=True)
    scores = []
    for i in range(0, len(logp), split_size):
        lp = logp[i:i + split_size]
        log_marginal = special.logsumexp(lp, axis=0) - np.log(len(lp))
        kl = np.sum(np.exp(lp) * (lp - log_marginal), axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


# ----------------------------------------------------------------------------- P/R


def _sq_dists(a, a_sq, b, b_sq):  # (Na, Nb) squared Euclidean distances, float32
    return np.maximum(a_sq[:, None] - 2 * (a @ b.T) + b_sq[None, :], 0)


def manifold_radii(feats, k: int = 3, batch_size: int = 1000):
    """(N,) squared distance of each feature to its k-th nearest neighbour in the set (the
    point itself counts as the 0-th, as in ADM's ManifoldEstimator)."""
    x = np.asarray(feats, np.float32)
    if not 0 < k < len(x):
        raise ValueError(f"k={k} must be in [1, {len(x) - 1}] for {len(x)} features")
    sq = np.einsum("nd,nd->n", x, x)
    radii = np.empty(len(x), np.float32)
    for i in range(0, len(x), batch_size):
        d = _sq_dists(x[i:i + batch_size], sq[i:i + batch_size], x, sq)
        radii[i:i + batch_size] = np.partition(d, k, axis=1)[:, k]
    return radii


def precision_recall(ref_feats, sample_feats, k: int = 3, batch_size: int = 2000):
    """Improved precision/recall (k-NN balls, squared distances in float32; ADM tries float16
    first). precision: fraction of samples inside some reference ball; recall: fraction of
    references inside some sample ball. Memory O(batch_size * max(N))."""
    ref, smp = np.asarray(ref_feats, np.float32), np.asarray(sample_feats, np.float32)
    r_ref, r_smp = manifold_radii(ref, k), manifold_radii(smp, k)
    ref_sq, smp_sq = np.einsum("nd,nd->n", ref, ref), np.einsum("nd,nd->n", smp, smp)
    ref_in, smp_in = np.zeros(len(ref), bool), np.zeros(len(smp), bool)
    for i in range(0, len(ref), batch_size):
        for j in range(0, len(smp), batch_size):
            d = _sq_dists(ref[i:i + batch_size], ref_sq[i:i + batch_size],
                          smp[j:j + batch_size], smp_sq[j:j + batch_size])
            smp_in[j:j + batch_size] |= (d <= r_ref[i:i + batch_size, None]).any(0)
            ref_in[i:i + batch_size] |= (d <= r_smp[None, j:j + batch_size]).any(1)
    return float(smp_in.mean()), float(ref_in.mean())


# ----------------------------------------------------------------------------- npz I/O


def _check_images(images, name="images"):
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"{name} has dtype {images.dtype} shape {images.shape}; expected uint8 "
                         f"(N, H, W, 3) (or 1 channel)")
    return images


def save_samples_npz(path, images, labels=None) -> None:
    """ADM sample batch: arr_0 = images uint8 (N, H, W, C), arr_1 = labels (N,) if given."""
    arrays = dict(arr_0=_check_images(images))
    if labels is not None:
        arrays["arr_1"] = np.asarray(labels)
    np.savez(path, **arrays)


def iter_npz_batches(path, batch_size: int, key: str = "arr_0") -> Iterator[np.ndarray]:
    """Stream `key` of an .npz in batches along axis 0 without loading it whole."""
    with paths.reading(path) as fo, zipfile.ZipFile(fo) as zf:
        names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
        if key not in names:
            raise ValueError(f"{path}: key={key!r} is not one of {names}")
        with zf.open(key + ".npy") as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            header = read_header(f) if read_header else None
            if header is None or header[1] or header[2].hasobject:  # unusual: load whole
                fo.seek(0)
                arr = np.load(fo)[key]
                for i in range(0, len(arr), batch_size):
                    yield arr[i:i + batch_size]
                return
            shape, _, dtype = header
            row = int(np.prod(shape[1:])) * dtype.itemsize
            for start in range(0, shape[0], batch_size):
                n = min(batch_size, shape[0] - start)
                buf = f.read(n * row)
                if len(buf) != n * row:
                    raise ValueError(f"{path}: {key} truncated at row {start}")
                yield np.frombuffer(buf, dtype).reshape((n,) + tuple(shape[1:]))


def load_samples_npz(path) -> np.ndarray:
    """arr_0 of an ADM sample batch, checked to be uint8 NHWC."""
    with paths.reading(path) as fo, np.load(fo) as f:
        return _check_images(f["arr_0"], f"{path}: arr_0")


STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


def save_reference_stats(path, stats: dict, images=None) -> None:
    """Write mu, sigma (+ mu_s, sigma_s, pool, count, network when present) and optionally the
    reference images as arr_0, i.e. an ADM-style reference batch."""
    if "mu" not in stats or "sigma" not in stats:
        raise ValueError(f"stats keys {sorted(stats)} lack 'mu'/'sigma'")
    arrays = {k: np.asarray(stats[k]) for k in STAT_KEYS + ("pool", "count", "network")
              if k in stats}
    if images is not None:
        arrays["arr_0"] = _check_images(images)
    np.savez(path, **arrays)


def load_reference_stats(path) -> dict:
    """mu, sigma (+ mu_s, sigma_s, pool, count, network where stored) of a reference .npz
    (ours or ADM's; ADM's arr_0 images are not loaded: see `iter_npz_batches`)."""
    with paths.reading(path) as fo, np.load(fo) as f:
        if "mu" not in f.files or "sigma" not in f.files:
            raise ValueError(f"{path}: no 'mu'/'sigma' (keys {f.files}); compute them with "
                             f"reference_stats_from_images")
        out = {k: f[k] for k in STAT_KEYS + ("pool",) if k in f.files}
        if "count" in f.files:
            out["count"] = int(f["count"])
        if "network" in f.files:
            out["network"] = str(f["network"])
    return out


# ----------------------------------------------------------------------------- features


def _features(features_fn, batch, pad_to):
    """Run features_fn on a batch padded to `pad_to` rows (one compiled shape); numpy out."""
    batch = _check_images(batch, "batch")
    if batch.shape[-1] == 1:
        batch = np.repeat(batch, 3, axis=-1)
    n = len(batch)
    if n < pad_to:
        batch = np.concatenate([batch, np.repeat(batch[-1:], pad_to - n, axis=0)])
    return {k: np.asarray(v, np.float32)[:n] for k, v in features_fn(batch).items()}


def extract_features(batches: Iterable, features_fn) -> dict:
    """Concatenated features (pool, spatial, logits) of all images in `batches`."""
    out, pad_to = {}, None
    for batch in batches:
        pad_to = pad_to or len(batch)
        for k, v in _features(features_fn, batch, pad_to).items():
            out.setdefault(k, []).append(v)
    if not out:
        raise ValueError("batches is empty")
    return {k: np.concatenate(v) for k, v in out.items()}


def reference_stats_from_images(batches: Iterable, features_fn, keep_pool: int = 0,
                                network: str | None = None) -> dict:
    """Streaming reference statistics of a dataset: mu, sigma (pool), mu_s, sigma_s (spatial),
    count, and the first `keep_pool` pool features as `pool` (for precision/recall; ADM keeps
    10k). Memory is O(D^2), whatever the dataset size."""
    pool_m, spatial_m, kept, pad_to = moments_init(), moments_init(), [], None
    for batch in batches:
        pad_to = pad_to or len(batch)
        f = _features(features_fn, batch, pad_to)
        pool_m = moments_update(pool_m, f["pool"])
        spatial_m = moments_update(spatial_m, f["spatial"])
        have = sum(len(p) for p in kept)
        if have < keep_pool:
            kept.append(f["pool"][:keep_pool - have])
    mu, sigma = moments_result(pool_m)
    mu_s, sigma_s = moments_result(spatial_m)
    stats = dict(mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s, count=pool_m.count)
    if kept:
        stats["pool"] = np.concatenate(kept)
    if network is not None:
        stats["network"] = network
    return stats


def compute_metrics(sample_feats: dict, ref_stats: dict, ref_feats=None, network=None,
                    split_size: int = 5000, k: int = 3) -> dict:
    """fid, sfid, is, precision, recall -- each where the inputs allow.

    sample_feats: dict with pool / spatial / logits (N, .) (see `extract_features`).
    ref_stats: mu, sigma (+ mu_s, sigma_s, pool, network). ref_feats: reference pool features
    (M, 2048) for precision/recall (default ref_stats['pool']). network: name of the feature
    network (e.g. inception.network_name('adm')); must equal ref_stats['network'] if both set.
    """
    ref_net = ref_stats.get("network")
    if network is not None and ref_net is not None and str(ref_net) != network:
        raise ValueError(f"network={network!r} differs from ref_stats['network']={str(ref_net)!r}")
    out = {"network": network or (None if ref_net is None else str(ref_net))}
    pool = sample_feats.get("pool")
    if pool is not None:
        out["num_samples"] = len(pool)
        out["fid"] = frechet_distance(*feature_stats(pool), ref_stats["mu"], ref_stats["sigma"])
    if sample_feats.get("spatial") is not None and "mu_s" in ref_stats:
        out["sfid"] = frechet_distance(*feature_stats(sample_feats["spatial"]),
                                       ref_stats["mu_s"], ref_stats["sigma_s"])
    if sample_feats.get("logits") is not None:
        out["is"] = inception_score(sample_feats["logits"], split_size)
    ref_feats = ref_stats.get("pool") if ref_feats is None else ref_feats
    if isinstance(ref_feats, dict):
        ref_feats = ref_feats["pool"]
    if pool is not None and ref_feats is not None:
        out["precision"], out["recall"] = precision_recall(ref_feats, pool, k)
    return out
