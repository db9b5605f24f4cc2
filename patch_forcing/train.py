"""Training: one pure train step, jitted once and sharded over the (data, fsdp) mesh, and the loop.

Read top to bottom: optimizer, state, update step, periodic evaluation, loop. The state is a plain
pytree {'step', 'params', 'opt_state', 'ema', 'rng'} (params and EMA are nnx.State of the DiT's
nnx.Param variables). The step RNG is fold_in(rng, step), so a resumed run draws exactly the
numbers an uninterrupted one would. SIGTERM/SIGINT (or JAX's multi-host preemption notice) save
the current step and stop with `Preempted`; resuming from it is bit-identical too.
"""

from __future__ import annotations

import functools
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from patch_forcing import UserError
from patch_forcing import checkpoint as ckpt_lib
from patch_forcing import conditioning as cond_lib
from patch_forcing import config_lib, pictures, repa, sharding
from patch_forcing.data import pipeline
from patch_forcing.evaluation import fid
from patch_forcing.flow import interpolant, samplers
from patch_forcing.flow import loss as loss_lib
from patch_forcing.metric_writer import MetricWriter
from patch_forcing.models import decoders


# ----------------------------------------------------------------------------- model and optimizer
def make_optimizer(optim_cfg):
    """AdamW with linear warm-up to `lr`, then constant; global-norm clipping first."""
    warmup = int(optim_cfg.warmup_steps)
    lr = float(optim_cfg.lr)
    if warmup > 0:
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
    else:
        schedule = optax.constant_schedule(lr)
    tx = optax.chain(
        optax.clip_by_global_norm(float(optim_cfg.grad_clip)),
        optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                    weight_decay=float(optim_cfg.weight_decay)),
    )
    return tx, schedule


def param_shardings(abstract_params, mesh, fsdp: bool):
    """NamedShardings from the model's logical annotations ('embed' -> 'fsdp' under FSDP)."""
    rules = dict(sharding.logical_axis_rules(fsdp))
    specs = nnx.get_partition_spec(abstract_params)

    def to_mesh(spec):
        spec = spec if isinstance(spec, P) else P()
        return NamedSharding(mesh, P(*(rules.get(a) if a is not None else None for a in spec)))

    return jax.tree.map(to_mesh, specs, is_leaf=lambda x: isinstance(x, P))


# ----------------------------------------------------------------------------- state
def init_state(config, mesh):
    """A sharded train state, the graphdef, the fixed rest, and the state's shardings."""
    mcfg, family = config_lib.model_config(config), config_lib.model_family(config)
    tx, _ = make_optimizer(config.optim)
    key = jax.random.key(config.seed)
    graphdef, abstract_params, _ = nnx.eval_shape(lambda: family.init(mcfg, key))
    shard = param_shardings(abstract_params, mesh, fsdp=mesh.shape[sharding.FSDP] > 1)
    replicated = NamedSharding(mesh, P())

    def init(key):
        _, params, rest = family.init(mcfg, key)
        params = jax.lax.with_sharding_constraint(params, shard)
        state = {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "opt_state": tx.init(params),
            "ema": jax.tree.map(jnp.copy, params),  # EMA starts equal to the model
            "rng": jax.random.key_data(jax.random.fold_in(key, 1)),
        }
        return state, rest

    state_shape, _ = jax.eval_shape(init, key)
    # Optimizer moments follow their parameters; counts and scalars are replicated.
    opt_shard = optax.tree_map_params(
        tx, lambda _, sh: sh, state_shape["opt_state"], shard,
        transform_non_params=lambda _: replicated)
    shardings = {"step": replicated, "params": shard, "opt_state": opt_shard, "ema": shard, "rng": replicated}
    state, rest = jax.jit(init, out_shardings=(shardings, replicated))(key)
    return state, graphdef, rest, shardings


