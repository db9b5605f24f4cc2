"""Meshes, shardings and hosts: the one place that names the mesh axes.

The training mesh is (DATA, FSDP): the batch is split over both axes, and FSDP shards the model
width (the 'embed' logical axis of every parameter). Multi-host helpers (`is_chief`, `sync`,
`to_host`) are no-ops in a single process; `sync` is a barrier with a timeout, so a host that is
dead or stuck stops the others with an error naming the barrier instead of a hang.
"""

from __future__ import annotations

import itertools

import jax
import numpy as np
from jax._src import distributed as jax_distributed  # the runtime's barrier, which takes a timeout
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA, FSDP = "data", "fsdp"
BARRIER_TIMEOUT_S = 1800.0  # main.py --barrier_timeout: longest wait at a sync point
BATCH_AXES = (DATA, FSDP)  # the batch dimension is split over every mesh axis


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    """A (DATA, FSDP) mesh from `config.mesh`; -1 in one axis takes the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(mesh_cfg.data), int(mesh_cfg.fsdp)]
    where = f"config.mesh (data={sizes[0]}, fsdp={sizes[1]})"
    if sum(s == -1 for s in sizes) > 1 or any(s != -1 and s < 1 for s in sizes):
        raise ValueError(f"{where}: each must be >= 1 or -1 (at most one -1)")
    fixed = int(np.prod([s for s in sizes if s != -1]))
    if len(devices) % fixed:
        raise ValueError(f"{where} does not divide the {len(devices)} devices")
    sizes = [len(devices) // fixed if s == -1 else s for s in sizes]
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"{where} must use all {len(devices)} devices")
    return Mesh(np.asarray(devices).reshape(sizes), BATCH_AXES, axis_types=(AxisType.Auto,) * 2)


def flat_mesh(devices=None) -> Mesh:
    """A 1-D DATA mesh over `devices` (all by default): sampling and feature extraction."""
    return Mesh(np.asarray(jax.devices() if devices is None else devices), (DATA,))


def logical_axis_rules(fsdp: bool) -> tuple[tuple[str, str | None], ...]:
    """Logical -> mesh axis rules: FSDP shards the model width D over FSDP, else replicate."""
    return (("embed", FSDP if fsdp else None), ("mlp", None), ("vocab", None))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The batch dimension split over every batch axis the mesh has."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    return NamedSharding(mesh, P(axes or None))


def replicate(tree, mesh: Mesh):
    """A pytree of host-local values (numpy, or arrays on this host's devices) copied to every
    device of `mesh`, which may span hosts: each host gives its own identical copy. Leaves already
    replicated over `mesh` stay as they are."""
    target = NamedSharding(mesh, P())

    def put(x):
        if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(target, x.ndim):
            return x
        return jax.device_put(np.asarray(x), target)

    return jax.tree.map(put, tree)


def to_global_batch(batch, mesh: Mesh):
    """Host-local numpy batch (B_local, ...) -> jax.Arrays (B, ...) split over the batch axes."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


# ----------------------------------------------------------------------------- explicit meshes
def explicit_mesh() -> bool:
    """Whether the current abstract mesh has only Explicit axes (jax.sharding.AxisType)."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and mesh.are_all_axes_explicit


def reshape_batch(x: jax.Array, shape: tuple) -> jax.Array:
    """Reshape keeping the batch (first) axis; under an Explicit mesh its sharding is kept."""
    if explicit_mesh():
        spec = tuple(jax.typeof(x).sharding.spec) or (None,)
        out = jax.P(spec[0], *([None] * (len(shape) - 1)))
        return jax.lax.reshape(x, shape, out_sharding=out)
    return x.reshape(shape)


# ----------------------------------------------------------------------------- hosts
def is_chief() -> bool:
    """Process 0 writes logs, pictures and reports; every process writes checkpoint shards."""
    return jax.process_index() == 0


_barrier = {"timeout_s": BARRIER_TIMEOUT_S, "count": itertools.count()}


def set_barrier_timeout(seconds: float) -> None:
    if not seconds > 0:
        raise ValueError(f"--barrier_timeout={seconds} must be > 0 seconds")
    _barrier["timeout_s"] = float(seconds)


def sync(name: str) -> None:
    """A barrier across processes (no-op in one process). Every process must call the same syncs in
    the same order; one that has not arrived after the barrier timeout stops the others."""
    if jax.process_count() == 1:
        return
    timeout = _barrier["timeout_s"]
    barrier = f"pf:{name}:{next(_barrier['count'])}"
    try:
        jax_distributed.global_state.client.wait_at_barrier(barrier, int(timeout * 1000))
    except Exception as e:  # JaxRuntimeError DEADLINE_EXCEEDED; the runtime's text spans many lines
        arrived = next((line for line in str(e).splitlines() if "reached the barrier" in line), "")
        raise TimeoutError(
            f"process {jax.process_index()} of {jax.process_count()}: barrier {name!r} timed out after "
            f"{timeout:g} s ({arrived.strip()}); another host is dead or stuck, see its log "
            f"(--barrier_timeout sets the limit)") from None


def to_host(tree):
    """numpy copies of a pytree of (possibly multi-host) jax.Arrays, gathered where needed."""
    def get(x):
        if x.is_fully_addressable:
            return np.asarray(x)
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(get, tree)
