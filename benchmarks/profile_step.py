"""Where one jitted train step spends its time: a jax.profiler trace of a few steps, summed per
XLA operation (fusion, dot, custom call...), with XLA's cost analysis of the whole step.

  python benchmarks/profile_step.py --row=mnist --steps=5 --top=25
  XLA_FLAGS=--xla_cpu_use_thunk_runtime=true python benchmarks/profile_step.py --row=digits

Rows are vs_reference.py's ('digits', 'mnist', 'B', 'XL'). `--hlo=DIR` also writes the optimised
HLO text, to match operation names in the table to their instructions.
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.vs_reference import row_config  # noqa: E402
from patch_forcing import sharding, train  # noqa: E402


def op_times(trace_dir: str) -> tuple[collections.Counter, collections.Counter, float]:
    """Sum of event durations (ms) and counts per event name over all host threads."""
    files = sorted(pathlib.Path(trace_dir).rglob("*.xplane.pb"))
    data = jax.profiler.ProfileData.from_file(str(files[-1]))
    total, count, span = collections.Counter(), collections.Counter(), 0.0
    for plane in data.planes:
        for line in plane.lines:
            for ev in line.events:
                total[ev.name] += ev.duration_ns / 1e6
                count[ev.name] += 1
                if ev.name.startswith("PjitFunction") or ev.name.startswith("jit_step"):
                    span = max(span, ev.duration_ns / 1e6)
    return total, count, span


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--row", default="mnist")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--hlo", default=None, help="directory for the optimised HLO text")
    args = ap.parse_args(argv)
    _, c, mcfg = row_config(args.row, args.batch, args.dtype, dry_run=False)
    mesh = sharding.make_mesh(c.mesh)
    state, graphdef, rest, shardings = train.init_state(c, mesh)
    step = train.jit_train_step(c, graphdef, rest, shardings, mesh)
    b, (h, w) = c.data.batch_size, mcfg.image_size
    rng = np.random.default_rng(0)
    batch = sharding.to_global_batch({"image": rng.standard_normal((b, h, w, mcfg.in_channels)).astype(np.float32),
                                      "label": rng.integers(0, 10, b).astype(np.int32)}, mesh)
    compiled = step.lower(state, batch).compile()
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list) else cost
    if args.hlo:
        pathlib.Path(args.hlo).mkdir(parents=True, exist_ok=True)
        (pathlib.Path(args.hlo) / f"{args.row}_step.hlo.txt").write_text(compiled.as_text())
    for _ in range(3):
        state, m = compiled(state, batch)
    jax.block_until_ready(m)
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, m = compiled(state, batch)
            jax.block_until_ready(m)
        wall = (time.perf_counter() - t0) / args.steps * 1e3
        jax.profiler.stop_trace()
        total, count, _ = op_times(d)
    print(f"{args.row}: {wall:.1f} ms/step wall under the profiler; XLA cost analysis: "
          f"{cost.get('flops', 0) / 1e9:.2f} GFLOP, {cost.get('bytes accessed', 0) / 2**20:.0f} MiB accessed "
          f"-> {cost.get('flops', 0) / wall / 1e6:.1f} GFLOP/s")
    skip = ("ThunkExecutor", "$", "Slinky", "PjitFunction")
    kinds = collections.Counter()
    for name, ms in total.items():
        if not name.startswith(skip):
            kinds[name.rsplit(".", 1)[0]] += ms
    ops = sum(kinds.values())
    print(f"{'ms/step':>9} {'share':>6}  kind of operation (all instances)")
    for kind, ms in kinds.most_common(12):
        print(f"{ms / args.steps:9.2f} {100 * ms / ops:5.1f}%  {kind}")
    print(f"{'ms/step':>9} {'calls/step':>10}  operation")
    for name, ms in total.most_common(args.top):
        print(f"{ms / args.steps:9.2f} {count[name] / args.steps:10.1f}  {name[:110]}")


if __name__ == "__main__":
    main()
