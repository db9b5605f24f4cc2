"""Inception feature throughput (images/s) of `inception.features_fn`, and metric costs.

  python benchmarks/inception.py                          # CPU, batches 4 and 16, 3 repeats
  python benchmarks/inception.py --batches=64,256 --repeats=5 --image=256   # on an accelerator

Uses the real pytorch-fid weights when `load_inception()` finds them, else random weights (the
table says which; speed does not depend on the values). Input: uint8 (B, image, image, 3),
resized to 299 inside. Medians over --repeats calls after one warm-up (compile) call.
Also times Frechet distance (2048-d) and precision/recall on --pr-n random features.
Writes benchmarks/results/inception_<platform>.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu_name  # noqa: E402
from patch_forcing.evaluation import metrics  # noqa: E402
from patch_forcing.models import inception  # noqa: E402


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="4,16")
    ap.add_argument("--image", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--preprocess", default="adm", choices=inception.PREPROCESS_MODES)
    ap.add_argument("--pr-n", type=int, default=2000)
    args = ap.parse_args()
    load_before = os.getloadavg()[0]

    try:
        params, weights = inception.load_inception(), "pytorch-fid (real)"
    except FileNotFoundError:
        params, weights = inception.init_params(0), "random (real file absent)"
    params = jax.device_put(params)
    rows = []
    for b in map(int, args.batches.split(",")):
        images = np.random.default_rng(b).integers(0, 256, (b, args.image, args.image, 3), np.uint8)
        images = jax.device_put(images)

        def run():
            jax.block_until_ready(inception.features_fn(params, images, args.preprocess))

        t0 = time.perf_counter()
        run()
        first_s = time.perf_counter() - t0
        med = _median_time(run, args.repeats)
        rows.append({"batch": b, "input": f"{args.image}x{args.image}", "ms_per_batch": round(med * 1e3, 1),
                     "images_per_s": round(b / med, 2), "first_call_s": round(first_s, 2)})
        print(rows[-1], flush=True)

    rng = np.random.default_rng(0)
    f1 = rng.standard_normal((args.pr_n, 2048)).astype(np.float32)
    f2 = (rng.standard_normal((args.pr_n, 2048)) * 1.1).astype(np.float32)
    s1, s2 = metrics.feature_stats(f1), metrics.feature_stats(f2)
    fid_s = _median_time(lambda: metrics.frechet_distance(*s1, *s2), 1)
    pr_s = _median_time(lambda: metrics.precision_recall(f1, f2), 1)

    platform_name = jax.devices()[0].platform
    info = {
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()}",
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "device": str(jax.devices()[0].device_kind), "platform": platform_name,
        "jax": jax.__version__, "weights": weights, "preprocess": args.preprocess,
        "repeats": args.repeats, "rows": rows,
        "frechet_2048_s": round(fid_s, 2), f"precision_recall_{args.pr_n}x{args.pr_n}_s": round(pr_s, 2),
    }
    md = [f"# Inception features on {platform_name}",
          "",
          f"Machine: {info['machine']}; device: {info['device']}; jax {jax.__version__}; "
          f"1-min load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after "
          f"(other jobs share the cores).",
          f"Weights: {weights}; preprocess '{args.preprocess}'; median of {args.repeats} calls "
          f"after a warm-up call (first_call includes compilation).",
          "",
          "| batch | input | ms / batch | images / s | first call (s) |",
          "|---:|---|---:|---:|---:|"]
    md += [f"| {r['batch']} | {r['input']} | {r['ms_per_batch']} | {r['images_per_s']} | "
           f"{r['first_call_s']} |" for r in rows]
    md += ["", f"Frechet distance, 2048-d (eigh): {fid_s:.2f} s. Precision/recall k=3 on "
           f"{args.pr_n} x {args.pr_n} features: {pr_s:.2f} s.", ""]
    text = "\n".join(md)
    print(text)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"inception_{platform_name}.md").write_text(text)
    (out / f"inception_{platform_name}.json").write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