# ----------------------------------------------------------------------------- update step
def make_train_step(config, graphdef, rest, encoder: repa.TargetEncoder | None = None):
    """step(state, batch) -> (state, metrics), pure; jit it with the state's shardings. The
    conditioning (config_lib.conditioning) reads the batch's labels or text.

    With REPA aligning (config.repa.encoder_depth > 0, coeff > 0) it is step(state, batch,
    encoder_params): the frozen `encoder` (repa.target_encoder) reads the batch's clean images and
    the loss gains coeff * alignment_loss(z, f), logged as 'repa_loss'. With coeff = 0 no encoder
    runs and the step is the plain model's (the projector gets zero gradients).
    """
    mcfg = config_lib.model_config(config)
    cond = config_lib.conditioning(config)
    tx, schedule = make_optimizer(config.optim)
    sample_t = config_lib.timestep_sampler(config)
    align = config_lib.repa_aligns(config)
    if align and encoder is None:
        raise ValueError("config.repa aligns (encoder_depth > 0, coeff > 0): pass encoder=repa.target_encoder(...)")
    coeff = float(config.repa.coeff) if align else 0.0
    family = config_lib.model_family(config)
    apply = family.make_apply(graphdef, rest, return_z=True) if align else family.make_apply(graphdef, rest)
    p, n = mcfg.patch_size, mcfg.num_patches
    nll_weight, decay = config.loss.nll_weight, config.ema.decay

    def step(state, batch, encoder_params=None):
        x1 = batch["image"].astype(jnp.float32)
        y = cond.from_batch(batch)
        b = x1.shape[0]
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        k_t, k_noise, k_drop = jax.random.split(rng, 3)
        t = sample_t(k_t, b, n)  # (B, N)
        if not mcfg.per_patch:
            t = t[:, 0]  # global samplers give equal patch times
        x0 = jax.random.normal(k_noise, x1.shape, jnp.float32)
        xt = interpolant.interpolate(x0, x1, t, p)
        u = interpolant.target(x0, x1)
        y = cond_lib.drop(k_drop, y, cond.null, cond.dropout)  # CFG label / caption dropout
        if align:  # REPA target: the frozen encoder on the clean images, whatever the patch times
            f = jax.lax.stop_gradient(encoder.features(encoder_params, repa.encoder_images(batch)))  # (B, N, z)

        def loss_fn(params):
            if not align:
                v, s = apply(params, xt, t, y)
                return loss_lib.patch_forcing_loss(v, s, u, nll_weight)
            v, s, z = apply(params, xt, t, y)
            loss, metrics = loss_lib.patch_forcing_loss(v, s, u, nll_weight)
            repa_loss = loss_lib.alignment_loss(z, f)
            loss = loss + coeff * repa_loss
            return loss, {**metrics, "repa_loss": repa_loss, "loss": loss}

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        ema = jax.tree.map(lambda e, q: decay * e + (1.0 - decay) * q, state["ema"], params)
        metrics = {**metrics, "grad_norm": optax.global_norm(grads), "lr": schedule(state["step"])}
        new_state = {**state, "step": state["step"] + 1, "params": params, "opt_state": opt_state, "ema": ema}
        return new_state, metrics

    return step


def jit_train_step(config, graphdef, rest, shardings, mesh, encoder: repa.TargetEncoder | None = None):
    """jit(step)(state, batch) over `mesh`; a REPA encoder's params are replicated, placed once."""
    batch_shard, replicated = sharding.batch_sharding(mesh), NamedSharding(mesh, P())
    step = make_train_step(config, graphdef, rest, encoder)
    if not config_lib.repa_aligns(config):
        return jax.jit(step, in_shardings=(shardings, batch_shard), out_shardings=(shardings, replicated),
                       donate_argnums=0)
    jitted = jax.jit(step, in_shardings=(shardings, batch_shard, replicated),
                     out_shardings=(shardings, replicated), donate_argnums=0)
    encoder_params = jax.device_put(encoder.params, replicated)
    return lambda state, batch: jitted(state, batch, encoder_params)


