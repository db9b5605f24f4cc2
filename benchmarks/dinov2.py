"""DINOv2-B/14 feature throughput (images/s) of `dinov2.make_encoder`: on the fly or pre-extracted?

  python benchmarks/dinov2.py                                   # CPU: batch 8, 5 repeats
  python benchmarks/dinov2.py --batch=256 --dtype=bfloat16      # on an accelerator

Random weights with the real shapes (speed does not depend on the values), variant
dinov2_vitb14_reg (the authors' helper's default; 4 registers more than dinov2_vitb14, same
cost). Input: (B, 256, 256, 3) in [-1, 1], resized to 224 inside, as REPA. Median over --repeats
jitted calls after one warm-up call; compile time measured apart (lower + compile).
For scale, the XLA FLOP count of one forward of the DiT it serves (--dit, lowered on abstract
shapes, nothing run): a training step costs about 3 forwards.
Writes benchmarks/results/dinov2_<platform>.md and .json.
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
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu_name  # noqa: E402
from patch_forcing.models import dinov2, dit  # noqa: E402

IMAGENET_TRAIN = 1_281_167


def _flops(cost) -> float:
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return (cost or {}).get("flops", float("nan"))


def dit_forward_gflop(name: str, batch: int = 8) -> float:
    """XLA's FLOP count per image of one DiT forward on ImageNet-256 latents (32x32x4)."""
    cfg = dit.preset(name)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: dit.DiT(cfg, rngs=nnx.Rngs(0))))
    t_shape = (batch, cfg.num_patches) if cfg.per_patch else (batch,)
    args = (jax.ShapeDtypeStruct((batch, *cfg.image_size, cfg.in_channels), jnp.float32),
            jax.ShapeDtypeStruct(t_shape, jnp.float32), jax.ShapeDtypeStruct((batch,), jnp.int32))
    lowered = jax.jit(lambda s, x, t, y: nnx.merge(graphdef, s)(x, t, y)).lower(state, *args)
    return _flops(lowered.cost_analysis()) / batch / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="dinov2_vitb14_reg", choices=dinov2.PRESETS)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--image", type=int, default=256)
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dit", default="PF-XL/2", choices=dit.PRESETS)
    args = ap.parse_args()
    load_before = os.getloadavg()[0]

    cfg = dinov2.preset(args.variant, dtype=args.dtype)
    params = nnx.to_pure_dict(nnx.state(dinov2.DinoV2(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    features = jax.jit(dinov2.make_encoder(cfg, params, args.resolution))
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (args.batch, args.image, args.image, 3)),
                         jnp.float32)

    t0 = time.perf_counter()
    compiled = features.lower(params, images).compile()
    compile_s = time.perf_counter() - t0
    gflop_per_image = _flops(compiled.cost_analysis()) / args.batch / 1e9
    dit_gflop = dit_forward_gflop(args.dit)
    out = jax.block_until_ready(compiled(params, images))  # warm-up
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, images))
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    ips = args.batch / med

    platform_name = jax.devices()[0].platform
    tokens, d = out.shape[1:]
    info = {
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()}",
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "device": str(jax.devices()[0].device_kind), "platform": platform_name, "jax": jax.__version__,
        "variant": args.variant, "params": n_params, "dtype": args.dtype, "batch": args.batch,
        "input": f"{args.image}x{args.image}", "resolution": args.resolution, "output": [tokens, d],
        "repeats": args.repeats, "seconds": [round(t, 3) for t in times],
        "ms_per_batch": round(med * 1e3, 1), "images_per_s": round(ips, 2), "compile_s": round(compile_s, 2),
        "gflop_per_image": round(gflop_per_image, 1),
        "dit": args.dit, "dit_forward_gflop_per_image": round(dit_gflop, 1),
        "dino_over_dit_train_step": round(gflop_per_image / (3 * dit_gflop), 3),
        "imagenet_pass_hours": round(IMAGENET_TRAIN / ips / 3600, 1),
        "imagenet_features_gb_bf16": round(IMAGENET_TRAIN * tokens * d * 2 / 1e9, 1),
    }
    md = [f"# DINOv2 features on {platform_name}",
          "",
          f"Machine: {info['machine']}; device: {info['device']}; jax {jax.__version__}; 1-min load "
          f"average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after (other jobs share the cores).",
          f"Model: {args.variant} ({n_params / 1e6:.1f}M params, random weights), compute {args.dtype}; "
          f"input ({args.batch}, {args.image}, {args.image}, 3) in [-1, 1] -> bicubic {args.resolution} -> "
          f"patch tokens ({args.batch}, {tokens}, {d}). Median of {args.repeats} jitted calls after a warm-up.",
          "",
          "| batch | ms / batch | images / s | compile (s) | GFLOP / image (XLA) |",
          "|---:|---:|---:|---:|---:|",
          f"| {args.batch} | {info['ms_per_batch']} | {info['images_per_s']} | {info['compile_s']} | "
          f"{info['gflop_per_image']} |",
          "",
          f"One pass over ImageNet train ({IMAGENET_TRAIN:,} images) at this rate: "
          f"{info['imagenet_pass_hours']} h. Pre-extracted features would take "
          f"{info['imagenet_features_gb_bf16']} GB in bfloat16 ({tokens} x {d} per image; twice that in "
          f"float32, and again per flip/crop augmentation).",
          f"For scale: one {args.dit} forward is {dit_gflop:.1f} GFLOP / image (XLA count), so on the fly "
          f"DINOv2 adds ~{100 * info['dino_over_dit_train_step']:.1f}% to a training step's FLOPs "
          "(step ~ 3 forwards).",
          ""]
    text = "\n".join(md)
    print(text)
    print("per-call seconds:", info["seconds"])
    outdir = ROOT / "benchmarks" / "results"
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / f"dinov2_{platform_name}.md").write_text(text)
    (outdir / f"dinov2_{platform_name}.json").write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
