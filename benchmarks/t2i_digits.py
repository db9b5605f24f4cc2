"""The captioned-digits text-to-image report: prompt accuracy and classifier FID of a Patch Forcing
model vs the global-time baseline at equal steps, and euler_pf vs look_ahead at equal NFE.

  python -m patch_forcing.main --config=configs/t2i.py:digits --workdir=/tmp/t2i_runs/pf
  python -m patch_forcing.main --config=configs/t2i.py:digits,global --workdir=/tmp/t2i_runs/global
  python benchmarks/t2i_digits.py --pf=/tmp/t2i_runs/pf --baseline=/tmp/t2i_runs/global

For each seed s, the prompts are the captions of held-out canvases [s*N, (s+1)*N) (test digits,
never trained on); each gets one sample (noise from the seed). The region classifier
(evaluation/prompt_accuracy.py) reads both halves: prompt accuracy = both digits, colours and sizes
right and in the prompt's order; the shuffled-prompt control scores the same images against
permuted prompts. FID: classifier features against 5,000 train canvases; the noise-floor row
scores the N real held-out canvases of the same prompts the same way. Writes
benchmarks/results/t2i_digits.md/.json and prompt-grid pictures in benchmarks/results/t2i_digits/.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import sys
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.machine import cpu_name  # noqa: E402
from configs import t2i as t2i_configs  # noqa: E402
from patch_forcing import checkpoint, config_lib, pictures  # noqa: E402
from patch_forcing.evaluation import prompt_accuracy as pa  # noqa: E402
from patch_forcing.flow import samplers  # noqa: E402

OUT = pathlib.Path(__file__).resolve().parent / "results"
METRICS = ("prompt_accuracy", "digit_accuracy", "colour_accuracy", "size_accuracy", "shuffled_prompt_accuracy",
           "shuffled_digit_accuracy", "fid")


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def load(workdir: str, config_arg: str):
    config = t2i_configs.get_config(config_arg)
    mcfg, apply, params, meta = checkpoint.load_model(os.path.join(workdir, "inference"))
    return config, mcfg, apply, params, config_lib.conditioning(config), meta


def generate(model, sampler: dict, prompts: list[str], seed: int, batch: int = 250) -> tuple[np.ndarray, int]:
    """One uint8 sample per prompt; noise of prompt i from fold_in(key(seed), i)."""
    config, mcfg, apply, params, cond, _ = model
    scfg = config_lib.sampler_config(config, mcfg, cond)
    scfg = samplers.as_sampler_config(scfg, **sampler)
    fn = samplers.make_sample_fn(apply, scfg)
    key, (h, w) = jax.random.key(seed), mcfg.image_size
    out, nfe = [], 0
    for lo in range(0, len(prompts), batch):
        chunk = prompts[lo:lo + batch]
        chunk = chunk + [chunk[-1]] * (batch - len(chunk))
        noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), (h, w, mcfg.in_channels)))(
            np.arange(lo, lo + batch))
        x, info = fn(params, noise, cond.encode_prompts(chunk), jax.random.fold_in(key, 10**6 + lo))
        out.append(pictures.to_uint8(np.asarray(x))[:min(batch, len(prompts) - lo)])
        nfe = int(info["nfe"])
    return np.concatenate(out), nfe


def score(fnet, ref, images, attrs, seed) -> dict:
    read = pa.classify(fnet, images)
    r = pa.scores(read["attrs"], attrs)
    shuf = pa.scores(read["attrs"], pa.shuffled(attrs, seed))
    r.update(shuffled_prompt_accuracy=shuf["prompt_accuracy"], shuffled_digit_accuracy=shuf["digit_accuracy"],
             fid=pa.fid(read["features"], ref))
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pf", required=True)
    ap.add_argument("--baseline", required=True)
    ap.add_argument("--classifier", default="/tmp/t2i_runs/classifier")
    ap.add_argument("--num", type=int, default=500)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=21, help="euler_pf steps (= NFE); look_ahead gets 11 steps = 21 NFE")
    ap.add_argument("--cfg", type=float, default=3.0)
    args = ap.parse_args()
    t0, c0 = time.time(), cpu_seconds()
    fnet = pa.region_classifier(args.classifier)
    ref = pa.reference_stats(fnet)
    pf, base = load(args.pf, "digits"), load(args.baseline, "digits,global")
    la_steps = max(s for s in range(1, args.steps + 1)
                   if samplers.expected_nfe(dict(name="look_ahead", steps=s)) <= args.steps)
    rows = {  # name -> (model, sampler overrides)
        f"PF (LTG), euler_pf {args.steps} steps": (pf, dict(name="euler_pf", steps=args.steps, cfg_scale=args.cfg)),
        f"PF (LTG), look_ahead {la_steps} steps": (pf, dict(name="look_ahead", steps=la_steps, cfg_scale=args.cfg)),
        f"global-time baseline, euler_pf {args.steps} steps": (base, dict(name="euler_pf", steps=args.steps,
                                                                          cfg_scale=args.cfg)),
        f"PF (LTG), euler_pf {args.steps} steps, no CFG": (pf, dict(name="euler_pf", steps=args.steps, cfg_scale=1.0)),
    }
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict[str, list] = {"real held-out canvases (noise floor)": []}
    nfes = {}
    for seed in seeds:
        real, attrs, prompts = pa.real_canvases("test", seed * args.num, args.num)
        results["real held-out canvases (noise floor)"].append(score(fnet, ref, real, attrs, seed))
        for name, (model, sampler) in rows.items():
            images, nfes[name] = generate(model, sampler, prompts, seed)
            results.setdefault(name, []).append(score(fnet, ref, images, attrs, seed))
            print(name, seed, results[name][-1], flush=True)
    _pictures(rows, pf)
    record = {"rows": results, "nfe": nfes, "seeds": seeds, "num_per_seed": args.num, "cfg_scale": args.cfg,
              "classifier": {"name": fnet.name, **_classifier_meta(args.classifier)},
              "checkpoints": {"pf": pf[-1].get("step"), "baseline": base[-1].get("step")},
              "device": f"CPU: {cpu_name()} (2 cores, shared)", "jax": jax.__version__,
              "wall_seconds": round(time.time() - t0, 1), "cpu_seconds": round(cpu_seconds() - c0, 1)}
    OUT.mkdir(exist_ok=True)
    (OUT / "t2i_digits.json").write_text(json.dumps(record, indent=2))
    md = _markdown(record)
    (OUT / "t2i_digits.md").write_text(md + "\n")
    print(md)


def _classifier_meta(directory: str) -> dict:
    with open(os.path.join(directory, "classifier.json")) as f:
        m = json.load(f)
    return {k: m[k] for k in ("test_accuracy", "steps", "num_train", "num_test")}


def _pictures(rows: dict, pf) -> None:
    """A prompt grid (8 held-out prompts x 4 samples) per row of the table, and the real canvases."""
    d = OUT / "t2i_digits"
    d.mkdir(parents=True, exist_ok=True)
    real, _, prompts = pa.real_canvases("test", 4000, 8)
    pictures.save_png(d / "real.png", pictures.prompt_grid(real[:, None], prompts))
    flat = [p for p in prompts for _ in range(4)]
    for name, (model, sampler) in rows.items():
        images, _ = generate(model, sampler, flat, seed=123, batch=32)
        slug = name.split(",")[0].split(" ")[0].lower() + "-" + sampler["name"] + f"-cfg{sampler['cfg_scale']:g}"
        pictures.save_png(d / f"{slug}.png", pictures.prompt_grid(images.reshape(8, 4, *images.shape[1:]), prompts))


def _markdown(r: dict) -> str:
    lines = [
        "# Captioned digits: text-to-image prompt accuracy and classifier FID",
        "",
        f"Prompts: captions of held-out canvases (test digits), {r['num_per_seed']} per seed, seeds {r['seeds']}; "
        f"one sample each, CFG {r['cfg_scale']} (empty-prompt null) unless noted. Values: mean over seeds "
        "(min-max). Prompt accuracy: the region classifier reads digit, colour and size of both halves and all six "
        "must match the prompt; shuffled: the same images scored against permuted prompts. FID: the classifier's "
        "features of both halves (256-d) against 5,000 train canvases.",
        "",
        "| | NFE | prompt acc. | shuffled | digit | colour | size | FID |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, runs in r["rows"].items():
        def cell(k, fmt=".3f"):
            v = np.array([x[k] for x in runs])
            return f"{v.mean():{fmt}} ({v.min():{fmt}}-{v.max():{fmt}})"
        lines.append(f"| {name} | {r['nfe'].get(name, '-')} | {cell('prompt_accuracy')} | "
                     f"{cell('shuffled_prompt_accuracy')} | {cell('digit_accuracy')} | {cell('colour_accuracy')} | "
                     f"{cell('size_accuracy')} | {cell('fid', '.2f')} |")
    c = r["classifier"]
    lines += ["", f"Region classifier {c['name']}: {c['test_accuracy']:.3f} joint (digit, colour, size) accuracy on "
              f"{c['num_test']} held-out regions ({c['steps']} steps on {c['num_train']}). Checkpoints: PF step "
              f"{r['checkpoints']['pf']}, baseline step {r['checkpoints']['baseline']}. Device: {r['device']}, "
              f"JAX {r['jax']}; this evaluation took {r['wall_seconds']:.0f} s wall, {r['cpu_seconds']:.0f} s CPU."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
