"""Training loop: one pure train_step, jitted once, sharded over a ('data', 'fsdp') mesh.

Read top to bottom: state, update step, evaluation, loop. The train state is a plain pytree
  {'step', 'params', 'opt_state', 'ema', 'rng'}
(params/EMA are nnx.State of the DiT's nnx.Param variables). The step RNG is
fold_in(rng, step), so a resumed run draws exactly the numbers an uninterrupted one would.
"""

from __future__ import annotations

import functools
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from patch_forcing import checkpoint as ckpt_lib
from patch_forcing import config_lib
from patch_forcing import flow as flow_lib
from patch_forcing import loss as loss_lib
from patch_forcing.models import dit

BATCH_AXES = ("data", "fsdp")


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


def split_model(mcfg: dit.DiTConfig, key):
    """(graphdef, params, rest): rest holds the fixed position embedding."""
    return nnx.split(dit.DiT(mcfg, rngs=nnx.Rngs(key)), nnx.Param, ...)


def make_apply(graphdef, rest):
    """apply(params, x, t, y) -> (v, s): a pure function of the parameters."""

    def apply(params, x, t, y):
        return nnx.merge(graphdef, params, rest)(x, t, y)

    return apply


def param_shardings(abstract_params, mesh, fsdp: bool):
    """NamedShardings from the model's logical annotations ('embed' -> 'fsdp' under FSDP)."""
    rules = dict(dit.logical_axis_rules(fsdp))
    specs = nnx.get_partition_spec(abstract_params)

    def to_mesh(spec):
        spec = spec if isinstance(spec, P) else P()
        return NamedSharding(mesh, P(*(rules.get(a) if a is not None else None for a in spec)))

    return jax.tree.map(to_mesh, specs, is_leaf=lambda x: isinstance(x, P))


# ----------------------------------------------------------------------------- state
def init_state(config, mesh):
    """A sharded train state, the graphdef, the fixed rest, and the state's shardings."""
    mcfg = config_lib.model_config(config)
    tx, _ = make_optimizer(config.optim)
    key = jax.random.key(config.seed)
    graphdef, abstract_params, _ = nnx.eval_shape(lambda: split_model(mcfg, key))
    shard = param_shardings(abstract_params, mesh, fsdp=mesh.shape["fsdp"] > 1)
    replicated = NamedSharding(mesh, P())

    def init(key):
        _, params, rest = split_model(mcfg, key)
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
def make_train_step(config, graphdef, rest):
    """step(state, batch) -> (state, metrics), pure; jit it with the state's shardings."""
    mcfg = config_lib.model_config(config)
    tx, schedule = make_optimizer(config.optim)
    sample_t = config_lib.timestep_sampler(config)
    apply = make_apply(graphdef, rest)
    p, n, null = mcfg.patch_size, mcfg.num_patches, mcfg.num_classes
    nll_weight, dropout, decay = config.loss.nll_weight, config.loss.label_dropout, config.ema.decay

    def step(state, batch):
        x1 = batch["image"].astype(jnp.float32)
        y = batch["label"].astype(jnp.int32)
        b = x1.shape[0]
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        k_t, k_noise, k_drop = jax.random.split(rng, 3)
        t = sample_t(k_t, b, n)  # (B, N)
        if not mcfg.per_patch:
            t = t[:, 0]  # global samplers give equal patch times
        x0 = jax.random.normal(k_noise, x1.shape, jnp.float32)
        xt = flow_lib.interpolate(x0, x1, t, p)
        u = flow_lib.target(x0, x1)
        y = jnp.where(jax.random.uniform(k_drop, (b,)) < dropout, null, y)  # CFG label dropout

        def loss_fn(params):
            v, s = apply(params, xt, t, y)
            return loss_lib.patch_forcing_loss(v, s, u, nll_weight)

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        ema = jax.tree.map(lambda e, q: decay * e + (1.0 - decay) * q, state["ema"], params)
        metrics = {**metrics, "grad_norm": optax.global_norm(grads), "lr": schedule(state["step"])}
        new_state = {**state, "step": state["step"] + 1, "params": params, "opt_state": opt_state, "ema": ema}
        return new_state, metrics

    return step


