"""Sampler benchmark: wall time per image at equal NFE, overhead over the model's forward passes,
and compile time against the number of steps.

  python benchmarks/sampling.py                                   # PF-Tiny/2 on 16x16x4, CPU
  python benchmarks/sampling.py --preset=PF-B/2 --image-size=32 --batch=32 --nfe=100   # GPU

For every sampler the step count is chosen so that it spends --nfe model calls (look_ahead: 2 per
step, 1 while t <= 0.05). "forward" is one model call timed inside a compiled scan of --nfe calls
(no dispatch), so overhead = wall / (NFE x forward) - 1 is what the sampler adds: masks, sorts,
selects, the loop. Compile time: lowering + compiling a fresh jit for 10, 50 and 250 steps.
Medians over --repeats interleaved runs after one warm-up; on the CPU backend the clock is the
process CPU time (run with XLA_FLAGS=--xla_cpu_multi_thread_eigen=false), steadier than wall time
on a shared machine. Writes benchmarks/results/sampling_<platform>.md/.json.
"""

from __future__ import annotations

import argparse
import dataclasses
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

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from patch_forcing.flow import samplers  # noqa: E402
from patch_forcing.models import dit  # noqa: E402

NAMES = ("euler_pf", "dual_loop", "look_ahead", "random_order")


def steps_for_nfe(name: str, nfe: int, n_inner: int) -> int:
    """The step count whose expected NFE is closest to (and not above) `nfe`."""
    best = 1
    for s in range(1, nfe + 1):
        if samplers.expected_nfe(dict(name=name, steps=s, n_inner=n_inner)) <= nfe:
            best = s
    return best


def make_model(args):
    mcfg = dit.preset(args.preset, image_size=args.image_size, dtype=args.dtype)
    graphdef, params, rest = dit.init(mcfg, jax.random.key(0))
    # A fresh DiT outputs exactly zero (adaLN-Zero); perturb it so v and s are non-trivial.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [p + 0.02 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)])
    apply = dit.make_apply(graphdef, rest)
    return mcfg, apply, params


