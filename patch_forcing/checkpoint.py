"""Checkpoints: the orbax train-state manager and the inference checkpoint.

Train checkpoints (`<workdir>/checkpoints/<step>/`) hold two orbax items: `state` (params,
optimizer state, EMA, step, RNG; a pytree of jax.Arrays restored with the shardings of an
abstract target) and `data` (the grain iterator's position), plus the model config in orbax's
custom metadata. Saves are asynchronous. What a reader must know: orbax writes a step under
`<step>.orbax-checkpoint-tmp` and renames it when finished (on GCS it writes in place), and in
both cases `commit_success.txt` is the last file it writes, so a step without it never finished
(a kill during the save, a half-done copy). `restore_latest` checks that marker, the shapes and
the values, moves a damaged step aside to `<step>.corrupt` (never deletes it) and falls back to
the previous one.

An inference checkpoint (`<dir>/config.json` + `<dir>/params/`) holds the EMA parameters, the
model config and its family ('dit' or 't2i', `models.families`; 'dit' when absent), and what it
was conditioned on: all that sampling needs, without optimizer state. The converter of the
authors' PyTorch checkpoints writes the same format. Paths may be local or anything etils/orbax
accept (e.g. gs://).
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import json
import sys
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from patch_forcing import UserError, paths
from patch_forcing.models import dit, families
from patch_forcing.models.layers import flat_shapes

INFERENCE_FORMAT = "patch_forcing.inference/1"
COMMIT_MARKER = "commit_success.txt"  # orbax's last write into a finished step (orbax-checkpoint 0.12)
CORRUPT = ".corrupt"  # a damaged step is renamed <step>.corrupt (<step>.corrupt-1, ... when taken)


# --------------------------------------------------------------------------- train checkpoints
def make_manager(directory: str | epath.Path, *, every_steps: int, keep: int, async_save: bool = True):
    """A CheckpointManager with `state` (pytree) and `data` (grain iterator) items."""
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=every_steps,
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        create=True,
    )
    return ocp.CheckpointManager(
        epath.Path(paths.native(directory)),  # orbax and tensorstore open gs:// themselves
        options=options,
        item_names=("state", "data"),
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()},
    )


def save(manager, step: int, state: Any, data_iter=None, *, force: bool = False,
         model: dit.DiTConfig | None = None) -> bool:
    """Start an (async) save of `state` and the data iterator at `step`, with the model config in
    the step's metadata (a mismatched restore names the fields); returns whether it saved."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    meta = {"model": model.to_dict()} if model is not None else None
    return manager.save(step, args=ocp.args.Composite(**items), force=force, custom_metadata=meta)


def restore(manager, step: int, abstract_state: Any, data_iter=None) -> Any:
    """Restore `state` into the shapes/shardings of `abstract_state`; the iterator in place."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    return manager.restore(step, args=ocp.args.Composite(**items))["state"]


def restore_latest(manager, abstract_state: Any, data_iter=None,
                   model: dit.DiTConfig | None = None) -> tuple[Any, int] | None:
    """(state, step) of the newest checkpoint that restores; None when the directory has none.

    A damaged step (no commit marker, unreadable files, NaN/inf values) gets one warning naming
    the step and the reason, is moved aside to `<step>.corrupt` and the previous step is tried;
    when none restores, a UserError (never a silent fresh start). A checkpoint of another model
    config is a UserError naming the first mismatched parameter, both shapes and the fields.
    All hosts take the same decision; process 0 renames.
    """
    directory = epath.Path(manager.directory)
    for step in sorted(manager.all_steps(), reverse=True):
        state, reason = _try_restore(manager, step, abstract_state, data_iter, model)
        aside = _free_name(directory, step)  # named before any host renames, so all agree
        if _on_every_host(reason is None):
            return state, step
        if jax.process_index() == 0:
            (directory / str(step)).rename(aside)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"patch_forcing:moved_aside:{step}")
        logging.warning("checkpoint step %d cannot be restored (%s); moved it to %s, trying the previous one",
                        step, reason or "another host could not restore it", aside)
        manager.reload()
    corrupt = sorted(p.name for p in directory.iterdir() if CORRUPT in p.name) if directory.exists() else []
    if corrupt:
        raise UserError(f"no checkpoint in {directory} can be restored; the damaged ones were moved aside "
                        f"({', '.join(corrupt)}): to start from scratch use a new --workdir or move them away")
    return None


def _try_restore(manager, step: int, abstract_state, data_iter, model) -> tuple[Any, str | None]:
    """(state, None), or (None, why the step is damaged); UserError for another model's checkpoint."""
    step_dir = epath.Path(manager.directory) / str(step)
    if not (step_dir / COMMIT_MARKER).exists():
        return None, f"no {COMMIT_MARKER}: its save or copy never finished"
    try:
        stored = manager.item_metadata(step)["state"]
        custom = manager.metadata(step).custom_metadata or {}
        if stored is None:
            return None, "no state metadata"
    except Exception as e:  # noqa: BLE001 - json, orbax and tensorstore raise many types on bad files
        return None, f"unreadable metadata ({_root_cause(e)})"
    _check_same_model(step_dir, _flat(stored), _flat(abstract_state), custom.get("model"), model)
    try:
        state = restore(manager, step, abstract_state, data_iter)
    except Exception as e:  # noqa: BLE001 - as above
        _silence_abandoned_reads()
        return None, _root_cause(e)
    if not _all_finite(state):
        return None, "NaN/inf in the restored values"
    return state, None