def jit_train_step(config, graphdef, rest, shardings, mesh):
    batch_shard = NamedSharding(mesh, P(BATCH_AXES))
    return jax.jit(
        make_train_step(config, graphdef, rest),
        in_shardings=(shardings, {"image": batch_shard, "label": batch_shard}),
        out_shardings=(shardings, NamedSharding(mesh, P())),
        donate_argnums=0,
    )


# ----------------------------------------------------------------------------- evaluation
def make_eval_fns(config, graphdef, rest):
    """Jitted validation loss (8 segments) over EMA params, and the sampler over EMA params."""
    from patch_forcing import samplers

    mcfg = config_lib.model_config(config)
    apply = make_apply(graphdef, rest)

    @jax.jit
    def val_fn(params, x1, x0, y):
        fn = functools.partial(apply, params)
        return loss_lib.validation_loss(fn, x1, x0, y, mcfg.patch_size, per_patch=mcfg.per_patch)

    sample_fn = samplers.make_sample_fn(apply, config_lib.sampler_config(config), return_trajectory=True)
    return val_fn, sample_fn


def first_non_finite(history: list[tuple[int, Any]]) -> tuple[int, float] | None:
    """The first (step, value) whose loss or grad norm is NaN/inf, from fetched metrics."""
    for step, m in history:
        for key in ("loss", "grad_norm"):
            v = float(m[key])
            if not np.isfinite(v):
                return step, v
    return None


def _latent_decoder(config, mcfg):
    """Pixels for the sample grids: latent models decode with config.sample.vae when it loads
    (else their first three channels are shown, with a warning); pixel models pass through."""
    if mcfg.in_channels in (1, 3):
        return lambda x: x
    if config.sample.vae:
        from patch_forcing import sample

        try:
            return sample.make_decoder(config.sample.vae)
        except (OSError, ValueError) as e:  # offline hub, missing file
            logging.warning("sample grids show raw latents: the VAE did not load (%s)", e)
    return lambda x: x[..., :3]


def _write_samples(workdir, step, samples, info, mcfg, sampler_name, num_rows):
    from patch_forcing import pictures, sample

    out = epath.Path(workdir) / "samples"
    out.mkdir(parents=True, exist_ok=True)
    images = pictures.to_uint8(np.asarray(samples))
    pictures.save_png(out / f"step{step:07d}-{sampler_name}.png", pictures.image_grid(images, min_size=32))
    pic = sample.trajectory_picture(images, info, mcfg, num_rows)
    if pic is not None:
        pictures.save_png(out / f"step{step:07d}-{sampler_name}-difficulty.png", pic)


