"""Study 3, `difficulty`: does the head predict difficulty? For held-out images at global times t,
the Pearson and Spearman correlation between each patch's predicted variance (exp(s) pooled over
the patch, as the samplers pool it) and its actual squared velocity error (pooled the same way).

Two numbers per t: R over all (image, patch) pairs, and R within an image (the mean over images of
the per-image R: what the samplers' per-sample quantile uses). A prediction that does not vary
has no correlation: R is NaN and reported as "n/a (constant)". The paper: R = 0.11 at t = 0.2 and
0.52 at t = 0.6 (ImageNet); the claim is that it correlates, more strongly at larger t.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats as scipy_stats

from patch_forcing.data import pipeline
from patch_forcing.flow import interpolant
from patch_forcing.studies import plots, report
from patch_forcing.studies.runner import Study, compare, summarize
from patch_forcing.studies.timesteps import BY_NAME

MODEL = BY_NAME["ltg"]
PAPER_R = {0.2: 0.11, 0.6: 0.52}
SCATTER_T = 0.6


def pearson(x, y) -> float:
    """Pearson R of two flat arrays in float64; NaN when either is constant."""
    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    x, y = x - x.mean(), y - y.mean()
    den = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / den) if den > 0 else float("nan")


def spearman(x, y) -> float:
    """Spearman's rho: Pearson R of the ranks (ties share their mean rank)."""
    return pearson(scipy_stats.rankdata(np.ravel(x)), scipy_stats.rankdata(np.ravel(y)))


def correlations(pred, err) -> dict:
    """pred, err (B, N) -> pearson/spearman over all pairs and within images (mean of per-image R,
    images whose prediction is constant left out; NaN when all are)."""
    pred, err = np.asarray(pred, np.float64), np.asarray(err, np.float64)
    within = [pearson(p, e) for p, e in zip(pred, err)]
    within_s = [spearman(p, e) for p, e in zip(pred, err)]
    mean = lambda v: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")  # noqa: E731
    return dict(pearson=pearson(pred, err), spearman=spearman(pred, err), pearson_within=mean(within),
                spearman_within=mean(within_s))


def make_patch_errors(apply_fn, patch_size: int, pool: str = "mean"):
    """jit(fn(params, x1, x0, y, t scalar) -> (predicted variance (B, N), squared error (B, N)))."""

    def fn(params, x1, x0, y, t):
        b, h, w, _ = x1.shape
        tt = jnp.full((b, interpolant.num_patches(h, w, patch_size)), t, jnp.float32)
        v, s = apply_fn(params, interpolant.interpolate(x0, x1, tt, patch_size), tt, y)
        err = jnp.square(v.astype(jnp.float32) - interpolant.target(x0, x1))
        pred = jnp.exp(jnp.clip(s.astype(jnp.float32), -30.0, 20.0))
        return interpolant.pool_patches(pred, patch_size, pool), interpolant.pool_patches(err, patch_size, pool)

    return jax.jit(fn)


def heldout(study: Study, seed: int):
    """The first study.num_examples held-out images, their labels and seeded noise."""
    c = study.config
    batches = list(pipeline.make_eval_batches(c.data, c.data.split_eval, num_examples=min(
        int(c.study.num_examples), int(pipeline.make_source(c.data, c.data.split_eval)[1]["num_examples"])),
        batch_size=256))
    noise_key = jax.random.fold_in(jax.random.key(seed), 7)
    return [(jnp.asarray(b["image"]), jax.random.normal(jax.random.fold_in(noise_key, i), b["image"].shape),
             jnp.asarray(b["label"])) for i, b in enumerate(batches)]


