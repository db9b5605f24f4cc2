"""Ours against the authors' PyTorch code, side by side in one process: train steps, sampling,
and the latent loader.

  python benchmarks/vs_reference.py                       # CPU: digits and MNIST rows, sampling, loader
  python benchmarks/vs_reference.py --device=gpu          # PF-B/2 b64, PF-XL/2 b32 (+ largest), bf16
  python benchmarks/vs_reference.py --dry-run --out=/tmp/x   # tiny model, 2 steps, both sides

Train rows: the same model shape, batch, LTG patch times, flow + 0.01 NLL loss, AdamW, clip 1.0 and
EMA. Ours is `train.init_state` + `train.jit_train_step`, exactly as train.py runs it; the
reference is `LatentPatchForcingTrainer.forward` + backward + clip_grad_norm_ + AdamW + update_ema,
as the authors' train.py loop runs it (benchmarks/reference.py says where the code comes from and
which stand-ins it needed). The two sides alternate step by step, so load from other processes
slows both alike; the report states the machine's load average. Sampling rows run our samplers and
the reference's integrators.py on the same weights at equal NFE. Writes
benchmarks/results/vs_reference_<device>.md/.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import statistics
import sys
import tempfile
import threading
import time
import types

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
if "--threads=1" in sys.argv:  # before JAX starts: XLA:CPU without its intra-op thread pool
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import reference as reference_lib  # noqa: E402
from benchmarks.machine import cpu_name  # noqa: E402
from configs import digits, imagenet, mnist  # noqa: E402
from patch_forcing import config_lib, sharding, train  # noqa: E402
from patch_forcing.flow import samplers  # noqa: E402
from patch_forcing.models import dit  # noqa: E402

PEAK_BF16_TFLOPS = {"H200": 790.0, "H100": 790.0}  # measured dense bf16 matmul (issue 11)
SAMPLERS = ("euler_pf", "dual_loop", "look_ahead")
CLOCK = {"cpu": False}  # process CPU time instead of wall time (single-threaded runs, --threads=1)


# ----------------------------------------------------------------------------- rows
def row_config(name: str, batch: int | None, dtype: str, dry_run: bool):
    """(label, config) for 'digits', 'mnist', 'B', 'XL' (ImageNet-256 latents)."""
    if name in ("digits", "mnist"):
        c = (digits if name == "digits" else mnist).get_config()
    else:
        c = imagenet.get_config(name)
    if dry_run:
        c.model.hidden_size, c.model.depth, c.model.num_heads = 32, 1, 2
        c.data.batch_size = 4
    if batch:
        c.data.batch_size = batch
    c.model.dtype = dtype
    if dtype != "float32" and jax.default_backend() == "gpu":
        c.model.attention_impl = "cudnn"  # flash attention, as SDPA on the reference side
    c.mesh.data = 1  # one device: the reference side runs on one too
    c.optim.warmup_steps = 0
    mcfg = config_lib.model_config(c)
    (h, w), p = mcfg.image_size, mcfg.patch_size
    label = (f"{c.model.preset if name in ('B', 'XL') else name}: {h}x{w}x{mcfg.in_channels}, patch {p}, "
             f"d{mcfg.hidden_size}, depth {mcfg.depth}, batch {c.data.batch_size}")
    return label, c, mcfg


def model_flops(mcfg, batch: int) -> float:
    """Training FLOPs of one step: 6 x matmul params x tokens + attention (QK^T, AV) x 3."""
    n, d = mcfg.num_patches, mcfg.hidden_size
    params = dit.param_count(mcfg) - (mcfg.num_classes + 1) * d  # the class table is a lookup
    return 6.0 * params * batch * n + 3 * 4.0 * batch * n * n * d * mcfg.depth


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every millisecond (CPU backends)."""

    def __enter__(self):
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._watch, daemon=True)
        self._t.start()
        return self

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _watch(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.mib = (max(self.peak, self._rss()) - self.base) / 2**20


# ----------------------------------------------------------------------------- our side
def ours_train(c, mcfg, batch_np):
    mesh = sharding.make_mesh(c.mesh)
    state, graphdef, rest, shardings = train.init_state(c, mesh)
    step = train.jit_train_step(c, graphdef, rest, shardings, mesh)
    gbatch = sharding.to_global_batch(batch_np, mesh)
    t0 = time.perf_counter()
    compiled = step.lower(state, gbatch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    mib = None if mem is None else (sum(getattr(mem, f"{k}_size_in_bytes", 0) or 0 for k in (
        "argument", "output", "temp")) - (getattr(mem, "alias_size_in_bytes", 0) or 0)) / 2**20
    box = {"state": state}

    def run():
        box["state"], m = compiled(box["state"], gbatch)
        jax.block_until_ready(m)

    return run, compile_s, mib


# ----------------------------------------------------------------------------- reference side
def reference_train(ref, c, mcfg, batch_np, device: str, dtype: str):
    """The authors' training step on `device`; with the fallback, our torch DiT and loss."""
    import torch

    dev = torch.device("cuda" if device == "gpu" else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as the authors' train.py
    h, w = mcfg.image_size
    x1 = torch.from_numpy(batch_np["image"]).permute(0, 3, 1, 2).contiguous().to(dev)
    y = torch.from_numpy(batch_np["label"]).long().to(dev)
    kw = dict(patch_size=mcfg.patch_size, in_channels=mcfg.in_channels, hidden_size=mcfg.hidden_size,
              depth=mcfg.depth, num_heads=mcfg.num_heads, mlp_ratio=mcfg.mlp_ratio,
              num_classes=mcfg.num_classes)
    if ref.kind == "reference":
        model = ref.model(input_size=h, class_dropout_prob=c.loss.label_dropout,
                          compile=device == "gpu", **kw).to(dev)
        ema = copy.deepcopy(model).eval().requires_grad_(False)
        module = types.SimpleNamespace(model=model, flow=ref.flow(mcfg.patch_size),
                                       uncertainty_weight=c.loss.nll_weight, encode=lambda x: x)
        model.train()

        def loss_fn():
            return ref.train_forward(module, {"image": x1, "latent": x1, "label": y})[0]

        def ema_fn():
            ref.update_ema(ema, model, decay=c.ema.decay)
    else:
        model = ref.model(image_size=h, **kw).to(dev)
        ema = copy.deepcopy(model).requires_grad_(False)

        def loss_fn():  # our own torch version of the same step (tests/models/torch_dit.py)
            b, n = x1.shape[0], mcfg.num_patches
            t_bar = torch.sigmoid(0.7 + torch.randn(b, device=dev))
            t = (t_bar[:, None] - torch.randn(b, n, device=dev).abs() * torch.minimum(
                t_bar / 2, torch.full_like(t_bar, 0.6))[:, None])
            t = torch.where(t < 0, torch.rand_like(t) * t_bar[:, None], t)
            x0 = torch.randn_like(x1)
            gh, gw, p = h // mcfg.patch_size, w // mcfg.patch_size, mcfg.patch_size
            tp = t.view(b, 1, gh, 1, gw, 1).expand(b, 1, gh, p, gw, p).reshape(b, 1, h, w)
            xt, u = tp * x1 + (1 - tp) * x0, x1 - x0
            yy = torch.where(torch.rand(b, device=dev) < c.loss.label_dropout, mcfg.num_classes, y)
            v, s = model(xt, t, yy)
            s = s.clamp(-30, 20)
            nll = 0.5 * (1.8378770664093453 + s + (u - v.detach()) ** 2 * torch.exp(-s))
            return (v - u).square().mean() + c.loss.nll_weight * nll.mean()

        @torch.no_grad()
        def ema_fn():
            for e, q in zip(ema.parameters(), model.parameters()):
                e.mul_(c.ema.decay).add_(q, alpha=1 - c.ema.decay)

    o = c.optim
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=o.lr,
                            betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def run():
        with autocast:
            loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        opt.zero_grad()
        ema_fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    return run


# ----------------------------------------------------------------------------- timing
def interleaved(fns: dict, warmup: int, repeats: int, device: str) -> dict:
    """Per side: first-step seconds, step-time median/min over `repeats` alternating steps, and
    the peak memory of one warm step (device bytes on GPU, resident-set growth on CPU)."""
    import torch

    out = {k: {} for k in fns}
    for k, fn in reversed(fns.items()):  # the reference's first step on a heap ours has not grown
        if device == "gpu":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with PeakRSS() as mem:  # the first step allocates gradients and optimizer moments too
            fn()
        out[k]["first_step_s"] = time.perf_counter() - t0
        out[k]["first_step_rss_MiB"] = round(mem.mib, 1)
        if device == "gpu":
            out[k]["cuda_peak_MiB"] = torch.cuda.max_memory_allocated() / 2**20
        for _ in range(max(warmup - 1, 0)):
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[k].append(time.process_time() - c0 if CLOCK["cpu"] else time.perf_counter() - t0)
    for k in fns:
        out[k]["median_s"] = statistics.median(times[k])
        out[k]["min_s"] = min(times[k])
    return out


def load_avg() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def bench_train(ref, name: str, args, batch: int | None = None) -> dict:
    label, c, mcfg = row_config(name, batch or args.batch.get(name), args.dtype, args.dry_run)
    b, (h, w) = c.data.batch_size, mcfg.image_size
    rng = np.random.default_rng(0)
    batch_np = {"image": rng.standard_normal((b, h, w, mcfg.in_channels)).astype(np.float32),
                "label": rng.integers(0, mcfg.num_classes, b).astype(np.int32)}
    load_before = load_avg()
    ours, compile_s, ours_mib = ours_train(c, mcfg, batch_np)
    ref_run = reference_train(ref, c, mcfg, batch_np, args.device, args.dtype)
    r = interleaved({"ours": ours, "ref": ref_run}, args.warmup, args.repeats, args.device)
    row = dict(row=label, batch=b, dtype=mcfg.dtype, repeats=args.repeats, load_avg=f"{load_before} -> {load_avg()}",
               ours_ms=1e3 * r["ours"]["median_s"], ref_ms=1e3 * r["ref"]["median_s"],
               ours_min_ms=1e3 * r["ours"]["min_s"], ref_min_ms=1e3 * r["ref"]["min_s"],
               ours_img_s=b / r["ours"]["median_s"], ref_img_s=b / r["ref"]["median_s"],
               ratio=r["ours"]["median_s"] / r["ref"]["median_s"], ours_compile_s=compile_s,
               ours_first_step_s=r["ours"]["first_step_s"], ref_first_step_s=r["ref"]["first_step_s"])
    row["ours_peak_MiB"] = ours_mib  # XLA's buffer assignment: state + batch + temporaries
    if args.device == "gpu":
        row["ref_peak_MiB"] = r["ref"]["cuda_peak_MiB"]  # torch.cuda.max_memory_allocated
        flops = model_flops(mcfg, b)
        peak = PEAK_BF16_TFLOPS.get(args.gpu_kind, 790.0) * 1e12
        row["ours_mfu"] = flops / r["ours"]["median_s"] / peak
        row["ref_mfu"] = flops / r["ref"]["median_s"] / peak
    else:
        row["ref_peak_MiB"] = r["ref"]["first_step_rss_MiB"]  # resident-set growth in its first step
    print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return row


# ----------------------------------------------------------------------------- sampling
def random_weights(mcfg, seed: int = 0) -> dict:
    """Non-zero random reference-layout weights (a fresh DiT outputs zeros: adaLN-Zero)."""
    from patch_forcing.tools import convert

    rng = np.random.default_rng(seed)
    sd = {}
    for key, shape in convert._torch_shapes(mcfg).items():
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        sd[key] = (rng.standard_normal(shape) * (0.5 / np.sqrt(fan_in) if fan_in > 1 else 0.02)
                   ).astype(np.float32)
    sd["pos_embed"] = dit.sincos_pos_embed(mcfg.hidden_size, *mcfg.grid)[None].astype(np.float32)
    return sd


def bench_sampling(ref, args) -> list[dict]:
    import torch
    from benchmarks.sampling import steps_for_nfe
    from patch_forcing.tools import convert

    mcfg = dit.preset(args.sample_preset, image_size=args.sample_size, dtype=args.dtype,
                      **({"hidden_size": 32, "depth": 1, "num_heads": 2} if args.dry_run else {}))
    sd = random_weights(mcfg)
    apply, params = dit.from_params(mcfg, convert.torch_to_params(sd, mcfg))
    h, w = mcfg.image_size
    b, null = args.sample_batch, mcfg.num_classes
    noise = np.random.default_rng(1).standard_normal((b, h, w, mcfg.in_channels)).astype(np.float32)
    labels = np.arange(b, dtype=np.int32) % mcfg.num_classes
    key = jax.random.key(0)
    dev = torch.device("cuda" if args.device == "gpu" else "cpu")
    tmodel = None
    if ref.samplers:
        tmodel = ref.model(input_size=h, patch_size=mcfg.patch_size, in_channels=mcfg.in_channels,
                           hidden_size=mcfg.hidden_size, depth=mcfg.depth, num_heads=mcfg.num_heads,
                           num_classes=mcfg.num_classes, compile=args.device == "gpu").to(dev).eval()
        tmodel.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    tx = torch.from_numpy(noise).permute(0, 3, 1, 2).contiguous().to(dev)
    ty, tnull = torch.from_numpy(labels).long().to(dev), torch.full((b,), null, dtype=torch.long, device=dev)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    rows = []
    nfe = 4 if args.dry_run else args.nfe
    for cfg_scale in (1.0, 4.0):
        for name in SAMPLERS:
            steps = steps_for_nfe(name, nfe, 4)
            scfg = samplers.SamplerConfig(name=name, steps=steps, cfg_scale=cfg_scale, null_class=null,
                                          patch_size=mcfg.patch_size)
            fn = samplers.make_sample_fn(apply, scfg)
            x_j, y_j = jnp.asarray(noise), jnp.asarray(labels)
            fns = {"ours": lambda: jax.block_until_ready(fn(params, x_j, y_j, key))}
            if tmodel is not None:
                kwargs = {"euler_pf": {}, "dual_loop": dict(p=scfg.q, n_inner=scfg.n_inner),
                          "look_ahead": dict(p=scfg.q, context_t_ratio=scfg.ratio)}[name]
                sampler = ref.samplers[name](patch_size=mcfg.patch_size, **kwargs)
                ts = torch.linspace(0, 1, steps + 1, device=dev)

                def run_ref(sampler=sampler, ts=ts):
                    with torch.no_grad(), autocast:
                        sampler(tmodel, tx, timesteps=ts, progress=False, y=ty, uc_cond=tnull,
                                cond_key="y", cfg_scale=cfg_scale)
                    if dev.type == "cuda":
                        torch.cuda.synchronize()

                fns["ref"] = run_ref
            r = interleaved(fns, 1, args.sample_repeats, args.device)
            got_nfe = int(fn(params, x_j, y_j, key)[1]["nfe"])
            row = dict(sampler=samplers.sampler_name(scfg), steps=steps, nfe=got_nfe, cfg=cfg_scale, batch=b,
                       ours_ms_per_image=1e3 * r["ours"]["median_s"] / b, load_avg=load_avg())
            if "ref" in r:
                row["ref_ms_per_image"] = 1e3 * r["ref"]["median_s"] / b
                row["ratio"] = r["ours"]["median_s"] / r["ref"]["median_s"]
            rows.append(row)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return rows


# ----------------------------------------------------------------------------- input pipeline
def bench_loader(args) -> list[dict]:
    """images/s of the latent loader (train iterator) at batch 256 with 0 and N grain workers, on
    synthetic ImageNet-shaped (32x32x4, flip pairs, float16) latents written to a temp dir."""
    from configs import common  # noqa: F401  (the config blocks the pipeline reads)
    from patch_forcing.data import latents, pipeline

    n, shape = (64, (2, 4, 4, 4)) if args.dry_run else (4096, (2, 32, 32, 4))
    batch = 8 if args.dry_run else 256
    rows = []
    with tempfile.TemporaryDirectory() as d:
        writer = latents.ShardWriter(d, latents.shard_name(0, 1))
        rng = np.random.default_rng(0)
        for i in range(n):
            writer.write(rng.standard_normal(shape).astype(np.float16), label=i % 1000, index=i)
        latents.write_metadata(d, dict(
            format_version=latents.FORMAT_VERSION, num_examples=n, num_shards=1, shard_size=n,
            latent_shape=list(shape[1:]), record_shape=list(shape), dtype="float16", mode="mean",
            flips=True, classes=[str(k) for k in range(1000)], shards=[writer.commit()]))
        c = imagenet.get_config("B")
        c.data.data_dir, c.data.batch_size, c.data.image_size = d, batch, shape[1:3]
        for workers in (0, args.loader_workers):
            c.data.num_workers = workers
            it = pipeline.make_train_iterator(c.data, seed=0)
            next(it)
            num = 3 if args.dry_run else 20
            t0 = time.perf_counter()
            for _ in range(num):
                next(it)
            dt = time.perf_counter() - t0
            rows.append(dict(workers=workers, batch=batch, images_per_s=num * batch / dt, load_avg=load_avg()))
            print(rows[-1], flush=True)
            del it
    return rows


# ----------------------------------------------------------------------------- report
def machine_info(args, ref) -> dict:
    import torch

    dev = jax.devices()[0]
    return dict(device=f"{dev.platform} {getattr(dev, 'device_kind', '')}", cpu=cpu_name(), cpus=os.cpu_count(),
                jax=jax.__version__, torch=torch.__version__, torch_threads=torch.get_num_threads(),
                xla_flags=os.environ.get("XLA_FLAGS", ""), reference=ref.description, dtype=args.dtype,
                gpu=torch.cuda.get_device_name() if args.device == "gpu" else None,
                clock=("process CPU time, one thread per side" if CLOCK["cpu"] else
                       f"wall time, {args.threads} threads per side"))


def fmt(v, nd=2):
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def markdown(info, train_rows, sample_rows, loader_rows, args) -> str:
    gpu = args.device == "gpu"
    out = [f"# Ours vs the authors' PyTorch code ({info['device']})", "",
           f"Machine: {info['cpu']}, {info['cpus']} CPUs{', ' + info['gpu'] if gpu else ''}; jax {info['jax']}, "
           f"torch {info['torch']} ({info['torch_threads']} threads); XLA_FLAGS='{info['xla_flags']}'.",
           f"Reference side: {info['reference']}.",
           f"Compute dtype {info['dtype']} (params float32). Median over {args.repeats} steps after {args.warmup} "
           "warm-up steps, the two sides alternating step by step; load average (1, 5, 15 min) before -> after. "
           f"Clock: {info['clock']}.", "",
           "## Train step", "",
           "| row | ours ms | ref ms | ours / ref | ours img/s | ref img/s | ours compile s | ref first step s "
           f"| ours memory MiB (XLA) | ref memory MiB ({'CUDA peak' if gpu else 'RSS growth, first step'}) |"
           + (" ours MFU | ref MFU |" if gpu else "") + " load |",
           "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if gpu else "") + "---|"]
    for r in train_rows:
        out.append(f"| {r['row']} | {fmt(r['ours_ms'], 1)} | {fmt(r['ref_ms'], 1)} | **{fmt(r['ratio'])}** | "
                   f"{fmt(r['ours_img_s'], 0)} | {fmt(r['ref_img_s'], 0)} | {fmt(r['ours_compile_s'])} | "
                   f"{fmt(r['ref_first_step_s'])} | {fmt(r['ours_peak_MiB'], 0)} | {fmt(r['ref_peak_MiB'], 0)} | "
                   + (f"{100 * r['ours_mfu']:.1f}% | {100 * r['ref_mfu']:.1f}% | " if gpu else "")
                   + f"{r['load_avg']} |")
    if sample_rows:
        out += ["", f"## Sampling ({args.sample_preset}, {args.sample_size}x{args.sample_size}x4, batch {args.sample_batch}, "
                "same weights; ms per image, median of "
                f"{args.sample_repeats} alternating runs)", "",
                "| sampler | NFE | cfg | ours ms/img | ref ms/img | ours / ref | load |", "|---|---|---|---|---|---|---|"]
        for r in sample_rows:
            out.append(f"| {r['sampler']} | {r['nfe']} | {r['cfg']:g} | {fmt(r['ours_ms_per_image'])} | "
                       f"{fmt(r.get('ref_ms_per_image'))} | **{fmt(r.get('ratio'))}** | {r['load_avg']} |")
    if loader_rows:
        out += ["", "## Latent loader (synthetic 32x32x4 float16 flip pairs, train iterator)", "",
                "| grain workers | batch | images/s | load |", "|---|---|---|---|"]
        out += [f"| {r['workers']} | {r['batch']} | {r['images_per_s']:.0f} | {r['load_avg']} |" for r in loader_rows]
    return "\n".join(out) + "\n"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--rows", default=None, help="default: digits,mnist on CPU; B,XL on GPU")
    ap.add_argument("--batch", default="", help="per-row batch overrides, e.g. B=64,XL=32")
    ap.add_argument("--dtype", default=None, help="default float32 on CPU, bfloat16 on GPU")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--sampling", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--sample-preset", default=None, help="default PF-Tiny/2 on CPU, PF-B/2 on GPU")
    ap.add_argument("--sample-size", type=int, default=None, help="default 16 on CPU, 32 on GPU")
    ap.add_argument("--sample-batch", type=int, default=None, help="default 16 on CPU, 64 on GPU")
    ap.add_argument("--sample-repeats", type=int, default=5)
    ap.add_argument("--nfe", type=int, default=50)
    ap.add_argument("--loader", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--loader-workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="CPU threads of both sides; 1 times with process CPU time, steady on a shared machine")
    ap.add_argument("--largest", default=None, help="e.g. XL:256/128/64: also the largest batch that fits")
    ap.add_argument("--time-budget", type=float, default=300.0, help="seconds after which --largest is skipped")
    ap.add_argument("--gpu-kind", default="H200")
    ap.add_argument("--reference-git", default=None)
    ap.add_argument("--dry-run", action="store_true", help="tiny models, 2 steps: checks the script runs")
    ap.add_argument("--out", default=None, help="output stem (default benchmarks/results/vs_reference_<device>)")
    args = ap.parse_args(argv)
    gpu = args.device == "gpu"
    default_rows = "digits" if args.dry_run else ("B,XL" if gpu else "digits,mnist")
    args.rows = [r for r in (args.rows or default_rows).split(",") if r not in ("", "none")]
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.sample_preset = args.sample_preset or ("PF-B/2" if gpu else "PF-Tiny/2")
    args.sample_size = args.sample_size or (32 if gpu else 16)
    args.sample_batch = args.sample_batch or (64 if gpu else 16)
    args.batch = {k: int(v) for k, v in (kv.split("=") for kv in args.batch.split(",") if kv)}
    if args.dry_run:
        args.repeats, args.warmup, args.sample_repeats = 2, 1, 1
    return args


def main(argv=None):
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)  # XLA:CPU's pool has os.cpu_count() threads, or none
    CLOCK["cpu"] = args.device == "cpu" and args.threads == 1
    torch.manual_seed(0)
    ref = reference_lib.load(args.reference_git)
    print(f"reference side: {ref.description}", flush=True)
    t_start = time.time()
    train_rows = [bench_train(ref, name, args) for name in args.rows]
    if args.largest:  # the largest batch that fits, tried from the top while time allows
        name, _, sizes = args.largest.partition(":")
        for b in (int(v) for v in sizes.split("/")):
            if time.time() - t_start > args.time_budget:
                print(f"largest batch: skipped, {args.time_budget}s budget spent", flush=True)
                break
            try:
                train_rows.append(bench_train(ref, name, args, batch=b))
                break
            except Exception as e:  # noqa: BLE001 - XLA's RESOURCE_EXHAUSTED or torch's OOM
                if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                    raise
                print(f"{name} batch {b}: out of memory ({str(e).splitlines()[0][:120]})", flush=True)
                import gc

                gc.collect()
                torch.cuda.empty_cache() if torch.cuda.is_available() else None
    sample_rows = bench_sampling(ref, args) if args.sampling else []
    loader_rows = bench_loader(args) if args.loader else []
    info = machine_info(args, ref)
    text = markdown(info, train_rows, sample_rows, loader_rows, args)
    print(text)
    stem = pathlib.Path(args.out or pathlib.Path(__file__).parent / "results" / f"vs_reference_{args.device}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps(
        dict(machine=info, train=train_rows, sampling=sample_rows, loader=loader_rows,
             args={k: v for k, v in vars(args).items()}), indent=1, default=str))
    return dict(train=train_rows, sampling=sample_rows, loader=loader_rows, machine=info)


if __name__ == "__main__":
    main()
