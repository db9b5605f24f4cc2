"""Study 2, `samplers`: FID against NFE at equal budgets (the paper's Fig. 6 and NFE sweep): the
SiT baseline (the timesteps study's global-uniform model) with `euler`, and one LTG model with
euler_pf, random_order, dual_loop and look_ahead, CFG off.

What a reader must know: NFE is counted as the samplers count it (`samplers.expected_nfe`, checked
against the `nfe` each evaluation reports), and every budget in config.study.budgets must be met
*exactly* by every sampler: the steps are solved per sampler, and a budget some sampler cannot meet
is refused before anything trains (with n_inner = 3, 9/21/42/81 are the ~10/20/40/80 budgets all
five meet; dual_loop's and random_order's NFE is steps * n_inner, look_ahead's 2 * steps minus
its early Euler steps).
"""

from __future__ import annotations

from patch_forcing import config_lib
from patch_forcing.flow import samplers as samplers_lib
from patch_forcing.studies import plots, report, timesteps
from patch_forcing.studies.runner import FID_METRICS, Study, compare, summarize

SIT, PF = timesteps.BY_NAME["uniform"], timesteps.BY_NAME["ltg"]
# (sampler, the model it samples, label)
ENTRIES = (("euler", SIT, "SiT euler"), ("euler_pf", PF, "PF euler_pf"), ("random_order", PF, "PF random_order"),
           ("dual_loop", PF, "PF dual_loop"), ("look_ahead", PF, "PF look_ahead"))
NAMES = tuple(e[0] for e in ENTRIES)
# SPEC section 7: inference ablation, PF-B/2 ImageNet-256, FID-10k at equal compute; SiT-B/2 FID-50k.
PAPER_FID = {"euler": "33.0 (FID-50k)", "random_order": "33.1", "euler_pf": "31.4", "dual_loop": "29.3",
             "look_ahead": "27.7"}
CLAIMS = (("look_ahead", "dual_loop"), ("dual_loop", "euler_pf"), ("euler_pf", "random_order"), ("euler_pf", "euler"))


def base_sampler(study: Study, name: str) -> samplers_lib.SamplerConfig:
    """config.sampler with the study's n_inner, CFG off, as this sampler."""
    scfg = config_lib.sampler_config(study.run_config(SIT if name == "euler" else PF, 0))
    return samplers_lib.as_sampler_config(scfg, name=name, n_inner=int(study.config.study.n_inner), cfg_scale=1.0)


def steps_for_budget(base: samplers_lib.SamplerConfig, budget: int) -> int:
    """The steps at which `base` spends exactly `budget` NFE; a one-line ValueError when none does."""
    nfe = {s: samplers_lib.expected_nfe(samplers_lib.as_sampler_config(base, steps=s))
           for s in range(1, 2 * budget + 2)}
    exact = [s for s, n in nfe.items() if n == budget]
    if exact:
        return exact[0]
    below = max((n for n in nfe.values() if n < budget), default=None)
    above = min((n for n in nfe.values() if n > budget), default=None)
    raise ValueError(f"config.study.budgets: NFE {budget} cannot be met exactly by {base.name} "
                     f"(n_inner={base.n_inner}); its nearest budgets are {below} and {above}")


def select(only):
    unknown = sorted(set(only) - set(NAMES))
    if unknown:
        raise ValueError(f"--only={','.join(only)}: {unknown} are not samplers of this study; allowed: {list(NAMES)}")
    return tuple(e for e in ENTRIES if not only or e[0] in only)


