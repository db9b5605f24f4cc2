"""Checkpoints: the orbax train-state manager and the inference checkpoint.

Train checkpoints (`<workdir>/checkpoints/<step>/`) hold two orbax items: `state` (params,
optimizer state, EMA, step, RNG; a pytree of jax.Arrays restored with the shardings of an
abstract target) and `data` (the grain iterator's position). Saves are asynchronous; orbax only
lists a step once it is complete, so resuming from `latest_step()` never sees a half-written one.

An inference checkpoint (`<dir>/config.json` + `<dir>/params/`) holds the EMA parameters, the
model config and its family ('dit' or 't2i', `models.families`; 'dit' when absent), and what it
was conditioned on: all that sampling needs, without optimizer state. The converter of the
authors' PyTorch checkpoints writes the same format. Paths may be local or anything etils/orbax
accept (e.g. gs://).
"""

from __future__ import annotations

import json
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from patch_forcing.models import families

INFERENCE_FORMAT = "patch_forcing.inference/1"


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
        epath.Path(directory),
        options=options,
        item_names=("state", "data"),
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()},
    )


def save(manager, step: int, state: Any, data_iter=None, *, force: bool = False) -> bool:
    """Start an (async) save of `state` and the data iterator at `step`; returns whether it saved."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    return manager.save(step, args=ocp.args.Composite(**items), force=force)


def restore(manager, step: int, abstract_state: Any, data_iter=None) -> Any:
    """Restore `state` into the shapes/shardings of `abstract_state`; the iterator in place."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    return manager.restore(step, args=ocp.args.Composite(**items))["state"]


# --------------------------------------------------------------------------- inference checkpoints
def save_inference(directory: str | epath.Path, model_config: dict, params: Any, extra: dict | None = None,
                   family: str = families.DEFAULT) -> None:
    """Write EMA `params` (a nested dict of arrays), the JSON-able `model_config` and its family."""
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    params = jax.tree.map(np.asarray, jax.device_get(params))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / "params", params, force=True)
        ckptr.wait_until_finished()
    meta = {"format": INFERENCE_FORMAT, "family": families.get(family).name, "model": model_config,
            **(extra or {})}
    (directory / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True))


def is_inference_checkpoint(directory: str | epath.Path) -> bool:
    directory = epath.Path(directory)
    return (directory / "config.json").exists() and (directory / "params").exists()


def load_inference(directory: str | epath.Path) -> tuple[dict, Any, dict]:
    """(model_config, params as numpy arrays, the whole metadata dict)."""
    directory = epath.Path(directory)
    if not is_inference_checkpoint(directory):
        raise FileNotFoundError(
            f"no inference checkpoint at {directory} (expected config.json and params/; training writes "
            "<workdir>/inference, `python -m patch_forcing.tools.convert` writes one from a PyTorch checkpoint)"
        )
    meta = json.loads((directory / "config.json").read_text())
    if meta.get("format") != INFERENCE_FORMAT:
        raise ValueError(f"{directory}/config.json has format {meta.get('format')!r}, expected {INFERENCE_FORMAT!r}")
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(directory / "params")
    return meta["model"], params, meta


def load_model(directory: str | epath.Path):
    """(model config, apply(params, x, t, cond), params, metadata) from an inference checkpoint
    of any family (DiTConfig and labels, T2IConfig and a text dict)."""
    model_cfg, params, meta = load_inference(directory)
    family = families.get(meta.get("family", families.DEFAULT))
    mcfg = family.config.from_dict(model_cfg)
    apply, params = family.from_params(mcfg, params)
    return mcfg, apply, params, meta