# ----------------------------------------------------------------------------- loop
def train_and_evaluate(config, workdir: str) -> dict[str, float]:
    """Train per `config` in `workdir`, resuming from its latest checkpoint; returns last metrics."""
    from clu import metric_writers, periodic_actions

    from patch_forcing import data as data_lib
    from patch_forcing import samplers

    config_lib.validate(config, "train")
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_chief = jax.process_index() == 0
    mcfg = config_lib.model_config(config)
    if is_chief:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

    # Logging: TensorBoard + console through clu, and one JSON line per log step.
    writer = metric_writers.create_default_writer(str(workdir), just_logging=not is_chief)
    jsonl = (workdir / "metrics.jsonl").open("a") if is_chief else None

    def log(step, scalars):
        writer.write_scalars(step, scalars)
        if jsonl:
            jsonl.write(json.dumps({"step": step, **{k: float(v) for k, v in scalars.items()}}) + "\n")
            jsonl.flush()

    # Mesh, state, input.
    mesh = config_lib.make_mesh(config.mesh)
    logging.info("mesh %s over %d devices", dict(mesh.shape), mesh.size)
    state, graphdef, rest, shardings = init_state(config, mesh)
    train_iter = data_lib.make_train_iterator(
        config.data, config.seed, jax.process_index(), jax.process_count())
    manager = ckpt_lib.make_manager(workdir / "checkpoints", every_steps=config.checkpoint.every_steps,
                                    keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
    start = manager.latest_step()
    if start is not None:  # resume: the workdir's latest complete checkpoint
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        state = ckpt_lib.restore(manager, start, abstract, train_iter)
        logging.info("resumed from step %d", start)
    start = int(start or 0)

    train_step = jit_train_step(config, graphdef, rest, shardings, mesh)
    val_fn, sample_fn = make_eval_fns(config, graphdef, rest)
    scfg = config_lib.sampler_config(config)
    sname = samplers.sampler_name(scfg)

    # Fixed validation data and noise, and fixed sampling noise/labels (the same at every eval).
    eval_key = jax.random.key(config.seed + 1)
    val_batches = list(data_lib.make_eval_batches(
        config.data, config.data.split_eval, num_examples=config.log.num_eval_examples))
    ns = config.log.num_samples
    h, w = mcfg.image_size
    sample_noise = jax.random.normal(jax.random.fold_in(eval_key, 0), (ns, h, w, mcfg.in_channels))
    sample_labels = jnp.arange(ns, dtype=jnp.int32) % mcfg.num_classes

    def evaluate(step):
        seg_sum, count = 0.0, 0
        for i, vb in enumerate(val_batches):
            x1 = jnp.asarray(vb["image"])
            x0 = jax.random.normal(jax.random.fold_in(eval_key, 1000 + i), x1.shape)
            _, seg = val_fn(state["ema"], x1, x0, jnp.asarray(vb["label"]))
            seg_sum, count = seg_sum + np.asarray(seg) * len(x1), count + len(x1)
        seg = seg_sum / count
        log(step, {"val_loss": float(seg.mean()), **{f"val_loss/t{k}": float(v) for k, v in enumerate(seg)}})

    decode = _latent_decoder(config, mcfg)
    fid_every = int(config.eval.fid_every_steps)
    fid_hook = None
    if fid_every > 0:  # FID-1k (digits) / FID-10k (ImageNet) on the EMA params, next to val loss
        from patch_forcing import evaluate as evaluate_lib

        fid_hook = evaluate_lib.make_fid_hook(config, str(workdir), make_apply(graphdef, rest), mesh)

    def sample_pictures(step):
        samples, info = sample_fn(state["ema"], sample_noise, sample_labels, jax.random.fold_in(eval_key, 2))
        samples = decode(samples)
        if is_chief:
            _write_samples(workdir, step, samples, jax.device_get(info), mcfg, sname,
                           config.sample.num_difficulty_rows)

    hooks = []
    if is_chief:
        hooks.append(periodic_actions.ReportProgress(num_train_steps=config.train.num_steps, writer=writer,
                                                     every_steps=config.log.every_steps))
        if config.log.profile:
            hooks.append(periodic_actions.Profile(logdir=str(workdir), num_profile_steps=5))

    pending: list[tuple[int, Any]] = []  # metrics not yet checked for NaN/inf

    def check_finite():
        found = first_non_finite(jax.device_get(pending))
        if found is not None:
            manager.wait_until_finished()
            raise FloatingPointError(
                f"loss/grad norm became {found[1]} at step {found[0]}; stopping. The last good "
                f"checkpoint is step {manager.latest_step()} in {workdir / 'checkpoints'}")
        last = pending[-1][1] if pending else None
        pending.clear()
        return last

    last_metrics = {}
    t_log = time.time()
    with jax.set_mesh(mesh):
        for step in range(start + 1, config.train.num_steps + 1):
            batch = data_lib.to_global_batch(next(train_iter), mesh)
            state, metrics = train_step(state, batch)
            pending.append((step, metrics))
            for hook in hooks:
                hook(step)
            final = step == config.train.num_steps
            if step % config.log.every_steps == 0 or final:
                m = jax.device_get(check_finite())
                dt = time.time() - t_log
                t_log = time.time()
                last_metrics = {k: float(v) for k, v in m.items()}
                log(step, {**last_metrics, "steps_per_sec": config.log.every_steps / max(dt, 1e-9)})
            if step % config.checkpoint.every_steps == 0 or final:
                check_finite()  # never save a NaN state
                ckpt_lib.save(manager, step, state, train_iter, force=final)
            if step % config.log.eval_every_steps == 0 or final:
                evaluate(step)
            if step % config.log.sample_every_steps == 0 or final:
                sample_pictures(step)
            if fid_hook is not None and (step % fid_every == 0 or final):
                log(step, fid_hook(step, state["ema"]))

    manager.wait_until_finished()
    if is_chief:
        ckpt_lib.save_inference(workdir / "inference", mcfg.to_dict(), nnx.to_pure_dict(state["ema"]),
                                extra={"step": int(state["step"]), "sampler": dict(config.sampler)})
    writer.flush()
    if jsonl:
        jsonl.close()
    return last_metrics