def _check_same_model(step_dir, got: dict, want: dict, saved_model: dict | None, model) -> None:
    """UserError when the checkpoint's shapes are not the config's (params first)."""
    want = dict(sorted(want.items(), key=lambda kv: not kv[0].startswith("params/")))
    mismatch = _first_mismatch(want, got, "in the checkpoint", "for this config")
    if mismatch is None:
        return
    fields = ""
    if saved_model is not None and model is not None:
        now = model.to_dict()
        diff = [f"{k}={saved_model.get(k)!r} there, {now[k]!r} here" for k in now if saved_model.get(k) != now[k]]
        fields = f"; config.model differs: {', '.join(diff)}" if diff else ""
    elif model is not None:
        params = {k[len("params/"):]: s for k, s in got.items() if k.startswith("params/")}
        fit = _single_field_fit(model, params)
        fields = f"; the checkpoint fits config.model.{fit}" if fit else ""
    raise UserError(f"checkpoint {step_dir} was made with another model config: {mismatch}{fields}. "
                    "Resume with the config that wrote it, or train in a new --workdir")


def _free_name(directory: epath.Path, step: int) -> epath.Path:
    path, i = directory / f"{step}{CORRUPT}", 0
    while path.exists():
        i += 1
        path = directory / f"{step}{CORRUPT}-{i}"
    return path


def _on_every_host(ok: bool) -> bool:
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def _all_finite(tree) -> bool:
    return bool(_finite([x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]))


@jax.jit
def _finite(xs):
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in xs]))


def _silence_abandoned_reads() -> None:
    """A failed orbax restore leaves its other reads of the damaged step to fail later, each a
    multi-line 'Exception ignored' report; drop those (only those) so one warning says it all."""
    if getattr(sys.unraisablehook, "drops_orbax_reads", False):
        gc.collect()
        return
    previous = sys.unraisablehook

    def hook(u):
        code = getattr(u.object, "cr_code", None)
        if "orbax" in getattr(code, "co_filename", "") or "Event loop is closed" in str(u.exc_value):
            return
        previous(u)

    hook.drops_orbax_reads = True
    sys.unraisablehook = hook
    gc.collect()


def _root_cause(e: BaseException) -> str:
    """One line: the innermost explicit cause (tensorstore's real error hides there)."""
    while e.__cause__ is not None:
        e = e.__cause__
    line = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {line[:300]}"