def measure(study: Study, seed: int, times) -> dict:
    """Per t: correlations of one seed's LTG model, plus the arrays at SCATTER_T for the plot."""
    mcfg, apply_fn, params = study.load_model(MODEL, seed, "difficulty")
    fn = make_patch_errors(apply_fn, mcfg.patch_size, study.config.sampler.pool)
    data = heldout(study, seed)
    out, scatter = {}, None
    for t in times:
        pairs = [fn(params, x1, x0, y, jnp.float32(t)) for x1, x0, y in data]
        pred = np.concatenate([np.asarray(p) for p, _ in pairs])
        err = np.concatenate([np.asarray(e) for _, e in pairs])
        out[float(t)] = correlations(pred, err)
        if abs(t - SCATTER_T) < 1e-6:
            scatter = (pred.ravel(), err.ravel())
    return dict(per_t=out, scatter=scatter)


def run(study: Study, only=()) -> dict:
    del only
    times = [float(t) for t in study.config.study.difficulty_times]
    per_seed = [measure(study, s, times) for s in study.seeds]
    keys = ("pearson", "spearman", "pearson_within", "spearman_within")
    rows = [dict(t=t, paper_r=PAPER_R.get(round(t, 2)),
                 **{k: summarize([m["per_t"][t][k] for m in per_seed]) for k in keys}) for t in times]
    constant = [r["t"] for r in rows if r["pearson"]["mean"] is None]
    scatter = per_seed[0]["scatter"]
    if scatter is not None:
        plots.scatter(_out(study) / "scatter_t0.6.png", scatter[1], scatter[0],
                      title=f"LTG model, seed 0, t = {SCATTER_T}: per-patch", xlabel="squared velocity error",
                      ylabel="predicted variance")
    by_t = {round(r["t"], 6): r["pearson"] for r in rows}
    lo_t, hi_t = (0.2, 0.6) if {0.2, 0.6} <= set(by_t) else (round(times[0], 6), round(times[-1], 6))
    lo, hi = by_t[lo_t], by_t[hi_t]
    return dict(model=MODEL.name, num_examples=int(study.config.study.num_examples), times=times, rows=rows,
                constant_at=constant, compared=(lo_t, hi_t), trend=compare(hi, lo),
                scatter_plot=scatter is not None)


def _out(study: Study):
    out = study.workdir / "difficulty"
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_report(study: Study, results: dict) -> str:
    rows = results["rows"]
    series = {name: ([r["t"] for r in rows], [r[k]["mean"] for r in rows], [r[k]["std"] for r in rows])
              for name, k in (("Pearson, all patches", "pearson"), ("Spearman, all patches", "spearman"),
                              ("Pearson, within image", "pearson_within"))}
    plots.lines(_out(study) / "r_vs_t.png", series, title="predicted variance vs actual per-patch error",
                xlabel="t (0 = noise, 1 = data)", ylabel="correlation R")
    cell = lambda s: report.fmt(s, 3) if s["mean"] is not None else "n/a (constant)"  # noqa: E731
    table = report.table(
        ["t", "Pearson R", "Spearman ρ", "Pearson R within image", "Spearman ρ within image", "paper R (ImageNet)"],
        [[f"{r['t']:.1f}", cell(r["pearson"]), cell(r["spearman"]), cell(r["pearson_within"]),
          cell(r["spearman_within"]), "–" if r["paper_r"] is None else r["paper_r"]] for r in rows])
    lo_t, hi_t = results["compared"]
    trend = (f"Pearson R at t = {hi_t} against t = {lo_t}: {results['trend']} (the paper: higher, 0.52 against "
             f"0.11 on ImageNet; verdict **{report.verdict(results['trend'], 'higher')}**)")
    lines = [report.header("difficulty head (`difficulty`)", study, results),
             f"Model: the timesteps study's `{results['model']}` runs; {results['num_examples']} held-out images, "
             "one noise draw per image and seed; mean ± std over seeds.", "", table, "",
             "![R vs t](r_vs_t.png)"]
    if results["scatter_plot"]:
        lines += ["", "![scatter at t = 0.6](scatter_t0.6.png)"]
    lines += ["", f"{trend}."]
    if results["constant_at"]:
        lines += [f"The predicted variance was constant at t = {results['constant_at']}: no correlation (n/a)."]
    return "\n".join(lines)
