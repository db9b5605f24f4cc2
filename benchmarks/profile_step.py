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
import math
import pathlib
import re
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


def dot_flops(hlo: str) -> dict[str, float]:
    """{name: FLOPs} of every dot in the optimised HLO, under the name the profiler shows: the
    dot itself, or the fusion that calls the computation holding it."""
    shapes = dict(re.findall(r"%([\w.\-]+) = \w+\[([\d,]*)\]", hlo))
    dims = lambda name: [int(v) for v in shapes.get(name, "").split(",") if v]  # noqa: E731
    per_comp, comp = collections.Counter(), None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%([\w.\-]+) .*\{$", line)
        comp = head.group(1) if head else comp
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = \w+\[([\d,]*)\]\S* dot\(%([\w.\-]+), .*"
                     r"lhs_contracting_dims=\{([\d,]*)\}", line)
        if m:
            k = math.prod(dims(m.group(3))[int(d)] for d in m.group(4).split(","))
            per_comp[comp] += 2.0 * math.prod(dims(m.group(1))) * k
            per_comp[m.group(1)] += 2.0 * math.prod(dims(m.group(1))) * k
    out, entry = {}, False
    for line in hlo.splitlines():
        entry = line.startswith("ENTRY") or (entry and not line.startswith("}"))
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (.*)", line)
        if not m:
            continue
        call = re.search(r"calls=%([\w.\-]+)", m.group(2))
        if call and call.group(1) in per_comp:
            out[m.group(1)] = per_comp[call.group(1)]
        elif entry and " dot(" in m.group(2):
            out[m.group(1)] = per_comp[m.group(1)]
    return out


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
    flops = dot_flops(compiled.as_text())
    dot_ms = sum(ms for name, ms in total.items() if name in flops) / args.steps
    dot_gf = sum(flops[name] for name in total if name in flops) / args.steps / 1e9
    print(f"dots: {dot_ms:.1f} ms/step, {dot_gf:.1f} GFLOP -> {dot_gf / dot_ms * 1e3:.1f} GFLOP/s; "
          f"the rest: {sum(kinds.values()) / args.steps - dot_ms:.1f} ms/step")
    print(f"{'ms/step':>9} {'calls/step':>10}  operation")
    for name, ms in total.most_common(args.top):
        gf = f"  {flops[name] / ms * args.steps / 1e6:6.1f} GFLOP/s" if name in flops else ""
        print(f"{ms / args.steps:9.2f} {count[name] / args.steps:10.1f}  {name[:40]}{gf}")


if __name__ == "__main__":
    main()