# --------------------------------------------------------------------------- shapes
def _flat(tree) -> dict[str, tuple]:
    """{'params/blocks/0/attn/qkv/kernel': shape} of a state pytree, abstract or orbax metadata."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        out["/".join(keys[:-1] if keys and keys[-1] == "value" else keys)] = tuple(leaf.shape)
    return out


def _check_fits(mcfg: dit.DiTConfig, params, directory) -> None:
    """A UserError naming the first parameter of `params` that does not fit `mcfg`."""
    config_file = epath.Path(directory) / "config.json"
    mismatch = _first_mismatch(_param_shapes(mcfg), flat_shapes(params), "in params/", "for config.json's model")
    if mismatch is not None:
        fit = _single_field_fit(mcfg, flat_shapes(params))
        fit = f"; the params fit model.{fit}" if fit else ""
        raise UserError(f"{epath.Path(directory) / 'params'} does not fit {config_file}: {mismatch}{fit}: were "
                        "they saved with another model config?")


def _param_shapes(cfg: dit.DiTConfig) -> dict[str, tuple]:
    model = nnx.eval_shape(lambda: dit.DiT(cfg, rngs=nnx.Rngs(0)))
    return flat_shapes(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _first_mismatch(want: dict, got: dict, there: str, here: str) -> str | None:
    """The first parameter (in `want`'s order) that `got` lacks or shapes differently, in words."""
    for k, shape in want.items():
        if k not in got:
            return f"{k} {shape} {here} is not {there}"
        if tuple(got[k]) != tuple(shape):
            return f"{k} has shape {tuple(got[k])} {there} and {tuple(shape)} {here}"
    extra = [k for k in got if k not in want]
    return f"{extra[0]} {tuple(got[extra[0]])} {there} is not in the model {here}" if extra else None


_SHAPE_FIELDS = ("hidden_size", "num_classes", "in_channels", "patch_size", "mlp_ratio", "per_patch")


def _single_field_fit(cfg: dit.DiTConfig, got: dict, budget: int = 40) -> str | None:
    """'field=value' when changing that one DiTConfig field gives the parameter shapes `got`, else
    None. Depth is the number of blocks; other fields are tried on a 1-block model with values
    from the mismatched shapes, most frequent first (at most `budget` models, shapes only)."""
    depth = len({k.split("/")[1] for k in got if k.startswith("blocks/")})
    got1 = {k: s for k, s in got.items() if not k.startswith("blocks/") or k.startswith("blocks/0/")}
    want1 = _param_shapes(dataclasses.replace(cfg, depth=1))
    if want1 == got1:
        return f"depth={depth}" if depth != cfg.depth else None
    if depth != cfg.depth:
        return None  # more than one field differs
    dims = collections.Counter(d for k, s in got1.items() if want1.get(k) != s for d in s)
    values = [d for d, _ in dims.most_common()]
    for field in _SHAPE_FIELDS:
        if field == "per_patch":
            candidates = [not cfg.per_patch]
        elif field == "mlp_ratio":
            candidates = [v / cfg.hidden_size for v in values]
        else:
            candidates = values + [v - 1 for v in values]  # the label table has num_classes + 1 rows
        for value in candidates:
            if value == getattr(cfg, field) or budget <= 0:
                continue
            budget -= 1
            try:
                candidate = dataclasses.replace(cfg, depth=1, **{field: value})
            except ValueError:
                continue
            if _param_shapes(candidate) == got1:
                return f"{field}={value}"
    return None


# --------------------------------------------------------------------------- inference checkpoints
def save_inference(directory: str | epath.Path, model_config: dict, params: Any, extra: dict | None = None,
                   family: str = families.DEFAULT) -> None:
    """Write EMA `params` (a nested dict of host arrays), the JSON-able `model_config` and its
    family. With several processes every one calls it (orbax's save is collective); process 0 writes."""
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    params = jax.tree.map(np.asarray, jax.device_get(params))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(epath.Path(paths.native(directory / "params")), params, force=True)
        ckptr.wait_until_finished()
    meta = {"format": INFERENCE_FORMAT, "family": families.get(family).name, "model": model_config,
            **(extra or {})}
    if jax.process_index() == 0:
        (directory / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True))


def is_inference_checkpoint(directory: str | epath.Path) -> bool:
    directory = epath.Path(directory)
    return (directory / "config.json").exists() and (directory / "params").exists()


def load_inference(directory: str | epath.Path) -> tuple[dict, Any, dict]:
    """(model_config, params as numpy arrays, the whole metadata dict); one-line errors naming
    the file for a missing part, a damaged config.json or unreadable params."""
    directory = epath.Path(directory)
    config_file, params_dir = directory / "config.json", directory / "params"
    if not is_inference_checkpoint(directory):
        lacks = [p.name for p in (config_file, params_dir) if not p.exists()]
        raise FileNotFoundError(
            f"no inference checkpoint at {directory} (it lacks {' and '.join(lacks)}; training writes "
            "<workdir>/inference, `python -m patch_forcing.tools.convert` writes one from a PyTorch checkpoint)"
        )
    try:
        meta = json.loads(config_file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{config_file} is not valid JSON ({_root_cause(e)}): the inference checkpoint "
                        "is damaged") from e
    if not isinstance(meta, dict) or meta.get("format") != INFERENCE_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise UserError(f"{config_file} has format {found!r}, expected {INFERENCE_FORMAT!r}")
    if not isinstance(meta.get("model"), dict):
        raise UserError(f"{config_file} has no 'model' block (the DiTConfig the params were trained with)")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(epath.Path(paths.native(params_dir)))
    except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many types on bad files
        _silence_abandoned_reads()
        raise UserError(f"{params_dir} cannot be read ({_root_cause(e)}): the inference checkpoint is damaged; "
                        "write it again (the end of training, or tools.convert)") from e
    return meta["model"], params, meta


def load_model(directory: str | epath.Path):
    """(model config, apply(params, x, t, cond), params, metadata) from an inference checkpoint
    of any family (DiTConfig and labels, T2IConfig and a text dict); a UserError naming the first
    parameter that does not fit config.json's model (DiT family)."""
    model_cfg, params, meta = load_inference(directory)
    config_file = epath.Path(directory) / "config.json"
    family = families.get(meta.get("family", families.DEFAULT))
    try:
        mcfg = family.config.from_dict(model_cfg)
    except (TypeError, ValueError) as e:
        raise UserError(f"{config_file}: 'model' is not a valid model config ({e})") from e
    if family.name == "dit":
        _check_fits(mcfg, params, directory)
    apply, params = family.from_params(mcfg, params)
    return mcfg, apply, params, meta