def interleaved_medians(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Median wall and process-CPU seconds per call of each fn(); one warm-up each, then `repeats`
    rounds that run every fn once in turn, so a noisy (shared) machine slows them all alike."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    wall, cpu = {k: [] for k in fns}, {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn())
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    med = lambda d: {k: statistics.median(v) for k, v in d.items()}  # noqa: E731
    return med(wall), med(cpu)


def forward_loop(apply, num_tokens, nfe, cfg_scale, null):
    """jit(params, x, labels): --nfe model calls (doubled batch when cfg_scale != 1) in a scan."""

    @jax.jit
    def loop(params, x, labels):
        def body(x, k):
            xx, yy = (x, labels) if cfg_scale == 1.0 else (
                jnp.concatenate([x, x]), jnp.concatenate([jnp.full_like(labels, null), labels]))
            t = jnp.full((xx.shape[0], num_tokens), k.astype(jnp.float32) / nfe)  # not a constant:
            v, _ = apply(params, xx, t, yy)  # XLA would fold the time embedding of a fixed t
            return x + 1e-3 * v[: x.shape[0]], None

        return jax.lax.scan(body, x, jnp.arange(nfe))[0]

    return loop


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="PF-Tiny/2")
    ap.add_argument("--image-size", type=int, default=16)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--nfe", type=int, default=40)
    ap.add_argument("--cfg-scale", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compile-steps", default="10,50,250")
    ap.add_argument("--samplers", default=",".join(NAMES))
    ap.add_argument("--cpu-time", action=argparse.BooleanOptionalAction, default=True,
                    help="on the CPU backend, time with process CPU time (steady on a shared machine)")
    ap.add_argument("--out", default=None, help="output stem (default benchmarks/results/sampling_<platform>)")
    args = ap.parse_args(argv)

    mcfg, apply, params = make_model(args)
    h, w = mcfg.image_size
    key = jax.random.key(0)
    noise = jax.random.normal(key, (args.batch, h, w, mcfg.in_channels))
    labels = jnp.arange(args.batch, dtype=jnp.int32) % mcfg.num_classes
    null = mcfg.num_classes
    loop = forward_loop(apply, mcfg.num_patches, args.nfe, args.cfg_scale, null)
    fns = {"forward": lambda: loop(params, noise, labels)}
    cfgs = {}
    for name in args.samplers.split(","):
        steps = steps_for_nfe(name, args.nfe, 4)
        cfgs[name] = samplers.SamplerConfig(name=name, steps=steps, cfg_scale=args.cfg_scale,
                                            null_class=null, patch_size=mcfg.patch_size)
        fn = samplers.make_sample_fn(apply, cfgs[name])
        fns[name] = lambda fn=fn: fn(params, noise, labels, key)
    wall, cpu = interleaved_medians(fns, args.repeats)
    # On a CPU shared with other jobs, process CPU time is the steadier measure of work done; run
    # single-threaded (XLA_FLAGS=--xla_cpu_multi_thread_eigen=false) so no thread spins.
    med = cpu if (jax.default_backend() == "cpu" and args.cpu_time) else wall
    fwd = med["forward"] / args.nfe

    rows = []
    for name, cfg in cfgs.items():
        nfe = int(fns[name]()[1]["nfe"])
        compile_s = {}
        for s in [int(v) for v in args.compile_steps.split(",")]:
            f = samplers.make_sample_fn(apply, dataclasses.replace(cfg, steps=s))
            t0 = time.perf_counter()
            f.lower(params, noise, labels, key).compile()
            compile_s[s] = time.perf_counter() - t0
        rows.append(dict(sampler=samplers.sampler_name(cfg), steps=cfg.steps, nfe=nfe, wall_s=wall[name],
                         cpu_s=cpu[name], ms_per_image=1e3 * med[name] / args.batch,
                         wall_ms_per_image=1e3 * wall[name] / args.batch,
                         overhead=med[name] / (nfe * fwd) - 1.0, compile_s=compile_s))
        print(rows[-1], flush=True)

    dev = jax.devices()[0]
    machine = dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                   cpu_count=os.cpu_count(), jax=jax.__version__, backend=jax.default_backend(),
                   device=dev.device_kind)
    setup = dict(preset=args.preset, image_size=args.image_size, channels=mcfg.in_channels,
                 patch_size=mcfg.patch_size, tokens=mcfg.num_patches, dtype=args.dtype, batch=args.batch,
                 nfe=args.nfe, cfg_scale=args.cfg_scale, repeats=args.repeats, forward_ms=1e3 * fwd,
                 clock="process CPU time" if med is cpu else "wall time",
                 xla_flags=os.environ.get("XLA_FLAGS", ""))
    cs = [int(v) for v in args.compile_steps.split(",")]
    lines = [
        f"# Sampling benchmark ({machine['backend']}: {machine['device']})",
        "",
        f"Machine: {machine['platform']}, {machine['processor']}, {machine['cpu_count']} CPUs, "
        f"jax {machine['jax']}.",
        f"Model {args.preset} on {h}x{w}x{mcfg.in_channels} ({mcfg.num_patches} tokens), {args.dtype}, "
        f"batch {args.batch}, cfg {args.cfg_scale}; one forward pass (in a compiled loop): "
        f"{1e3 * fwd:.2f} ms. Clock: {setup['clock']} (XLA_FLAGS='{setup['xla_flags']}'), medians of "
        f"{args.repeats} interleaved runs; wall ms / image for reference.",
        "",
        f"| sampler | steps | NFE | {'CPU' if med is cpu else 'wall'} ms / image | wall ms / image | "
        "overhead vs NFE x forward | "
        + " | ".join(f"compile {s} steps (s)" for s in cs) + " |",
        "|---|---|---|---|---|---|" + "---|" * len(cs),
    ]
    for r in rows:
        lines.append(f"| {r['sampler']} | {r['steps']} | {r['nfe']} | {r['ms_per_image']:.2f} | "
                     f"{r['wall_ms_per_image']:.2f} | "
                     f"{100 * r['overhead']:+.1f}% | " + " | ".join(f"{r['compile_s'][s]:.2f}" for s in cs) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    stem = pathlib.Path(args.out or pathlib.Path(__file__).parent / "results" / f"sampling_{machine['backend']}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps(dict(machine=machine, setup=setup, rows=rows), indent=1))


if __name__ == "__main__":
    main()
