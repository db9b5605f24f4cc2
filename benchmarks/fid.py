"""FID benchmark: a full --mode=evaluate FID-10k for the MNIST config, and the classifier.

  python benchmarks/fid.py                      # MNIST IDX files in ../shared/data/mnist
  python benchmarks/fid.py --steps=50           # the real protocol (NFE 50; minutes per 1k on CPU)

Rows: training the MNIST feature classifier (400 steps, test accuracy), its feature throughput
(uint8 32x32 images/s), and one `fid.evaluate` call: reference statistics of the held-out
2,000 digits, then N samples (uniform classes) from the MNIST config's DiT (PF-Tiny, 192 wide,
6 deep, p=4; random weights: the time does not depend on them) with `--sampler`/`--steps`,
features, FID/sFID/IS/precision/recall. Sampling time scales with NFE: the per-(image x NFE)
rate in the table extrapolates to other step counts. Writes benchmarks/results/fid_<platform>.md
and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

import jax
import numpy as np
from flax import nnx

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.machine import cpu_name  # noqa: E402
from configs import mnist  # noqa: E402
from patch_forcing import checkpoint as ckpt_lib  # noqa: E402
from patch_forcing import config_lib  # noqa: E402
from patch_forcing.evaluation import features, fid  # noqa: E402
from patch_forcing.flow import samplers  # noqa: E402
from patch_forcing.models import dit  # noqa: E402


def machine() -> str:
    cpu = cpu_name()
    dev = jax.devices()[0]
    return (f"{platform.platform()}, {cpu}, {os.cpu_count()} CPUs, {dev.platform} x{jax.device_count()}, "
            f"jax {jax.__version__}")


def features_rate(fn, batch: int, repeats: int = 5) -> float:
    x = np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 1), dtype=np.uint8)
    jax.block_until_ready(fn(x))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(x))
        times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--num_samples", type=int, default=10_000)
    ap.add_argument("--sampler", default="euler_pf")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data" / "mnist"))
    ap.add_argument("--workdir", default=None, help="default: a temporary directory")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()
    load_before = os.getloadavg()
    wd = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="pf_fid_bench_"))

    c = mnist.get_config()
    c.data.data_dir = args.data_dir
    c.sampler.name, c.sampler.steps = args.sampler, args.steps
    c.eval.num_samples, c.eval.batch_size = args.num_samples, args.batch
    c.eval.feature_network, c.eval.reference = "auto", "data"
    mcfg = config_lib.model_config(c)
    scfg = config_lib.sampler_config(c, mcfg)
    nfe = samplers.expected_nfe(scfg)

    # 1. The feature classifier ('auto' would train it inside evaluate; timed separately here).
    t0 = time.perf_counter()
    meta = features.train_classifier(c.data, str(wd / "classifier"), seed=c.seed, verbose=False)
    train_s = time.perf_counter() - t0
    fn = features.load_classifier(str(wd / "classifier")).host_fn()
    rate = features_rate(fn, args.batch)

    # 2. A random-weight MNIST DiT as the inference checkpoint, then one full evaluation.


    params = nnx.to_pure_dict(nnx.state(dit.DiT(mcfg, rngs=nnx.Rngs(0)), nnx.Param))
    n_params = sum(np.size(x) for x in jax.tree.leaves(params))
    ckpt_lib.save_inference(wd / "inference", mcfg.to_dict(), params, extra={"step": 0})
    t0 = time.perf_counter()
    rec = fid.evaluate(c, str(wd))
    eval_s = time.perf_counter() - t0
    sec = rec["seconds"]
    sampling = sec["sampling_and_features"]
    load_after = os.getloadavg()
    tag = f"FID-{fid._count_tag(args.num_samples)}"
    est_50 = sec["setup_and_reference"] + sec["metrics"] + sampling * 50 / nfe  # sampling is linear in NFE

    rows = [
        {"stage": "train MNIST classifier", "detail": f"{meta['steps']} steps, batch {meta['batch_size']}, "
         f"8,000 train / 2,000 test, test accuracy {meta['test_accuracy']:.4f}", "seconds": round(train_s, 1),
         "rate": f"{meta['steps'] / train_s:.1f} steps/s"},
        {"stage": "classifier features", "detail": f"uint8 32x32x1, batch {args.batch}, median of 5",
         "seconds": round(args.batch / rate, 3), "rate": f"{rate:,.0f} images/s"},
        {"stage": f"{tag}: setup + reference", "detail": f"load checkpoint, reference stats of "
         f"{rec['protocol']['reference']} ({rec['protocol']['reference_count']} images)",
         "seconds": sec["setup_and_reference"], "rate": ""},
        {"stage": f"{tag}: sampling + features", "detail": f"{args.num_samples:,} samples, "
         f"{rec['protocol']['sampler']} (NFE {rec['protocol']['nfe']}), batch {args.batch}, "
         f"DiT {n_params / 1e6:.2f}M params", "seconds": sampling,
         "rate": f"{args.num_samples / sampling:.1f} images/s = {args.num_samples * nfe / sampling:.0f} image-NFE/s"},
        {"stage": f"{tag}: metrics", "detail": "FID, sFID, IS, precision/recall (k=3) vs 2,000 references",
         "seconds": sec["metrics"], "rate": ""},
        {"stage": f"{tag}: total evaluate()", "detail": f"FID {rec['fid']:.2f} (random weights)",
         "seconds": round(eval_s, 1), "rate": f"50-step estimate: {est_50:,.0f} s"},
    ]
    m = machine()
    head = (f"# FID benchmark ({jax.devices()[0].platform})\n\nMachine: {m}. Load average before/after: "
            f"{load_before[0]:.1f} / {load_after[0]:.1f} (a shared machine: times are upper bounds).\n"
            f"MNIST config (`configs/mnist.py`), feature network `{rec['protocol']['feature_network']}` "
            f"('auto'), sampler `{rec['protocol']['sampler']}`: {args.steps} steps only, to fit in minutes on "
            f"CPU; sampling time is linear in NFE.\n")
    cols = ["stage", "detail", "seconds", "rate"]
    md = [head, "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(str(r[k]) for k in cols) + " |" for r in rows]
    text = "\n".join(md) + "\n"
    print(text)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plat = jax.devices()[0].platform
    (out / f"fid_{plat}.md").write_text(text)
    (out / f"fid_{plat}.json").write_text(json.dumps(
        {"machine": m, "load_average": [load_before[0], load_after[0]], "args": vars(args), "rows": rows,
         "classifier": {k: v for k, v in meta.items() if k != "params"}, "evaluate": rec}, indent=2, default=str))


if __name__ == "__main__":
    main()
