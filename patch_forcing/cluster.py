"""Multi-host start-up: whether and how to call `jax.distributed.initialize()`, and the checks after it.

`--multihost=auto` (the default) initialises when a cluster is visible: an explicit coordinator
(`--coordinator_address` or JAX_COORDINATOR_ADDRESS), a SLURM job step with more than one task, or a
Cloud TPU VM (JAX reads a pod's hosts from the TPU metadata itself, so nothing need be set there).
`on` always initialises (JAX detects whatever the flags leave out), `off` never does.
What a reader must know: JAX itself reads JAX_COORDINATOR_ADDRESS (and JAX_COORDINATOR_PORT,
JAX_LOCAL_DEVICE_IDS), but never a process count or id from the environment: those come from
`--num_processes`/`--process_id`, SLURM (SLURM_NTASKS, SLURM_PROCID) or the TPU metadata.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping

import jax
from absl import flags, logging
from jax._src import cloud_tpu_init

from patch_forcing import UserError, sharding

MODES = ("auto", "on", "off")
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
HEARTBEAT_TIMEOUT_S = 100  # JAX's default: a host silent this long is dead, the others abort


@dataclasses.dataclass(frozen=True)
class Plan:
    initialize: bool  # call jax.distributed.initialize(**kwargs)
    kwargs: dict  # what the launch gave explicitly; JAX detects the rest
    expected_processes: int | None  # what the launch asked for; checked after start-up
    source: str  # how the cluster was found, for the log line and errors


def _slurm_tasks(environ: Mapping[str, str]) -> int | None:
    if not all(v in environ for v in SLURM_VARS):
        return None
    return int(environ["SLURM_NTASKS"])


def plan(mode: str, *, coordinator_address: str | None = None, num_processes: int | None = None,
         process_id: int | None = None, environ: Mapping[str, str] = os.environ,
         on_tpu_vm: bool = False) -> Plan:
    """What start-up does for `--multihost=mode` and the explicit flags, from the environment."""
    if mode not in MODES:
        raise UserError(f"--multihost={mode!r} is not one of {list(MODES)}")
    coordinator = coordinator_address or environ.get("JAX_COORDINATOR_ADDRESS")
    slurm = _slurm_tasks(environ)
    if coordinator and (num_processes is None or process_id is None) and slurm is None and not on_tpu_vm:
        raise UserError(f"a coordinator ({coordinator}) needs --num_processes and --process_id as well "
                         "(JAX reads neither from the environment)")
    kwargs = {k: v for k, v in dict(coordinator_address=coordinator_address, num_processes=num_processes,
                                    process_id=process_id).items() if v is not None}
    expected = num_processes if num_processes is not None else slurm
    if mode == "off":
        return Plan(False, {}, num_processes, "--multihost=off")
    if coordinator:
        return Plan(True, kwargs, expected, f"coordinator {coordinator}")
    if slurm is not None and (slurm > 1 or mode == "on"):
        return Plan(True, kwargs, expected, f"SLURM job {environ['SLURM_JOB_ID']} ({slurm} tasks)")
    if on_tpu_vm:
        return Plan(True, kwargs, expected, "Cloud TPU VM (hosts from the TPU metadata)")
    if mode == "on":
        return Plan(True, kwargs, expected, "--multihost=on (JAX's own cluster detection)")
    return Plan(False, {}, expected, "no cluster detected (--multihost=auto)")


def check_process_count(p: Plan, process_count: int) -> None:
    """A one-line error when JAX sees another number of processes than the launch asked for."""
    if p.expected_processes is not None and process_count != p.expected_processes:
        raise UserError(
            f"the launch asked for {p.expected_processes} processes but JAX sees {process_count} "
            f"({p.source}); start one process per host with the same --num_processes, or on a TPU pod "
            "run on every worker (--worker=all) with --multihost=on")


def initialize(mode: str = "auto", *, coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S,
               barrier_timeout_s: float = sharding.BARRIER_TIMEOUT_S) -> Plan:
    """Start JAX's distributed runtime per `plan`, before anything touches a device; check the
    process count. A host silent for `heartbeat_timeout_s` (crashed, preempted) makes the others
    abort; a barrier (`sharding.sync`) that waits longer than `barrier_timeout_s` for a stuck host
    raises naming it, and the exit waits at most as long again for the others."""
    p = plan(mode, coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id,
             on_tpu_vm=bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False)))
    sharding.set_barrier_timeout(barrier_timeout_s)
    if p.initialize:
        jax.distributed.initialize(**p.kwargs, heartbeat_timeout_seconds=int(heartbeat_timeout_s),
                                   shutdown_timeout_seconds=max(1, int(barrier_timeout_s)))
    check_process_count(p, jax.process_count())
    logging.info("process %d of %d (%s), %d local of %d devices", jax.process_index(), jax.process_count(),
                 p.source, jax.local_device_count(), jax.device_count())
    return p


# ----------------------------------------------------------------------------- main.py's flags
def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    fv = dict(flag_values=flag_values)
    flags.DEFINE_enum("multihost", "auto", list(MODES), "auto: start JAX's distributed runtime when a cluster "
                      "is visible (coordinator, SLURM, Cloud TPU VM); on: always (a TPU pod's launch sets it); "
                      "off: one process.", **fv)
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (also JAX_COORDINATOR_ADDRESS); "
                        "with --num_processes and --process_id.", **fv)
    flags.DEFINE_integer("num_processes", None, "Processes the launch starts (one per host); checked "
                         "against what JAX sees.", **fv)
    flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).", **fv)
    flags.DEFINE_integer("heartbeat_timeout", HEARTBEAT_TIMEOUT_S, "Seconds after which a silent host counts "
                         "as dead and every other host stops.", **fv)
    flags.DEFINE_float("barrier_timeout", sharding.BARRIER_TIMEOUT_S, "Seconds a host waits at a sync point "
                       "(e.g. while process 0 computes reference statistics) before it stops with an error.", **fv)


def initialize_from_flags(f: flags.FlagValues = flags.FLAGS) -> Plan:
    return initialize(f.multihost, coordinator_address=f.coordinator_address, num_processes=f.num_processes,
                      process_id=f.process_id, heartbeat_timeout_s=f.heartbeat_timeout,
                      barrier_timeout_s=f.barrier_timeout)
