"""Every path that runs on a TPU pod or a GPU cluster, run as 2 processes x 4 CPU devices (gloo
collectives) and compared with 1 process x 8 devices over the same mesh and global batch.

Both jobs start once per module (concurrently); the tests read what they left:
  training    digits over a (data=2, fsdp=4) mesh, the 2-process run stopped at step 4 and resumed
              by a second start on a (data=1, fsdp=8) mesh (parameters sharded across the hosts,
              orbax restore on every host into another sharding), the FID hook every 4 steps
  evaluate    --mode=evaluate (sharded sampling, gathered features), --mode=sample
  latents     extract_latents, each host encoding and writing its own shards
Sampling, evaluation and latents are bit-identical. Training is equal up to float32 reduction
order (gloo adds the hosts' partial gradient sums in another order than one process does):
losses within 1e-6 relative, parameters within 1e-7 absolute (measured: 8e-8 and 3e-8 after 8
steps). A deliberately duplicated data shard must break the equivalence (the check can fail).
Preemption across hosts (the faults work) adds a scenario here: `harness.Job.signal(SIGTERM)`.
"""

import json
import re
import shutil
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from patch_forcing.data import latents as latents_lib
from patch_forcing.evaluation import features
from tests.multihost import harness, worker

pytestmark = pytest.mark.slow
WORKER = "tests.multihost.worker"
JOB_TIMEOUT = 420  # seconds; a hang fails with the slowest process's log


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The classifier 'auto' finds in each workdir, a random DiT inference checkpoint, a tiny VAE
    and 8 images in 2 classes."""
    from flax import nnx

    from patch_forcing import checkpoint, config_lib
    from patch_forcing.models import dit
    from patch_forcing.models import vae as vae_lib

    root = tmp_path_factory.mktemp("assets")
    c = worker.config()
    features.train_classifier(c.data, str(root / "classifier"), steps=30, seed=0, verbose=False)
    mcfg = config_lib.model_config(c)
    params = nnx.to_pure_dict(nnx.state(dit.DiT(mcfg, rngs=nnx.Rngs(3)), nnx.Param))
    checkpoint.save_inference(root / "inference", mcfg.to_dict(), params, extra={"step": 0})
    vae_lib.save_vae(vae_lib.AutoencoderKL(vae_lib.tiny_config(), rngs=nnx.Rngs(1)), str(root / "vae"))
    rng = np.random.default_rng(0)
    for i in range(8):
        d = root / "images" / ("ant" if i < 5 else "bee")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20 + i, 18, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def _job(out, assets, scenarios, num_processes, devices, **kw):
    for wd in ("train", "eval"):
        shutil.copytree(assets / "classifier", out / wd / "classifier")  # eval.feature_network='auto'
    args = [f"--out={out}", f"--assets={assets}", f"--scenarios={','.join(scenarios)}"]
    args += [f"--{k}={v}" for k, v in kw.items()]
    return harness.Job(WORKER, args, num_processes=num_processes, devices_per_process=devices,
                       log_dir=out / "logs", timeout=JOB_TIMEOUT, env={"PF_TEST_JIT_CACHE": str(out / "jit-cache")})


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    """(two processes' output folder, one process's, wall seconds of each job)."""
    two, one = tmp_path_factory.mktemp("two_processes"), tmp_path_factory.mktemp("one_process")
    t0 = time.time()
    multi = _job(two, assets, ["train", "duplicate", "evaluate", "sample", "latents"], 2, 4, resume_at=4).start()
    single = _job(one, assets, ["train", "evaluate", "sample", "latents"], 1, 8).start()
    single.wait()
    t_single = time.time() - t0
    multi.wait()
    t_multi = time.time() - t0
    print(f"\nmulti-host jobs: 2 processes {t_multi:.0f} s, 1 process {t_single:.0f} s (concurrently)")
    return two, one


def _report(out, i):
    return json.loads((out / f"process-{i}.json").read_text())


def _state(workdir, step):
    """A train checkpoint as numpy, whatever topology saved it."""
    directory = workdir / "checkpoints" / str(step) / "state"
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(directory)
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device),
                              getattr(meta, "item_metadata", meta))
        return jax.tree.map(np.asarray, ckptr.restore(directory, target))


def assert_same_state(a, b):
    """Parameters, EMA and optimizer state equal up to float32 reduction order."""
    for name in ("params", "ema", "opt_state"):
        la, lb = jax.tree.leaves(a[name]), jax.tree.leaves(b[name])
        assert len(la) == len(lb)
        for x, y in zip(la, lb):
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-7, err_msg=name)


def assert_same_losses(a: dict, b: dict):
    """The same steps, and the same loss at each up to float32 reduction order."""
    assert sorted(a) == sorted(b)
    np.testing.assert_allclose([a[k] for k in sorted(a)], [b[k] for k in sorted(b)], rtol=1e-6)


def _metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _losses(workdir):
    return {m["step"]: m["loss"] for m in _metrics(workdir) if "loss" in m}


# ----------------------------------------------------------------------------- training
def test_two_processes_resumed_equal_one_process(runs):
    two, one = runs
    assert _report(two, 0)["process_count"] == 2 and _report(two, 1)["devices"] == 8
    assert _report(one, 0)["process_count"] == 1 and _report(one, 0)["devices"] == 8
    # 8 steps; the 2-process run stopped at 4 and a new start resumed it from the checkpoints
    assert sorted(_losses(two / "train")) == list(range(1, 9))
    assert_same_losses(_losses(two / "train"), _losses(one / "train"))
    for step in (4, 8):
        assert_same_state(_state(two / "train", step), _state(one / "train", step))


def test_a_duplicated_data_shard_breaks_the_equivalence(runs):
    """Test the test: every host reading process 0's examples gives another global batch."""
    two, one = runs
    dup = {int(k): v for k, v in json.loads((two / "duplicate-losses.json").read_text()).items()}
    good = {k: v for k, v in _losses(one / "train").items() if k in dup}
    assert len(dup) == len(good) == 2
    with pytest.raises(AssertionError):
        assert_same_losses(dup, good)