# ----------------------------------------------------------------------------- periodic evaluation
def first_non_finite(history: list[tuple[int, Any]]) -> tuple[int, float] | None:
    """The first (step, value) whose loss or grad norm is NaN/inf, from fetched metrics."""
    for step, m in history:
        for key in ("loss", "grad_norm"):
            v = float(m[key])
            if not np.isfinite(v):
                return step, v
    return None


class Evaluator:
    """What the loop does every few steps on the EMA params, with data and noise fixed at setup:
    the 8-segment validation loss, sample grids with difficulty maps, and the optional FID."""

    def __init__(self, config, workdir, graphdef, rest, mesh):
        self.config, self.workdir = config, epath.Path(workdir)
        self.mcfg = mcfg = config_lib.model_config(config)
        self.cond = cond = config_lib.conditioning(config)
        apply = config_lib.model_family(config).make_apply(graphdef, rest)
        self.val_fn = jax.jit(lambda params, x1, x0, batch: loss_lib.validation_loss(
            functools.partial(apply, params), x1, x0, cond.from_batch(batch), mcfg.patch_size,
            per_patch=mcfg.per_patch))
        scfg = config_lib.sampler_config(config, mcfg, cond)
        self.sampler_name = samplers.sampler_name(scfg)
        self.sample_fn = samplers.make_sample_fn(apply, scfg, return_trajectory=True)
        self.key = jax.random.key(config.seed + 1)
        self.val_batches = list(pipeline.make_eval_batches(
            config.data, config.data.split_eval, num_examples=config.log.num_eval_examples))
        ns, (h, w) = config.log.num_samples, mcfg.image_size
        self.noise = jax.random.normal(jax.random.fold_in(self.key, 0), (ns, h, w, mcfg.in_channels))
        self.labels = cond_lib.grid_conditioning(cond, ns, getattr(mcfg, "num_classes", 0), self.val_batches)
        self.decode = _sample_decoder(config, mcfg)
        self.fid_hook = None
        if config.eval.fid_every_steps > 0:  # the --mode=evaluate measurement, next to val loss
            self.fid_hook = fid.make_fid_hook(config, str(workdir), apply, mesh)

    def val_loss(self, ema) -> dict:
        seg_sum, count = 0.0, 0
        for i, vb in enumerate(self.val_batches):
            x1 = jnp.asarray(vb["image"])
            x0 = jax.random.normal(jax.random.fold_in(self.key, 1000 + i), x1.shape)
            _, seg = self.val_fn(ema, x1, x0, {k: v for k, v in vb.items() if k != "image"})
            seg_sum, count = seg_sum + np.asarray(seg) * len(x1), count + len(x1)
        seg = seg_sum / count
        return {"val_loss": float(seg.mean()), **{f"val_loss/t{k}": float(v) for k, v in enumerate(seg)}}

    def sample_pictures(self, step: int, ema) -> None:
        """<workdir>/samples/step<N>-<sampler>.png and its -difficulty.png (chief only)."""
        samples, info = self.sample_fn(ema, self.noise, self.labels, jax.random.fold_in(self.key, 2))
        samples = self.decode(samples)
        if not sharding.is_chief():
            return
        out = self.workdir / "samples"
        out.mkdir(parents=True, exist_ok=True)
        images = pictures.to_uint8(np.asarray(samples))
        pictures.save_png(out / f"step{step:07d}-{self.sampler_name}.png",
                          pictures.image_grid(images, min_size=32))
        pic = pictures.trajectory_picture(images, jax.device_get(info), self.mcfg.patch_size,
                                          self.mcfg.image_size[0], self.config.sample.num_difficulty_rows)
        if pic is not None:
            pictures.save_png(out / f"step{step:07d}-{self.sampler_name}-difficulty.png", pic)


def _sample_decoder(config, mcfg):
    """Pixels for the sample grids: latent models decode with config.sample.vae when it loads
    (else their first three channels are shown, with a warning); pixel models pass through."""
    if mcfg.in_channels in (1, 3):
        return lambda x: x
    try:
        if config.sample.vae:
            return decoders.make_decoder(config.sample.vae)
    except (OSError, ValueError) as e:  # offline hub, missing file
        logging.warning("sample grids show raw latents: the VAE did not load (%s)", e)
    return lambda x: x[..., :3]


