"""Train-step benchmark: steady-state step time, images/s, compile time and memory per config.

  python benchmarks/train_step.py                       # digits, mnist, PF-B/2 rows on this machine
  python benchmarks/train_step.py --rows=imagenet:B,imagenet:XL --dtype=bfloat16 --batch=64   # GPU

Medians over --repeats timed steps after --warmup steps; compile time is lowering + compiling the
jitted step once. Memory: XLA's compiled memory analysis (arguments + outputs + temporaries, the
same on every backend) and, where the backend reports it, the device's peak bytes in use.
Writes benchmarks/results/train_step_<platform>.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from configs import digits, imagenet, mnist  # noqa: E402
from benchmarks.machine import cpu_name  # noqa: E402
from patch_forcing import config_lib, sharding, train  # noqa: E402
from patch_forcing.data import pipeline  # noqa: E402

CONFIGS = {"digits": digits.get_config, "mnist": mnist.get_config, "imagenet": imagenet.get_config}


def bench_row(row: str, batch: int | None, dtype: str | None, repeats: int, warmup: int) -> dict:
    name, _, arg = row.partition(":")
    c = CONFIGS[name](arg) if arg else CONFIGS[name]()
    if batch:
        c.data.batch_size = batch
    if dtype:
        c.model.dtype = dtype
    mcfg = config_lib.model_config(c)
    mesh = sharding.make_mesh(c.mesh)
    state, graphdef, rest, shardings = train.init_state(c, mesh)
    step = train.jit_train_step(c, graphdef, rest, shardings, mesh)
    h, w = mcfg.image_size
    rng = np.random.default_rng(0)
    b = c.data.batch_size
    batch_np = {"image": rng.standard_normal((b, h, w, mcfg.in_channels)).astype(np.float32),
                "label": rng.integers(0, mcfg.num_classes, b).astype(np.int32)}

    gbatch = sharding.to_global_batch(batch_np, mesh)
    t0 = time.perf_counter()
    compiled = step.lower(state, gbatch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    xla_bytes = None
    if mem is not None:
        xla_bytes = sum(getattr(mem, f, 0) or 0 for f in (
            "argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")) - (
            getattr(mem, "alias_size_in_bytes", 0) or 0)
    for _ in range(warmup):
        state, _ = compiled(state, gbatch)
    jax.block_until_ready(state)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state, m = compiled(state, gbatch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    stats = jax.devices()[0].memory_stats() or {}
    med = statistics.median(times)
    return {
        "config": row, "model": c.model.preset, "params_M": round(sum(
            x.size for x in jax.tree.leaves(state["params"])) / 1e6, 3),
        "image": f"{h}x{w}x{mcfg.in_channels}", "batch": b, "dtype": mcfg.dtype,
        "step_ms_median": round(med * 1e3, 2), "images_per_s": round(b / med, 1),
        "compile_s": round(compile_s, 2),
        "xla_memory_MiB": None if xla_bytes is None else round(xla_bytes / 2**20, 1),
        "peak_device_MiB": round(stats["peak_bytes_in_use"] / 2**20, 1) if "peak_bytes_in_use" in stats else None,
        "repeats": repeats,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="digits,mnist,imagenet:B")
    ap.add_argument("--batch", type=int, default=None, help="override every row's global batch")
    ap.add_argument("--imagenet_batch", type=int, default=4, help="PF-B/2 batch on CPU (XLA:CPU is slow)")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = ap.parse_args()
    rows = []
    for row in args.rows.split(","):
        batch = args.batch or (args.imagenet_batch if row.startswith("imagenet") else None)
        rows.append(bench_row(row, batch, args.dtype, args.repeats, args.warmup))
        print(rows[-1], flush=True)
    dev = jax.devices()[0]
    machine = (f"{dev.platform} {getattr(dev, 'device_kind', '')} x{jax.device_count()}, {cpu_name()}, "
               f"{os.cpu_count()} CPUs, jax {jax.__version__}")
    cols = list(rows[0])
    md = [f"# Train-step benchmark\n\nMachine: {machine}. Medians of {args.repeats} steps after "
          f"{args.warmup} warm-up steps.\n", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    text = "\n".join(md) + "\n"
    print(text)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"train_step_{dev.platform}.md").write_text(text)
    (out / f"train_step_{dev.platform}.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
