"""Study 1, `timesteps`: the training timestep sampler at equal model, steps, batch and sampler
(the paper's "FID per schedule"). Global baselines train a global-time model (model.per_patch=False)
sampled with `euler`; per-patch variants are sampled with `euler_pf` at the same NFE
(config.study.nfe), so only the training times differ.
"""

from __future__ import annotations

from patch_forcing.studies import plots, report
from patch_forcing.studies.runner import FID_METRICS, Study, Variant, compare, final_metric, summarize

GLOBAL = {"model.per_patch": False, "sampler.name": "euler"}
PER_PATCH = {"model.per_patch": True, "sampler.name": "euler_pf"}
VARIANTS = (
    Variant("uniform", "global uniform (SiT)", {"flow.timesteps": "uniform", **GLOBAL}),
    Variant("logit_normal", "global logit-normal", {"flow.timesteps": "logit_normal", **GLOBAL}),
    Variant("independent", "independent (diffusion forcing)", {"flow.timesteps": "independent", **PER_PATCH}),
    Variant("srm1", "SRM sharpness 1", {"flow.timesteps": "srm", "flow.srm.sharpness": 1.0, **PER_PATCH}),
    Variant("srm4", "SRM sharpness 4", {"flow.timesteps": "srm", "flow.srm.sharpness": 4.0, **PER_PATCH}),
    Variant("srm10", "SRM sharpness 10", {"flow.timesteps": "srm", "flow.srm.sharpness": 10.0, **PER_PATCH}),
    Variant("truncated_gaussian", "truncated Gaussian", {"flow.timesteps": "truncated_gaussian", **PER_PATCH}),
    Variant("ltg", "LTG", {"flow.timesteps": "ltg", **PER_PATCH}),
)
BY_NAME = {v.name: v for v in VARIANTS}
# SPEC section 7: training-sampler ablation, PF-B/2 on ImageNet-256, FID-10k (the paper's "global"
# row stands beside the uniform baseline; independent is reported worse without a number).
PAPER_FID = {"uniform": "41.0", "srm1": "42+", "srm4": "40.1", "srm10": "39.0", "truncated_gaussian": "34.7",
             "ltg": "31.4"}
# (a, b, expected direction of a's FID relative to b's, the claim)
CLAIMS = (
    ("ltg", "uniform", "lower", "LTG per-patch training beats global-time training (uniform)"),
    ("ltg", "logit_normal", "lower", "LTG per-patch training beats global-time training (logit-normal)"),
    ("independent", "ltg", "higher", "independent per-patch times are worse than LTG"),
    ("ltg", "truncated_gaussian", "lower", "LTG beats the truncated Gaussian under a uniform maximum"),
    ("srm10", "srm1", "lower", "a sharper SRM (10) beats SRM 1"),
)


def sampler_for(variant: Variant, nfe: int) -> dict:
    return {"name": variant.overrides["sampler.name"], "steps": int(nfe)}


def select(only) -> tuple[Variant, ...]:
    unknown = sorted(set(only) - set(BY_NAME))
    if unknown:
        raise ValueError(f"--only={','.join(only)}: {unknown} are not timesteps variants; allowed: {list(BY_NAME)}")
    return tuple(v for v in VARIANTS if not only or v.name in only)


def run(study: Study, only=()) -> dict:
    """Train and evaluate every variant x seed (skipping finished work); results as a dict."""
    nfe, variants = int(study.config.study.nfe), select(only)
    by_seed = {(v.name, s): study.evaluate(v, s, sampler_for(v, nfe), "timesteps")
               for s in study.seeds for v in variants}  # seed-major: --seeds=k reports the first k when cut short
    rows = []
    for v in variants:
        recs = [by_seed[v.name, s] for s in study.seeds]
        val = [final_metric(study.run_dir(v, s), "val_loss") for s in study.seeds]
        rows.append(dict(name=v.name, label=v.label, sampler=recs[0]["protocol"]["sampler"],
                         nfe=recs[0]["protocol"]["nfe"], paper_fid=PAPER_FID.get(v.name, "–"),
                         val_loss=summarize(val), **{k: summarize([r.get(k) for r in recs]) for k in FID_METRICS}))
    floor = study.noise_floor_summary()
    by = {r["name"]: r for r in rows}
    claims = []
    for a, b, expected, text in CLAIMS:
        if a in by and b in by:
            d = compare(by[a]["fid"], by[b]["fid"])
            claims.append(dict(claim=text, a=a, b=b, direction=d, verdict=report.verdict(d, expected),
                               fid_a=by[a]["fid"], fid_b=by[b]["fid"]))
    return dict(nfe=nfe, variants=rows, noise_floor=floor, claims=claims)


def write_report(study: Study, results: dict) -> str:
    rows, floor = results["variants"], results["noise_floor"]
    out = study.workdir / "timesteps"
    out.mkdir(parents=True, exist_ok=True)
    plots.bars(out / "fid_per_schedule.png", [r["name"] for r in rows], [r["fid"]["mean"] for r in rows],
               [r["fid"]["std"] for r in rows], floor=(floor["fid"]["mean"], floor["fid"]["std"]),
               title=f"FID per training timestep sampler (NFE {results['nfe']}, {len(study.seeds)} seeds)",
               ylabel="FID (lower is better)")
    table = report.table(
        ["variant", "sampler", "NFE", "FID", "precision", "recall", "val loss", "paper FID-10k (B/2)"],
        [[r["label"], r["sampler"], r["nfe"], report.fmt(r["fid"]), report.fmt(r["precision"], 3),
          report.fmt(r["recall"], 3), report.fmt(r["val_loss"], 4), r["paper_fid"]] for r in rows]
        + [["**noise floor** (real held-out)", "–", "–", report.fmt(floor["fid"]),
            report.fmt(floor["precision"], 3), report.fmt(floor["recall"], 3), "–", "–"]])
    claims = [f"- {c['claim']}: **{c['verdict']}** (FID {c['a']} {report.fmt(c['fid_a'])} vs {c['b']} "
              f"{report.fmt(c['fid_b'])})" for c in results["claims"]]
    best = min((r for r in rows if r["fid"]["mean"] is not None), key=lambda r: r["fid"]["mean"], default=None)
    floor_note = report.floor_note([r["fid"] for r in rows], floor["fid"])
    return "\n".join([report.header("training timestep samplers (`timesteps`)", study, results), table, "",
                      "![FID per schedule](fid_per_schedule.png)", "",
                      f"Lowest mean FID: {best['label'] if best else 'n/a'}. {floor_note}", "",
                      "The paper's claims (SPEC §7):", *claims])

