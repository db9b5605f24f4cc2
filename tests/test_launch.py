"""launch/: the TPU pod, GPU node and SLURM scripts in their dry-run form (bash only, no gcloud),
and the package a TPU VM or GPU node installs (Python >= 3.11, extras, configs importable)."""

import os
import re
import shutil
import subprocess
import sys
import tomllib

import pytest

from tests import REPO

TPU = ["bash", str(REPO / "launch" / "tpu_pod.sh")]
GPU = ["bash", str(REPO / "launch" / "gpu_node.sh")]
POD = ["--name=pf", "--zone=us-central2-b", "--bucket=gs://bkt", "--dry-run"]


def sh(cmd, cwd=None, env=None, check=True):
    env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    res = subprocess.run(cmd, cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=120)
    assert not check or res.returncode == 0, res.stderr
    return res


# ----------------------------------------------------------------------------- TPU pod
def test_tpu_pod_help_and_bad_arguments():
    out = sh(TPU + ["--help"]).stdout
    for needle in ("Usage:", "create", "setup", "train", "delete", "--spot", "--dry-run", "Python 3.11", "uv",
                   "30 s", "SIGTERM", "resumes"):
        assert needle in out, needle
    bad = sh(TPU + ["--nope"], check=False)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--nope" in bad.stderr
    assert "required" in sh(TPU + ["--dry-run", "all"], check=False).stderr


def test_tpu_pod_dry_run_prints_every_command_and_each_hosts():
    out = sh(TPU + POD + ["--spot", "all", "--", "--config.optim.lr=2e-4", "--config.sampler.name=look ahead"]).stdout
    assert "queued-resources create pf --zone=us-central2-b --node-id=pf --accelerator-type=v4-32" in out
    assert "--spot" in out.split("queued-resources create")[1].splitlines()[0]
    assert "tpu-vm scp" in out and "--worker=all" in out
    for i in range(4):  # v4-32: 4 hosts; each one's setup and train command is printed
        assert out.count(f"[worker {i} of 4]") == 2
    assert "uv venv --python 3.11" in out
    train = out.split("[worker 3 of 4]")[-1]
    assert "nohup ../pf-venv/bin/python -m patch_forcing.main --config=configs/imagenet.py:B" in train
    assert "--workdir=gs://bkt/runs/imagenet-B --multihost=on --num_processes=4" in train
    assert "--config.sampler.name=look\\ ahead" in train  # extra arguments arrive quoted
    assert "> $log 2>&1" in train and "gs://bkt/runs/imagenet-B/logs/" in train
    assert not re.search(r"20\d\d\d\d\d\d", out)  # no timestamp: a relaunch resumes the same run
    assert sh(TPU + POD + ["train"]).stdout.count("runs/imagenet-B") > 0
    assert "queued-resources delete pf --zone=us-central2-b --force --quiet" in sh(TPU + POD + ["--delete"]).stdout


def test_tpu_pod_hosts_follow_the_accelerator():
    for accel, hosts in (("v4-8", 1), ("v5p-128", 16), ("v5litepod-16", 4), ("v6e-8", 1), ("v6e-64", 16)):
        out = sh(TPU + POD + [f"--accelerator={accel}", "train"]).stdout
        assert f"--num_processes={hosts}" in out and f"[worker {hosts - 1} of {hosts}]" in out, accel


# ----------------------------------------------------------------------------- GPU node, SLURM
def _gpu(*args, env=None, cwd=None):
    return sh(GPU + ["--dry-run", *args], env=env, cwd=cwd).stdout.strip().splitlines()


def test_gpu_node_uses_cudnn_only_where_the_dtype_allows_and_runs_from_the_repo(tmp_path):
    cd, cmd = _gpu("configs/mnist.py", str(tmp_path / "w"), cwd=tmp_path)  # started elsewhere
    assert cd == f"+ cd {REPO}"
    assert "attention_impl" not in cmd and "--config=configs/mnist.py" in cmd  # float32: XLA's attention
    assert f"> {tmp_path}/w/logs/" in cmd
    assert "--config.model.attention_impl=cudnn" in _gpu("configs/imagenet.py:XL", "/w")[1]  # bfloat16
    assert "attention_impl" not in _gpu("configs/imagenet.py", "/w", "--config.model.dtype=float32")[1]
    own = _gpu("configs/imagenet.py", "/w", "--config.model.attention_impl=xla")[1]
    assert own.count("attention_impl") == 1


def test_gpu_node_several_nodes_use_the_flags_jax_reads():
    cmd = _gpu("configs/digits.py", "gs://b/run", env=dict(NUM_NODES="2", NODE_RANK="1", COORDINATOR="n0:1234"))[1]
    assert "--multihost=on --coordinator_address=n0:1234 --num_processes=2 --process_id=1" in cmd
    slurm = dict(SLURM_JOB_ID="7", SLURM_STEP_NODELIST="n[1-2]", SLURM_NTASKS="16", SLURM_PROCID="3",
                 SLURM_LOCALID="3")
    assert "--multihost=auto" in _gpu("configs/digits.py", "/w", env=slurm)[1]  # JAX reads SLURM_* itself
    sbatch = sh(["bash", "launch/slurm_example.sbatch", "configs/imagenet.py:XL", "/w"], env={"DRY_RUN": "1"})
    assert sbatch.stdout.strip() == "srun --kill-on-bad-exit=1 launch/gpu_node.sh --foreground configs/imagenet.py:XL /w"
    text = (REPO / "launch" / "slurm_example.sbatch").read_text()
    assert "--signal=TERM@" in text and "--requeue" in text and "--ntasks-per-node=8" in text
    for f in (REPO / "launch").iterdir():  # variables JAX never reads must not be documented
        if f.suffix in (".sh", ".sbatch"):
            assert "JAX_NUM_PROCESSES" not in f.read_text() and "JAX_PROCESS_ID" not in f.read_text(), f.name


# ----------------------------------------------------------------------------- the package
def test_package_needs_python_311_and_installs_configs_with_the_converter_extras(tmp_path):
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert meta["requires-python"] == ">=3.11"
    src = tmp_path / "src"  # a copy: the build leaves build/ and *.egg-info beside the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "requirements.txt", "requirements-convert.txt",
                 "requirements-gcs.txt"):
        shutil.copy(REPO / name, src / name)
    for pkg in ("patch_forcing", "configs"):
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    site = tmp_path / "site"
    sh([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site),
        str(src)], env={"PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    (dist,) = site.glob("patch_forcing-*.dist-info")
    metadata = (dist / "METADATA").read_text()
    assert "Requires-Python: >=3.11" in metadata
    for extra_req in ('torch>=2.2; extra == "convert"', 'omegaconf>=2.3; extra == "convert"'):
        assert f"Requires-Dist: {extra_req}" in metadata
    assert "Requires-Dist: jax>=" in metadata
    # a config file given by path imports configs.common from the installed package, from any directory
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('cfg', {str(REPO / 'configs' / 'imagenet.py')!r})\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "import configs, patch_forcing\n"
            "assert configs.__file__.startswith(sys.argv[1]), configs.__file__\n"
            "print(m.get_config('XL').model.preset)\n")
    env = {"PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1"}
    out = sh([sys.executable, "-c", code, str(site)], cwd=elsewhere, env=env).stdout
    assert out.strip() == "PF-XL/2"


@pytest.mark.parametrize("script", ["tpu_pod.sh", "gpu_node.sh", "slurm_example.sbatch"])
def test_scripts_are_valid_bash(script):
    sh(["bash", "-n", str(REPO / "launch" / script)])