def test_every_host_writes_checkpoint_shards_only_process_0_the_rest(runs):
    two, _ = runs
    state_dir = two / "train" / "checkpoints" / "8" / "state"
    assert {p.name for p in state_dir.glob("ocdbt.process_*")} == {"ocdbt.process_0", "ocdbt.process_1"}
    writes = [_report(two, i)["chief_only_writes"] for i in (0, 1)]
    assert writes[1] == {}, writes[1]
    assert writes[0]["save_png"] >= 3 and writes[0]["_write"] == 1 and writes[0]["metric_writer"] > 8
    assert len(list((two / "train").glob("events.out.tfevents.*"))) <= 2  # one per start, not per host
    steps = [m["step"] for m in _metrics(two / "train") if "loss" in m]
    assert steps == sorted(set(steps))  # each step's line once


def test_fid_hook_in_training_equals_one_process(runs):
    two, one = runs
    hooks = [[{k: v for k, v in m.items() if k.endswith("_16")} for m in _metrics(d / "train")
              if any(k.endswith("_16") for k in m)] for d in (two, one)]
    assert [len(h) for h in hooks] == [2, 2]  # steps 4 and 8
    for a, b in zip(*hooks):  # the EMA parameters differ by < 1e-7 (above)
        assert set(a) == set(b) == {"fid_16", "sfid_16", "is_16", "precision_16", "recall_16"}
        for k in a:
            assert np.isfinite(a[k]) and a[k] == pytest.approx(b[k], rel=1e-4), k


# ----------------------------------------------------------------------------- evaluate, sample
def test_evaluate_equals_one_process_exactly(runs):
    two, one = runs
    files = sorted((two / "eval" / "eval").glob("*-24.json"))
    assert len(files) == 1
    a, b = (json.loads((d / "eval" / "eval" / files[0].name).read_text()) for d in (two, one))
    for k in ("fid", "sfid", "is", "precision", "recall"):
        assert a[k] == b[k], k
    assert a["protocol"]["processes"] == 2 and b["protocol"]["processes"] == 1
    assert a["protocol"]["devices"] == b["protocol"]["devices"] == 8


def test_sample_equals_one_process_exactly(runs):
    two, one = runs
    (npz,) = (two / "eval" / "samples").glob("*/samples.npz")
    a, b = np.load(npz), np.load(one / npz.relative_to(two))
    assert a["arr_0"].shape == (12, 8, 8, 1)
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    np.testing.assert_array_equal(a["labels"], b["labels"])
    assert (npz.parent / "grid.png").exists() and (npz.parent / "difficulty.png").exists()


# ----------------------------------------------------------------------------- latents
def test_latents_each_host_writes_its_shards_and_the_set_equals_one_process(runs):
    two, one = runs
    assert _report(two, 0)["latent_shards"] == [0, 2] and _report(two, 1)["latent_shards"] == [1, 3]
    meta_two, meta_one = (latents_lib.read_metadata(str(d / "latents")) for d in (two, one))
    assert [s["name"] for s in meta_two["shards"]] == [latents_lib.shard_name(i, 4) for i in range(4)]
    assert not list((two / "latents").glob("*.json.tmp")) and len(list((two / "latents").glob("*.json"))) == 1
    a, b = (latents_lib.LatentSource(str(d / "latents"), verify=True) for d in (two, one))
    assert len(a) == len(b) == 8
    for i in range(8):
        np.testing.assert_array_equal(a[i]["latent"], b[i]["latent"])
        assert a[i]["label"] == b[i]["label"]
    assert [s["sha256"] for s in meta_two["shards"]] == [s["sha256"] for s in meta_one["shards"]]


# ----------------------------------------------------------------------------- failures
def test_a_dead_and_a_stuck_host_stop_everyone_with_an_error_naming_the_barrier(tmp_path):
    job = harness.Job(WORKER, [f"--out={tmp_path}", "--scenarios=barrier", "--barrier_timeout=3",
                               "--heartbeat_timeout=60"], num_processes=3, devices_per_process=1,
                      log_dir=tmp_path / "logs", timeout=120)
    results = job.start().wait(check=False)
    chief, dead, stuck = results
    assert chief.returncode != 0 and dead.returncode == 1
    assert re.search(r"TimeoutError: process 0 of 3: barrier 'stuck_host' timed out after 3 s "
                     r"\(# of tasks that reached the barrier: 1/3\.\); another host is dead or stuck", chief.log)
    # the stuck host (sleeping 300 s) is stopped too, by JAX's distributed runtime
    assert stuck.returncode != 0 and "detected fatal errors" in stuck.log
    assert max(chief.seconds, stuck.seconds) < 60, (chief.seconds, stuck.seconds)
