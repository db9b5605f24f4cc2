"""Does REPA speed up convergence on small data? MNIST, Patch Forcing with and without alignment.

  python benchmarks/repa_convergence.py --workdir=/tmp/repa_study        # ~40 min on 2 CPU cores

One command: trains the same small Patch Forcing DiT on MNIST (32x32, IDX files in
../shared/data/mnist; the first 8,000 test digits train) with REPA off and on, for the same steps
and seeds, and records FID against training steps (the in-training FID hook: fixed noise and
labels per seed, EMA weights). REPA's target is a frozen MNIST classifier's last conv map (8x8x128,
bilinearly resized to the DiT's 4x4 token grid), a *different* network (wider, other seed) from
the classifier whose features score FID. Reference statistics: all 8,000 training digits. Noise
floor: each 1,000-digit half of the 2,000 held-out digits scored the same way (as many images as
a sample set). Reruns reuse finished runs in --workdir. Writes benchmarks/results/
repa_convergence_<platform>.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time

os.environ.setdefault("XLA_FLAGS", "")  # one CPU device: runs do not depend on fake devices
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu_name  # noqa: E402
from configs import common, mnist  # noqa: E402
from patch_forcing import pictures, train  # noqa: E402
from patch_forcing.data import pipeline  # noqa: E402
from patch_forcing.evaluation import features, fid, metrics  # noqa: E402
from patch_forcing.models import classifier  # noqa: E402

ARMS = ("plain", "repa")


def study_config(args, seed: int, arm: str, study: pathlib.Path):
    """configs/mnist.py:repa made small enough for a CPU (p 8: 4x4 tokens), REPA on or off."""
    c = mnist.get_config("repa")
    c.seed = seed
    c.data.data_dir = args.data_dir
    c.data.batch_size = args.batch_size
    c.model = common.model_block("PF-Tiny/4", patch_size=8, image_size=32, in_channels=1, num_classes=10,
                                 hidden_size=args.width, depth=args.depth, num_heads=4)
    c.optim.lr, c.optim.warmup_steps = args.lr, 100
    c.ema.decay = 0.995
    c.train.num_steps = args.steps
    c.checkpoint.every_steps = args.steps
    c.log.every_steps, c.log.eval_every_steps, c.log.sample_every_steps = 50, args.steps, args.steps
    c.log.num_samples, c.log.num_eval_examples = 32, 256
    c.sampler.name, c.sampler.steps = "euler_pf", args.sampler_steps
    c.eval.update(fid_every_steps=args.eval_every, fid_num_samples=args.num_samples, batch_size=500,
                  feature_network=f"classifier:{study / 'fid_classifier'}", reference=str(study / "reference.npz"))
    c.repa.update(encoder_path=str(study / "repa_encoder"), z_dim=128, encoder_depth=args.align_depth,
                  coeff=args.coeff)
    if arm == "plain":
        c.repa.encoder_depth = 0
    return c


def prepare(args, study: pathlib.Path) -> dict:
    """The FID classifier, the REPA target classifier, reference statistics, the noise floor."""
    data = mnist.get_config().data
    data.data_dir = args.data_dir
    if not classifier.exists(str(study / "fid_classifier")):
        features.train_classifier(data, str(study / "fid_classifier"), seed=0)
    if not classifier.exists(str(study / "repa_encoder")):
        wide = classifier.ClassifierConfig(image_size=(32, 32), widths=(32, 64, 128))
        features.train_classifier(data, str(study / "repa_encoder"), seed=1, cfg=wide)
    fnet = features.load_classifier(str(study / "fid_classifier"))

    def batches(split):
        for b in pipeline.make_eval_batches(data, split, batch_size=500):
            yield pictures.to_uint8(b["image"])

    ref_path = study / "reference.npz"
    if not ref_path.exists():
        stats = metrics.reference_stats_from_images(batches(data.split_train), fnet.host_fn(), keep_pool=10_000,
                                                    network=fnet.name)
        metrics.save_reference_stats(str(ref_path), stats)
    ref = metrics.load_reference_stats(str(ref_path))
    floor = [fid.score(fid.image_features(fnet, batches(split)), ref, fnet.name)["fid"]
             for split in ("test[8000:9000]", "test[9000:10000]")]
    return {"reference_count": int(ref["count"]), "noise_floor": floor, "feature_network": fnet.name}


def run(args, study: pathlib.Path, seed: int, arm: str) -> dict:
    workdir = study / f"{arm}-seed{seed}"
    if not (workdir / "inference").exists():
        t0 = time.time()
        train.train_and_evaluate(study_config(args, seed, arm, study), str(workdir))
        (workdir / "wall_s.txt").write_text(f"{time.time() - t0:.1f}")
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    tag = f"fid_{args.num_samples // 1000}k" if args.num_samples % 1000 == 0 else f"fid_{args.num_samples}"
    fids = {m["step"]: m[tag] for m in lines if tag in m}
    repa_loss = {m["step"]: m["repa_loss"] for m in lines if "repa_loss" in m}
    flow = [m["flow_loss"] for m in lines if "flow_loss" in m][-4:]  # the last 200 steps' logs
    sps = [m["steps_per_sec"] for m in lines if "steps_per_sec" in m][1:]  # the first includes compiling
    return {"fid": fids, "repa_loss": repa_loss, "final_flow_loss": float(np.mean(flow)), "wall_s": float((workdir / "wall_s.txt").read_text()),
            "steps_per_sec": float(np.median(sps)) if sps else None}


def plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib  # optional: only to draw the figure

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, color in zip(ARMS, ("tab:blue", "tab:orange")):
        runs = [r for r in result["runs"] if r["arm"] == arm]
        steps = sorted(runs[0]["fid"], key=int)
        vals = np.array([[r["fid"][s] for s in steps] for r in runs])
        x = [int(s) for s in steps]
        for v in vals:
            ax.plot(x, v, color=color, alpha=0.35, lw=1)
        label = "PF + REPA (coeff %.2g)" % result["settings"]["coeff"] if arm == "repa" else "PF"
        ax.plot(x, vals.mean(0), color=color, lw=2, marker="o", label=f"{label}, mean of {len(vals)} seeds")
    lo, hi = min(result["noise_floor"]), max(result["noise_floor"])
    ax.axhspan(lo, hi if hi > lo else lo * 1.02, color="grey", alpha=0.3,
               label="noise floor: held-out real digits")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"FID ({result['settings']['num_samples']} samples, classifier features)")
    ax.set_title("MNIST: Patch Forcing with and without REPA")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report(result: dict) -> str:
    s, runs = result["settings"], result["runs"]
    steps = sorted(runs[0]["fid"], key=int)
    rows = ["| step | " + " | ".join(f"{a} seed {r['seed']}" for a in ARMS for r in runs if r["arm"] == a)
            + " | plain mean | REPA mean |", "|---:|" + "---:|" * (len(runs) + 2)]
    for st in steps:
        vals = [r["fid"][st] for a in ARMS for r in runs if r["arm"] == a]
        means = [np.mean([r["fid"][st] for r in runs if r["arm"] == a]) for a in ARMS]
        rows.append(f"| {st} | " + " | ".join(f"{v:.2f}" for v in vals) + f" | {means[0]:.2f} | {means[1]:.2f} |")
    floor = ", ".join(f"{v:.2f}" for v in result["noise_floor"])
    return "\n".join([
        "# REPA on MNIST: FID against training steps (CPU)", "",
        f"Machine: {result['machine']}; device: {result['device']}; jax {jax.__version__}. "
        f"Wall time: {sum(r['wall_s'] for r in runs) / 60:.1f} min for the {len(runs)} training runs (with their "
        f"FID evaluations; per run " + ", ".join(f"{r['wall_s'] / 60:.1f}" for r in runs) + " min), "
        f"{result['prepare_min']:.1f} min for the classifiers, reference and noise floor; the CPU was shared "
        "with other jobs.", "",
        f"Model: PF DiT width {s['width']}, depth {s['depth']}, 4 heads, patch 8 on 32x32 MNIST (4x4 tokens), "
        f"batch {s['batch_size']}, AdamW lr {s['lr']} (100 warm-up steps), EMA 0.995, LTG times, NLL 0.01; "
        f"{s['steps']} steps, seeds {s['seeds']}. REPA: projector after block {s['align_depth']} "
        f"(MLP 256 -> 128), coeff {s['coeff']}, target = a frozen wider MNIST classifier's 8x8x128 map "
        "resized to 4x4 (another network than the FID classifier).",
        f"FID: {s['num_samples']} EMA samples (euler_pf, {s['sampler_steps']} steps, fixed noise per seed) "
        f"against {result['reference_count']} training digits, features {result['feature_network']}. "
        f"Noise floor (1,000 held-out real digits, two halves): {floor}.", "",
        *rows, "",
        "Training flow loss (mean of the last 4 logs, steps %d-%d): " % (s["steps"] - 150, s["steps"])
        + ", ".join(f"{r['arm']} seed {r['seed']} {r['final_flow_loss']:.4f}" for r in runs) + ". "
        "REPA's alignment term (1 - cos) from the first to the last log: "
        + ", ".join(f"seed {r['seed']} {r['repa_loss'][min(r['repa_loss'])]:.3f} -> "
                    f"{r['repa_loss'][max(r['repa_loss'])]:.3f}" for r in runs if r["arm"] == "repa") + ".", "",
        "Steps/s (median of the logged intervals, FID evaluations excluded): "
        + ", ".join(f"{r['arm']} seed {r['seed']} {r['steps_per_sec'] or float('nan'):.2f}" for r in runs) + ".", "",
        f"![FID against steps](repa_convergence_{result['device']}.png)", "",
    ])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True, help="study folder outside the repo (reused on reruns)")
    ap.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "data" / "mnist"))
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--eval_every", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--num_samples", type=int, default=1000)
    ap.add_argument("--sampler_steps", type=int, default=20)
    ap.add_argument("--width", type=int, default=96)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--align_depth", type=int, default=2)
    ap.add_argument("--coeff", type=float, default=0.5)
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    t0 = time.time()
    study = pathlib.Path(args.workdir)
    study.mkdir(parents=True, exist_ok=True)
    result = {"machine": f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()}",
              "device": str(jax.devices()[0].platform), "settings": vars(args) | {"seeds": list(range(args.seeds))},
              **prepare(args, study), "runs": []}
    result["prepare_min"] = (time.time() - t0) / 60
    for seed in range(args.seeds):
        for arm in ARMS:
            r = run(args, study, seed, arm)
            result["runs"].append({"arm": arm, "seed": seed, **r})
            print(f"{arm} seed {seed}: FID {r['fid']} ({r['wall_s']} s)", flush=True)
    out = pathlib.Path(args.out)
    name = f"repa_convergence_{result['device']}"
    (out / f"{name}.json").write_text(json.dumps(result, indent=1, default=str))
    plot(result, out / f"{name}.png")
    (out / f"{name}.md").write_text(report(result))
    print(report(result))


if __name__ == "__main__":
    main()
