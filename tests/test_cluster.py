"""Multi-host start-up (patch_forcing/cluster.py): when main.py initialises JAX's distributed
runtime, with what, and the one-line error when the process count is not what the launch asked."""

import os
import subprocess
import sys

import pytest

from patch_forcing import UserError, cluster
from tests import REPO

SLURM = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[01-04]", "SLURM_NTASKS": "4", "SLURM_PROCID": "2",
         "SLURM_LOCALID": "0"}


def test_auto_initialises_on_a_tpu_vm_with_no_environment_at_all():
    """A multi-host TPU VM sets nothing JAX-specific: initialize() finds the pod by itself."""
    p = cluster.plan("auto", environ={}, on_tpu_vm=True)
    assert p.initialize and p.kwargs == {} and "TPU" in p.source
    assert not cluster.plan("auto", environ={}).initialize  # a laptop: one process


def test_slurm_multi_task_steps_initialise_and_expect_slurm_ntasks():
    p = cluster.plan("auto", environ=SLURM)
    assert p.initialize and p.kwargs == {} and p.expected_processes == 4
    one_task = cluster.plan("auto", environ={**SLURM, "SLURM_NTASKS": "1"})
    assert not one_task.initialize  # `srun -n 1` or an interactive allocation: one process
    assert cluster.plan("on", environ={**SLURM, "SLURM_NTASKS": "1"}).initialize


def test_explicit_coordinator_flags_or_jax_coordinator_address():
    p = cluster.plan("auto", coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1, environ={})
    assert p.initialize and p.expected_processes == 2
    assert p.kwargs == dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1)
    env = cluster.plan("auto", num_processes=2, process_id=0, environ={"JAX_COORDINATOR_ADDRESS": "h:1"})
    assert env.initialize and "coordinator_address" not in env.kwargs  # JAX reads the variable itself
    # JAX never reads a process count or id from the environment: say so instead of its
    # "Number of processes must be defined"
    with pytest.raises(ValueError, match="needs --num_processes and --process_id"):
        cluster.plan("auto", environ={"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"})


def test_off_and_bad_mode():
    assert not cluster.plan("off", environ=SLURM, on_tpu_vm=True).initialize
    with pytest.raises(ValueError, match=r"--multihost='maybe' is not one of \['auto', 'on', 'off'\]"):
        cluster.plan("maybe", environ={})


def test_process_count_mismatch_is_one_clear_line():
    cluster.check_process_count(cluster.plan("auto", environ=SLURM), 4)
    with pytest.raises(UserError, match=r"the launch asked for 4 processes but JAX sees 2 \(SLURM job 77"):
        cluster.check_process_count(cluster.plan("auto", environ=SLURM), 2)
    lone = cluster.plan("auto", num_processes=4, environ={})  # the pod launch gave 4, nothing was found
    assert not lone.initialize
    with pytest.raises(UserError, match="asked for 4 processes but JAX sees 1 .no cluster detected"):
        cluster.check_process_count(lone, 1)


def test_main_stops_when_the_launch_asked_for_more_processes(tmp_path):
    """The real entry point: --num_processes=2 with no cluster around fails before any compile."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    env = {k: v for k, v in env.items() if not k.startswith(("SLURM_", "JAX_COORDINATOR"))}
    res = subprocess.run([sys.executable, "-m", "patch_forcing.main", "--config=configs/digits.py:smoke",
                          f"--workdir={tmp_path}", "--num_processes=2"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "the launch asked for 2 processes but JAX sees 1" in res.stderr
    assert not (tmp_path / "checkpoints").exists()