# ----------------------------------------------------------------------------- loop
def _write_config(config, workdir) -> None:
    """<workdir>/config.json, after the restore: a refused resume leaves the old one in place."""
    if sharding.is_chief():
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))


def _restore(manager, state, train_iter, mcfg) -> tuple[Any, int]:
    """The workdir's newest restorable checkpoint (state and data iterator), else the fresh state;
    damaged steps are moved aside, another model's checkpoint is refused (checkpoint.py)."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    found = ckpt_lib.restore_latest(manager, abstract, train_iter, mcfg)
    if found is None:
        return state, 0
    logging.info("resumed from step %d", found[1])
    return found[0], int(found[1])


class _FiniteCheck:
    """Collects each step's metrics without a device sync; `check()` fetches them and stops on
    the first NaN/inf naming the step and the last good checkpoint."""

    def __init__(self, manager, workdir):
        self.manager, self.workdir, self.pending = manager, workdir, []

    def add(self, step, metrics):
        self.pending.append((step, metrics))

    def check(self) -> dict:
        found = first_non_finite(jax.device_get(self.pending))
        if found is not None:
            self.manager.wait_until_finished()
            raise FloatingPointError(
                f"loss/grad norm became {found[1]} at step {found[0]}; stopping. The last good "
                f"checkpoint is step {self.manager.latest_step()} in {self.workdir / 'checkpoints'}")
        last = self.pending[-1][1] if self.pending else {}
        self.pending.clear()
        return {k: float(v) for k, v in jax.device_get(last).items()}


class _Progress:
    """A console line with the ETA at every log step; with config.log.profile a jax.profiler
    trace of 5 steps (after 10 warm-up steps) in <workdir>/profile (TensorBoard or Perfetto)."""

    def __init__(self, config, workdir, start: int):
        self.total, self.start = config.train.num_steps, start
        self.profile_dir = str(workdir / "profile") if config.log.profile and sharding.is_chief() else None

    def step(self, step: int) -> None:
        if self.profile_dir and step == self.start + 10:
            jax.profiler.start_trace(self.profile_dir)
        elif self.profile_dir and step == self.start + 15:
            jax.profiler.stop_trace()
            logging.info("profile of steps %d-%d in %s", step - 5, step - 1, self.profile_dir)

    def report(self, step: int, steps_per_sec: float) -> None:
        eta = (self.total - step) / max(steps_per_sec, 1e-9)
        logging.info("step %d/%d (%.1f%%), %.2f steps/s, ETA %dh%02dm", step, self.total,
                     100.0 * step / self.total, steps_per_sec, eta // 3600, eta % 3600 // 60)


def _every(step: int, n: int, final: bool) -> bool:
    return final or (n > 0 and step % n == 0)


# ----------------------------------------------------------------------------- preemption
class Preempted(Exception):
    """Training saved the current step on a preemption notice and stopped (main exits 0)."""

    def __init__(self, step: int, directory):
        super().__init__(f"preempted: saved a checkpoint at step {step} in {directory}; "
                         "run the same command to resume")
        self.step = step


class _Preemption:
    """SIGTERM/SIGINT -> a checkpoint at the current step, then `Preempted`.

    One process: the handler sets a flag the loop reads after each step; a second signal while
    saving is only logged, so the save finishes. Several processes: JAX's preemption service
    (started by jax.distributed.initialize; it catches SIGTERM itself, so no Python handler is
    installed there) names the first step every host reaches, via
    `multihost_utils.reached_preemption_sync_point`, and all hosts save that same step.
    """

    def __init__(self):
        self.multihost, self.received, self._previous = jax.process_count() > 1, None, {}

    def __enter__(self):
        if not self.multihost and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
            logging.warning("%s: saving a checkpoint at the current step, then stopping", name)
        else:
            logging.warning("%s again: ignored until the checkpoint is saved", name)

    def requested(self, step: int) -> bool:
        if not self.multihost:
            return self.received is not None
        try:
            return multihost_utils.reached_preemption_sync_point(step)
        except RuntimeError:  # jax_enable_preemption_service is off: no notices
            return False


def _stop_for_preemption(manager, step, state, train_iter, finite, writer, mcfg, saved: bool):
    """Save `step` (unless the periodic save just did), wait for the save, flush the metrics and
    raise `Preempted`."""
    if not saved:
        finite.check()  # never save a NaN state
        ckpt_lib.save(manager, step, state, train_iter, force=True, model=mcfg)
    manager.wait_until_finished()
    writer.close()
    raise Preempted(step, manager.directory)


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
    """Train per `config` in `workdir`, resuming from its latest checkpoint; returns last metrics.
    Raises `Preempted` after saving on SIGTERM/SIGINT or a multi-host preemption notice."""
    config_lib.validate(config, "train")
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mcfg = config_lib.model_config(config)
    try:
        mesh = sharding.make_mesh(config.mesh)
    except ValueError as e:  # config.mesh does not fit the devices
        raise UserError(str(e)) from e
    logging.info("mesh %s over %d devices", dict(mesh.shape), mesh.size)
    # The input first: a bad data file fails before anything compiles.
    train_iter = pipeline.make_train_iterator(config.data, config.seed, jax.process_index(), jax.process_count())
    state, graphdef, rest, shardings = init_state(config, mesh)
    c, log = config.checkpoint, config.log
    manager = ckpt_lib.make_manager(workdir / "checkpoints", every_steps=c.every_steps, keep=c.keep,
                                    async_save=c.async_save)
    state, start = _restore(manager, state, train_iter, mcfg)
    _write_config(config, workdir)
    writer = MetricWriter(workdir, enabled=sharding.is_chief())
    train_step = jit_train_step(config, graphdef, rest, shardings, mesh, repa.target_encoder(config, workdir))
    evaluator = Evaluator(config, workdir, graphdef, rest, mesh)
    finite, progress, last, t_log = _FiniteCheck(manager, workdir), _Progress(config, workdir, start), {}, time.time()
    with jax.set_mesh(mesh), _Preemption() as preemption:
        for step in range(start + 1, config.train.num_steps + 1):
            state, metrics = train_step(state, sharding.to_global_batch(next(train_iter), mesh))
            finite.add(step, metrics)
            progress.step(step)
            final = step == config.train.num_steps
            if _every(step, log.every_steps, final):
                last, sps, t_log = finite.check(), log.every_steps / max(time.time() - t_log, 1e-9), time.time()
                writer.write(step, {**last, "steps_per_sec": sps})
                progress.report(step, sps)
            saved = False
            if _every(step, c.every_steps, final):
                finite.check()  # never save a NaN state
                saved = ckpt_lib.save(manager, step, state, train_iter, force=final, model=mcfg)
            if preemption.requested(step) and not final:
                _stop_for_preemption(manager, step, state, train_iter, finite, writer, mcfg, saved)
            if _every(step, log.eval_every_steps, final):
                writer.write(step, evaluator.val_loss(state["ema"]))
            if _every(step, log.sample_every_steps, final):
                evaluator.sample_pictures(step, state["ema"])
            if evaluator.fid_hook is not None and _every(step, config.eval.fid_every_steps, final):
                writer.write(step, evaluator.fid_hook(step, state["ema"]))
    manager.wait_until_finished()
    ema = sharding.to_host(nnx.to_pure_dict(state["ema"]))  # gathered on every host
    ckpt_lib.save_inference(workdir / "inference", evaluator.mcfg.to_dict(), ema,  # on every host: orbax syncs
                            extra={"step": int(state["step"]), "sampler": dict(config.sampler),
                                   "conditioning": evaluator.cond.meta},
                            family=config_lib.model_family(config).name)
    writer.close()
    return last