def run(study: Study, only=()) -> dict:
    entries, budgets = select(only), [int(b) for b in study.config.study.budgets]
    bases = {name: base_sampler(study, name) for name, _, _ in entries}
    plan = {(name, b): steps_for_budget(bases[name], b) for name, _, _ in entries for b in budgets}

    def sampler(name, b):
        base = bases[name]
        return dict(name=name, steps=plan[name, b], n_inner=base.n_inner, q=base.q, ratio=base.ratio)

    recs_by = {(name, b, s): study.evaluate(variant, s, sampler(name, b), "samplers")
               for s in study.seeds for name, variant, _ in entries for b in budgets}  # seed-major, as timesteps
    rows = []
    for name, variant, label in entries:
        points = []
        for b in budgets:
            recs = [recs_by[name, b, s] for s in study.seeds]
            reported = {r["protocol"]["nfe"] for r in recs}
            if reported != {b}:
                raise RuntimeError(f"{name} at budget {b} reported NFE {sorted(reported)}: the equal-NFE "
                                   "bookkeeping is broken")
            points.append(dict(nfe=b, steps=plan[name, b], sampler=recs[0]["protocol"]["sampler"],
                               **{k: summarize([r.get(k) for r in recs]) for k in FID_METRICS}))
        rows.append(dict(name=name, model=variant.name, label=label, paper_fid=PAPER_FID[name], points=points))
    by = {r["name"]: {p["nfe"]: p for p in r["points"]} for r in rows}
    claims = []
    for a, b in CLAIMS:
        if a in by and b in by:
            for nfe in budgets:
                d = compare(by[a][nfe]["fid"], by[b][nfe]["fid"])
                claims.append(dict(a=a, b=b, nfe=nfe, direction=d, verdict=report.verdict(d, "lower"),
                                   fid_a=by[a][nfe]["fid"], fid_b=by[b][nfe]["fid"]))
    return dict(budgets=budgets, n_inner=int(study.config.study.n_inner), samplers=rows,
                noise_floor=study.noise_floor_summary(), claims=claims)


def write_report(study: Study, results: dict) -> str:
    rows, floor, budgets = results["samplers"], results["noise_floor"], results["budgets"]
    out = study.workdir / "samplers"
    out.mkdir(parents=True, exist_ok=True)
    series = {r["label"]: ([p["nfe"] for p in r["points"]], [p["fid"]["mean"] for p in r["points"]],
                           [p["fid"]["std"] for p in r["points"]]) for r in rows}
    plots.lines(out / "fid_vs_nfe.png", series, floor=(floor["fid"]["mean"], floor["fid"]["std"]), logx=True,
                title=f"FID vs NFE ({len(study.seeds)} seeds, CFG off)", xlabel="NFE", ylabel="FID (lower is better)")
    fid_table = report.table(
        ["sampler", *[f"FID @ NFE {b}" for b in budgets], "paper FID-10k (B/2)"],
        [[r["label"], *[report.fmt(p["fid"]) for p in r["points"]], r["paper_fid"]] for r in rows]
        + [["**noise floor** (real held-out)", *[report.fmt(floor["fid"])] * len(budgets), "–"]])
    pr_table = report.table(
        ["sampler", *[f"P / R @ {b}" for b in budgets]],
        [[r["label"], *[f"{report.fmt(p['precision'], 3)} / {report.fmt(p['recall'], 3)}" for p in r["points"]]]
         for r in rows])
    steps = "; ".join(f"{r['name']} " + "/".join(str(p["steps"]) for p in r["points"]) for r in rows)
    claims = [f"- NFE {c['nfe']}: {c['a']} < {c['b']}: **{c['verdict']}** (FID {report.fmt(c['fid_a'])} vs "
              f"{report.fmt(c['fid_b'])})" for c in results["claims"]]
    return "\n".join([
        report.header("samplers at equal NFE (`samplers`)", study, results),
        f"Steps per budget ({', '.join(map(str, budgets))} NFE, q and ratio from config.sampler, n_inner "
        f"{results['n_inner']}): {steps}. Every evaluation reported exactly its budget's NFE.", "",
        fid_table, "", "Precision / recall:", "", pr_table, "", "![FID vs NFE](fid_vs_nfe.png)", "",
        report.floor_note([p["fid"] for r in rows for p in r["points"]], floor["fid"]), "",
        "The paper's ordering (look_ahead < dual_loop < euler_pf < random_order; PF euler_pf < SiT euler), "
        "claim by claim:", *claims])
