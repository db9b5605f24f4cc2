"""Study 4, `context`: the paper's "context helps" figure. Held-out images are noised to a global
time t; the q most certain patches (the samplers' certain mask, q = config.sampler.q) are moved
ahead to a context time t_ctx with the model's own velocity (one Euler jump, as look_ahead does),
and the uncertain patches' flow loss is measured on the model's second call, against t_ctx.

t_ctx = t is no context. The paper finds the loss lowest near t_ctx = 2-2.5 t, and, at t = 0.1,
t_ctx = 1 worse than no context (the jumped patches are then badly off the data).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from patch_forcing.flow import interpolant, samplers
from patch_forcing.studies import plots, report
from patch_forcing.studies.difficulty import MODEL, heldout
from patch_forcing.studies.runner import Study, summarize


def context_times(t: float, ratios) -> list[float]:
    """[t (no context), ratio * t for each ratio while < 1, 1.0]."""
    return [t] + sorted({round(r * t, 6) for r in ratios if r * t < 1.0}) + [1.0]


def make_context_loss(apply_fn, patch_size: int, q: float, pool: str = "mean"):
    """jit(fn(params, x1, x0, y, t, t_ctx) -> (sum of the uncertain patches' loss, their count))."""

    def fn(params, x1, x0, y, t, t_ctx):
        b, h, w, _ = x1.shape
        tt = jnp.full((b, interpolant.num_patches(h, w, patch_size)), t, jnp.float32)
        xt = interpolant.interpolate(x0, x1, tt, patch_size)
        v, s = apply_fn(params, xt, tt, y)
        certain = samplers.certain_mask(interpolant.pool_patches(jnp.exp(s.astype(jnp.float32)), patch_size, pool),
                                        q, patch_size)  # (B, N)
        mp = interpolant.patch_to_pixels(certain, patch_size, h, w)
        x_ctx = xt + (t_ctx - t) * jnp.where(mp, v.astype(jnp.float32), 0.0)
        v_ctx, _ = apply_fn(params, x_ctx, jnp.where(certain, t_ctx, tt), y)
        err = interpolant.pool_patches(jnp.square(v_ctx.astype(jnp.float32) - interpolant.target(x0, x1)),
                                       patch_size, "mean")  # (B, N)
        uncertain = ~certain
        return jnp.sum(jnp.where(uncertain, err, 0.0)), jnp.sum(uncertain)

    return jax.jit(fn)


def measure(study: Study, seed: int, times, ratios) -> dict:
    """{t: [uncertain-patch loss at each context time]} for one seed's LTG model."""
    mcfg, apply_fn, params = study.load_model(MODEL, seed, "context")
    fn = make_context_loss(apply_fn, mcfg.patch_size, float(study.config.sampler.q), study.config.sampler.pool)
    data = heldout(study, seed)
    out = {}
    for t in times:
        losses = []
        for t_ctx in context_times(t, ratios):
            parts = [fn(params, x1, x0, y, jnp.float32(t), jnp.float32(t_ctx)) for x1, x0, y in data]
            losses.append(float(sum(float(a) for a, _ in parts) / max(sum(int(n) for _, n in parts), 1)))
        out[t] = losses
    return out


def run(study: Study, only=()) -> dict:
    del only
    s = study.config.study
    times, ratios = [float(t) for t in s.context_times], [float(r) for r in s.context_ratios]
    per_seed = [measure(study, seed, times, ratios) for seed in study.seeds]
    rows = []
    for t in times:
        t_ctxs = context_times(t, ratios)
        rel = [[loss[i] / loss[0] for i in range(len(t_ctxs))] for loss in (m[t] for m in per_seed)]
        points = [dict(t_ctx=tc, ratio=tc / t, loss=summarize([m[t][i] for m in per_seed]),
                       relative=summarize([r[i] for r in rel])) for i, tc in enumerate(t_ctxs)]
        best = min(points, key=lambda p: p["loss"]["mean"])
        rows.append(dict(t=t, points=points, best_t_ctx=best["t_ctx"], best_ratio=best["ratio"],
                         best_relative=best["relative"], at_one_relative=points[-1]["relative"]))
    return dict(model=MODEL.name, q=float(study.config.sampler.q), num_examples=int(s.num_examples), rows=rows)


def write_report(study: Study, results: dict) -> str:
    rows = results["rows"]
    out = study.workdir / "context"
    out.mkdir(parents=True, exist_ok=True)
    series = {f"t = {r['t']:.1f}": ([p["t_ctx"] for p in r["points"]], [p["relative"]["mean"] for p in r["points"]],
                                    [p["relative"]["std"] for p in r["points"]]) for r in rows}
    plots.lines(out / "context_loss.png", series, title="uncertain patches' loss with certain patches at t_ctx",
                xlabel="context time t_ctx (first point: t_ctx = t, no context)",
                ylabel="loss / loss without context")
    body = []
    for r in rows:
        body.append(report.table(["t_ctx", "t_ctx / t", "uncertain-patch loss", "relative to no context"],
                                 [[f"{p['t_ctx']:.3g}" + (" (none)" if i == 0 else ""), f"{p['ratio']:.2f}",
                                   report.fmt(p["loss"], 4), report.fmt(p["relative"], 3)]
                                  for i, p in enumerate(r["points"])]))
        body.append("")
    notes = []
    for r in rows:
        one = r["at_one_relative"]
        worse = one["mean"] is not None and one["mean"] > 1.0
        notes.append(f"- t = {r['t']:.1f}: lowest loss at t_ctx = {r['best_t_ctx']:.3g} ({r['best_ratio']:.2f} t, "
                     f"{report.fmt(r['best_relative'], 3)} of the no-context loss; paper: 2-2.5 t); t_ctx = 1 gives "
                     f"{report.fmt(one, 3)} of it ({'worse' if worse else 'not worse'} than no context"
                     + ("; paper at t = 0.1: worse)" if abs(r["t"] - 0.1) < 1e-6 else ")"))
    return "\n".join([
        report.header("context helps (`context`)", study, results),
        f"Model: the timesteps study's `{results['model']}` runs; {results['num_examples']} held-out images, q = "
        f"{results['q']} of the patches certain; loss = mean squared velocity error of the uncertain patches; "
        "mean ± std over seeds.", "", *body, "![context loss](context_loss.png)", "", *notes])
