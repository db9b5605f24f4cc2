"""Fault injection: preemption (SIGINT/SIGTERM, a second signal during the save, SIGKILL during an
async save) resumes bit-identically; damaged checkpoints fall back; another model's checkpoint
and bad input files stop with one line naming the file, the parameter or the field.

The signal tests run real `patch_forcing.main` processes on the digits smoke config and share
one uninterrupted reference run and a persistent compilation cache; the rest run in-process.
"""

import contextlib
import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import digits
from patch_forcing import UserError, main, sharding, train
from patch_forcing import checkpoint as ckpt_lib
from patch_forcing.data import latents
from patch_forcing.data import pipeline as data_lib
from tests import REPO

STEPS, EVERY = 40, 16  # periodic checkpoints at 16, 32 and the final 40
RUN_FLAGS = ("--config=configs/digits.py:smoke", f"--config.train.num_steps={STEPS}",
             f"--config.checkpoint.every_steps={EVERY}", "--config.checkpoint.keep=10",
             "--config.log.every_steps=1", "--config.log.eval_every_steps=1000",
             "--config.log.sample_every_steps=1000")
# main under a hook that (with PF_TEST_HOLD_COMMIT=<seconds>:<dir>) touches <dir>/<step> and waits
# before orbax commits each step, so a test can signal or kill the process in the middle of a save.
RUNNER = """
import os, sys, time
hold = os.environ.get("PF_TEST_HOLD_COMMIT")
if hold:
    from orbax.checkpoint._src.path import atomicity
    seconds, marks = hold.split(":", 1)
    commit = atomicity.AtomicRenameTemporaryPath.finalize
    async def held(self):
        if self.get_final().name.isdigit():
            open(os.path.join(marks, self.get_final().name), "w").close()
            time.sleep(float(seconds))
        await commit(self)
    atomicity.AtomicRenameTemporaryPath.finalize = held
from absl import app
from patch_forcing import main
app.run(main.run, flags_parser=main.parse_flags)
"""


# ----------------------------------------------------------------------------- processes
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("jax_cache")
    return {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
            "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}  # tiny models: compiling costs more than running


class Run:
    """A training process whose output lines are collected by a thread as they come."""

    def __init__(self, workdir, env, *extra, hold=None):
        env = {**env, **({"PF_TEST_HOLD_COMMIT": hold} if hold else {})}
        cmd = [sys.executable, "-c", RUNNER, *RUN_FLAGS, f"--workdir={workdir}", *extra]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self._reader.start()

    def step(self) -> int:
        found = [int(m.group(1)) for line in list(self.lines) if (m := re.search(r"\] step (\d+)/", line))]
        return max(found, default=0)

    def wait_for(self, done, timeout=120.0):
        end = time.time() + timeout
        while not done():
            assert self.proc.poll() is None, "".join(self.lines)[-3000:]
            assert time.time() < end, "".join(self.lines)[-3000:]
            time.sleep(0.002)

    def finish(self, timeout=180.0) -> tuple[int, str]:
        rc = self.proc.wait(timeout)
        self._reader.join(10)
        self.proc.stdout.close()
        return rc, "".join(self.lines)


def _preempted_step(out: str) -> int:
    found = re.findall(r"^preempted: saved a checkpoint at step (\d+) in ", out, re.M)
    assert len(found) == 1, out[-3000:]
    return int(found[0])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
    """One uninterrupted run, shared by the resume and restore tests."""
    workdir = tmp_path_factory.mktemp("reference")
    rc, out = Run(workdir, env).finish()
    assert rc == 0, out[-3000:]
    return workdir


def _state(workdir, step=STEPS):
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(workdir / "checkpoints" / str(step) / "state")


def _losses(workdir) -> dict[int, float]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}  # a rerun step: its last line


@pytest.mark.slow
def test_preemptions_and_a_kill_during_a_save_resume_bit_identically(reference, env, tmp_path):
    """SIGINT at a seeded step; SIGTERM at another, and again while that save is held open;
    SIGKILL while the next async save is held before its commit; then a clean finish. The final
    state, the inference params and every logged loss equal the uninterrupted run's."""
    workdir, marks = tmp_path / "run", tmp_path / "marks"
    marks.mkdir()
    rng = np.random.default_rng(12)
    k1 = int(rng.integers(2, 10))

    run = Run(workdir, env)  # 1. SIGINT (Ctrl-C) at a random step
    run.wait_for(lambda: run.step() >= k1)
    run.proc.send_signal(signal.SIGINT)
    rc, out = run.finish()
    p1 = _preempted_step(out)
    assert rc == 0 and k1 <= p1 < STEPS and "Traceback" not in out, out[-3000:]
    assert (workdir / "checkpoints" / str(p1) / ckpt_lib.COMMIT_MARKER).exists()

    k2 = p1 + int(rng.integers(2, 8))  # 2. SIGTERM, and a second one while the save is held open
    run = Run(workdir, env, hold=f"1.0:{marks}")
    run.wait_for(lambda: run.step() >= k2)
    run.proc.send_signal(signal.SIGTERM)
    run.wait_for(lambda: any(int(m.name) > p1 for m in marks.iterdir()))
    run.proc.send_signal(signal.SIGTERM)
    rc, out = run.finish()
    p2 = _preempted_step(out)
    assert rc == 0 and k2 <= p2 < STEPS and "SIGTERM again" in out, out[-3000:]
    assert (workdir / "checkpoints" / str(p2) / ckpt_lib.COMMIT_MARKER).exists()

    run = Run(workdir, env, hold=f"600:{marks}")  # 3. SIGKILL in the middle of the next save
    run.wait_for(lambda: any(int(m.name) > p2 for m in marks.iterdir()))
    run.proc.kill()
    run.finish()
    assert list((workdir / "checkpoints").glob("*.orbax-checkpoint-tmp*"))  # the save never committed

    rc, out = Run(workdir, env).finish()  # 4. resumes from p2 and finishes
    assert rc == 0 and f"resumed from step {p2}" in out, out[-3000:]
    full, resumed = _state(reference), _state(workdir)
    for name in ("params", "ema", "opt_state", "rng", "step"):
        for a, b in zip(jax.tree.leaves(full[name]), jax.tree.leaves(resumed[name]), strict=True):
            np.testing.assert_array_equal(a, b)
    _, params_a, _ = ckpt_lib.load_inference(reference / "inference")
    _, params_b, _ = ckpt_lib.load_inference(workdir / "inference")
    for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b), strict=True):
        np.testing.assert_array_equal(a, b)
    assert _losses(workdir) == _losses(reference)


def test_multihost_preemption_uses_jax_sync_point_and_leaves_sigterm_to_it(monkeypatch):
    calls = []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(train.multihost_utils, "reached_preemption_sync_point",
                        lambda step: calls.append(step) or step == 5)
    before = signal.getsignal(signal.SIGTERM)
    with train._Preemption() as preemption:
        assert signal.getsignal(signal.SIGTERM) is before  # JAX's preemption service catches SIGTERM
        assert [preemption.requested(s) for s in range(1, 7)] == [False] * 4 + [True, False]
    assert calls == [1, 2, 3, 4, 5, 6]


def test_signal_handler_is_installed_only_while_training_and_a_second_signal_is_ignored():
    before = signal.getsignal(signal.SIGTERM)
    with train._Preemption() as preemption:
        assert not preemption.requested(1)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # the second signal while saving: logged, no effect
        assert preemption.requested(2) and preemption.received == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


# ----------------------------------------------------------------------------- damaged checkpoints
@pytest.fixture(scope="module")
def target():
    """(abstract train state with shardings, model config, data iterator factory) of the reference."""
    c = digits.get_config("smoke")
    mesh = sharding.make_mesh(c.mesh)
    state = jax.eval_shape(lambda: train.init_state(c, mesh)[0])
    return state, train.config_lib.model_config(c), lambda: data_lib.make_train_iterator(c.data, c.seed)


def _manager(directory):
    return ckpt_lib.make_manager(directory, every_steps=EVERY, keep=10)


def _copy_checkpoints(reference, tmp_path):
    shutil.copytree(reference / "checkpoints", tmp_path / "checkpoints")
    return tmp_path / "checkpoints"


def _data_files(step_dir):
    return sorted((step_dir / "state" / "ocdbt.process_0" / "d").iterdir())


def _truncate(step_dir, rng):
    for f in _data_files(step_dir):
        os.truncate(f, f.stat().st_size // 2)


def _random_bytes(step_dir, rng):
    for f in _data_files(step_dir):
        f.write_bytes(rng.bytes(f.stat().st_size))


def _no_commit_marker(step_dir, rng):
    (step_dir / ckpt_lib.COMMIT_MARKER).unlink()


def _bad_metadata(step_dir, rng):
    (step_dir / "state" / "_METADATA").write_bytes(rng.bytes(200))


@pytest.mark.parametrize("damage,reason", [
    (_truncate, "OUT_OF_RANGE"), (_random_bytes, "ZSTD_decompressStream"),
    (_no_commit_marker, "no commit_success.txt"), (_bad_metadata, "unreadable metadata"),
])
def test_damaged_newest_checkpoint_is_moved_aside_and_the_previous_restored(
        reference, tmp_path, target, monkeypatch, damage, reason):
    abstract, mcfg, make_iter = target
    ckpts = _copy_checkpoints(reference, tmp_path)
    damage(ckpts / str(STEPS), np.random.default_rng(0))
    files = sorted(p.relative_to(ckpts / str(STEPS)) for p in (ckpts / str(STEPS)).rglob("*"))
    warnings = []
    monkeypatch.setattr(ckpt_lib.logging, "warning", lambda msg, *a: warnings.append(msg % a))
    state, step = ckpt_lib.restore_latest(_manager(ckpts), abstract, make_iter(), mcfg)
    assert step == 32 and int(state["step"]) == 32
    assert len(warnings) == 1 and f"checkpoint step {STEPS} cannot be restored" in warnings[0]
    assert reason in warnings[0] and "\n" not in warnings[0], warnings
    aside = ckpts / f"{STEPS}{ckpt_lib.CORRUPT}"  # moved aside whole, nothing deleted
    assert not (ckpts / str(STEPS)).exists()
    assert sorted(p.relative_to(aside) for p in aside.rglob("*")) == files
    ref = _state(reference, 32)["params"]
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(state["params"]), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_nan_values_count_as_damage(reference, tmp_path, target):
    abstract, mcfg, make_iter = target
    ckpts = _copy_checkpoints(reference, tmp_path)
    manager, it = _manager(ckpts), make_iter()
    state, _ = ckpt_lib.restore_latest(manager, abstract, it, mcfg)
    leaves, tree = jax.tree.flatten(state)
    leaves[3] = leaves[3] * np.nan
    ckpt_lib.save(manager, 48, jax.tree.unflatten(tree, leaves), it, force=True, model=mcfg)
    manager.wait_until_finished()
    _, step = ckpt_lib.restore_latest(_manager(ckpts), abstract, make_iter(), mcfg)
    assert step == STEPS and (ckpts / f"48{ckpt_lib.CORRUPT}").is_dir()


def test_no_restorable_checkpoint_stops_and_never_starts_from_scratch(reference, tmp_path, target):
    abstract, mcfg, make_iter = target
    ckpts = _copy_checkpoints(reference, tmp_path)
    steps = sorted(int(p.name) for p in ckpts.iterdir())
    for s in steps:
        _no_commit_marker(ckpts / str(s), None)
    for _ in range(2):  # the second start finds only the *.corrupt directories: still refused
        with pytest.raises(UserError, match=f"no checkpoint in {ckpts} can be restored") as err:
            ckpt_lib.restore_latest(_manager(ckpts), abstract, make_iter(), mcfg)
        assert "\n" not in str(err.value) and f"{STEPS}{ckpt_lib.CORRUPT}" in str(err.value)
    assert sorted(p.name for p in ckpts.iterdir()) == sorted(f"{s}{ckpt_lib.CORRUPT}" for s in steps)
    assert ckpt_lib.restore_latest(_manager(tmp_path / "fresh"), abstract, make_iter(), mcfg) is None


# ----------------------------------------------------------------------------- another model
def _abstract(**model):
    c = digits.get_config("smoke")
    c.model.update(model)
    mesh = sharding.make_mesh(c.mesh)
    return jax.eval_shape(lambda: train.init_state(c, mesh)[0]), train.config_lib.model_config(c)


@pytest.mark.parametrize("model,needle", [
    (dict(hidden_size=64), r"params/blocks/0/adaLN_modulation/bias has shape \(192,\) in the checkpoint and "
                           r"\(384,\) for this config; config.model differs: hidden_size=32 there, 64 here"),
    (dict(depth=2), r"params/blocks/1/adaLN_modulation/bias \(192,\) for this config is not in the checkpoint; "
                    r"config.model differs: depth=1 there, 2 here"),
])
def test_checkpoint_of_another_model_names_parameter_shapes_and_field(reference, tmp_path, model, needle):
    ckpts = _copy_checkpoints(reference, tmp_path)
    abstract, mcfg = _abstract(**model)
    with pytest.raises(UserError, match=needle) as err:
        ckpt_lib.restore_latest(_manager(ckpts), abstract, None, mcfg)
    assert "\n" not in str(err.value) and f"checkpoint {ckpts / str(STEPS)} was made with another" in str(err.value)
    assert not list(ckpts.glob("*.corrupt*"))  # a good checkpoint of another model is not damage


def test_checkpoint_without_model_metadata_names_the_field_from_shapes(reference, tmp_path):
    ckpts = _copy_checkpoints(reference, tmp_path)
    meta_file = ckpts / str(STEPS) / "_CHECKPOINT_METADATA"
    meta = json.loads(meta_file.read_text())
    meta["custom_metadata"] = {}  # as written before the model config was recorded
    meta_file.write_text(json.dumps(meta))
    abstract, mcfg = _abstract(hidden_size=64, num_heads=4)
    with pytest.raises(UserError, match="the checkpoint fits config.model.hidden_size=32"):
        ckpt_lib.restore_latest(_manager(ckpts), abstract, None, mcfg)


def test_inference_checkpoint_faults(reference, tmp_path):
    ckpt = tmp_path / "inference"
    shutil.copytree(reference / "inference", ckpt)
    meta = json.loads((ckpt / "config.json").read_text())
    meta["model"]["num_classes"] = 12
    (ckpt / "config.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"params does not fit .*config.json: y_embedder/embedding has shape "
                                        r"\(11, 32\) in params/ and \(13, 32\) for config.json's model; "
                                        r"the params fit model.num_classes=10"):
        ckpt_lib.load_model(ckpt)
    (ckpt / "config.json").write_text(json.dumps(meta)[:40])
    with pytest.raises(UserError, match=r"config.json is not valid JSON"):
        ckpt_lib.load_model(ckpt)
    (ckpt / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"it lacks config.json;"):
        ckpt_lib.load_model(ckpt)
    shutil.copy(reference / "inference" / "config.json", ckpt / "config.json")
    for f in (ckpt / "params" / "ocdbt.process_0" / "d").iterdir():
        os.truncate(f, 10)
    with pytest.raises(UserError, match=r"params cannot be read \(ValueError: .*\): the inference checkpoint is"):
        ckpt_lib.load_model(ckpt)


# ----------------------------------------------------------------------------- bad input files
def _idx(array, code) -> bytes:
    return bytes([0, 0, code, array.ndim]) + np.array(array.shape, ">u4").tobytes() + array.tobytes()


def _latent_dir(directory, records):
    writer = latents.ShardWriter(str(directory), latents.shard_name(0, 1))
    for i, z in enumerate(records):
        writer.write(z, label=i % 4, index=i)
    latents.write_metadata(str(directory), dict(
        format_version=latents.FORMAT_VERSION, num_examples=len(records), num_shards=1, shard_size=len(records),
        latent_shape=list(records[0].shape), record_shape=list(records[0].shape), dtype="float32", mode="mean",
        flips=False, classes=list("abcd"), shards=[writer.commit()]))
    return directory / latents.shard_name(0, 1)


def test_bad_input_files_name_the_file_and_the_fault(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (20, 28, 28)).astype(np.uint8)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(images, 8))[:-30])
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(np.arange(20, dtype=np.uint8) % 10, 8)))
    mnist = ml_collections.ConfigDict(dict(digits.get_config("smoke").data, name="mnist", source="idx",
                                           data_dir=str(tmp_path), image_size=(28, 28), split_eval="test"))
    with pytest.raises(UserError, match=r"t10k-images-idx3-ubyte.gz: truncated or damaged gzip"):
        data_lib.make_eval_batches(mnist, "test")

    np.savez(tmp_path / "a.npz", images=images, labels=np.arange(20) % 10)
    (tmp_path / "cut.npz").write_bytes((tmp_path / "a.npz").read_bytes()[:-100])
    arrays = dict(digits.get_config("smoke").data, name="arrays", image_size=(28, 28))
    with pytest.raises(UserError, match=r"cut.npz: not a readable .npz, truncated or damaged \(BadZipFile"):
        data_lib.make_eval_batches(ml_collections.ConfigDict(dict(arrays, data_dir=str(tmp_path / "cut.npz"))), "train")
    bad = images / 127.5 - 1.0
    bad[7, 3, 3] = np.inf
    np.savez(tmp_path / "inf.npz", images=bad, labels=np.arange(20) % 10)
    with pytest.raises(UserError, match=r"inf.npz: the data holds NaN/inf \(first in example 7\)"):
        data_lib.make_train_iterator(ml_collections.ConfigDict(dict(arrays, data_dir=str(tmp_path / "inf.npz"))), 0)

    z = [np.full((2, 2, 4), i, np.float32) for i in range(16)]
    lat = dict(digits.get_config("smoke").data, name="latents", image_size=(2, 2), channels=4, num_classes=4,
               batch_size=4, split_train="train")
    good = tmp_path / "lat"
    good.mkdir()
    _latent_dir(good, z)
    with pytest.raises(UserError, match=rf"data.image_size=\(4, 4\) must equal the stored size \(2, 2\) of "
                                        rf"'latents' \({good}\)"):
        data_lib.make_train_iterator(ml_collections.ConfigDict(dict(lat, data_dir=str(good), image_size=(4, 4))), 0)
    cut = tmp_path / "cut_lat"
    cut.mkdir()
    shard = _latent_dir(cut, z)
    os.truncate(shard, shard.stat().st_size - 100)
    with pytest.raises(UserError, match=rf"latent shard {shard} is truncated or damaged"):
        data_lib.make_train_iterator(ml_collections.ConfigDict(dict(lat, data_dir=str(cut))), seed=0)
    nan = tmp_path / "nan_lat"
    nan.mkdir()
    z[5] = z[5] * np.nan
    shard = _latent_dir(nan, z)
    it = data_lib.make_train_iterator(ml_collections.ConfigDict(dict(lat, data_dir=str(nan))), seed=0)
    with pytest.raises(UserError, match=rf"latent shard {shard} record 5 \(example 5\) holds NaN/inf"):
        for _ in range(4):  # one epoch
            next(it)


@pytest.fixture
def parsed_flags(monkeypatch):
    if not main.FLAGS.is_parsed():
        main.FLAGS.mark_as_parsed()
    monkeypatch.setattr(main.FLAGS, "verbose", False)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, h in handlers.items():
        signal.signal(s, h)


@pytest.mark.parametrize("error,code", [
    (UserError("data.data_dir='x.npz': not a readable .npz"), 2), (FileNotFoundError("no file\n x"), 2),
    (FloatingPointError("loss became nan at step 6"), 1), (train.Preempted(7, "/w/checkpoints"), 0),
])
def test_main_turns_user_errors_into_one_line_and_an_exit_code(monkeypatch, capsys, parsed_flags, error, code):
    def fail(argv):
        raise error

    monkeypatch.setattr(main, "main", fail)
    with pytest.raises(SystemExit) if code else contextlib.nullcontext() as exit_:
        main.run([])
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and (exit_.value.code if code else 0) == code
    assert err == (" ".join(f"error: {error}".split()) if code else
                   "preempted: saved a checkpoint at step 7 in /w/checkpoints; run the same command to resume")
    monkeypatch.setattr(main.FLAGS, "verbose", True)  # --verbose: the exception and its traceback
    with pytest.raises(type(error)) if code else contextlib.nullcontext():
        main.run([])


def test_main_bugs_keep_their_traceback_and_bad_flags_are_one_line(monkeypatch, capsys, parsed_flags):
    def bug(argv):
        raise TypeError("a bug")

    monkeypatch.setattr(main, "main", bug)
    with pytest.raises(TypeError):
        main.run([])
    with pytest.raises(SystemExit) as e:
        main.parse_flags(["main", "--mode=foo"])
    assert e.value.code == 2 and capsys.readouterr().err == (
        "error: bad command line: flag --mode=foo: value should be one of <train|sample|evaluate>\n")
    with pytest.raises(AttributeError) as override:
        digits.get_config().optim.lrr  # what config_flags raises for --config.optim.lrr=1
    assert main._flag_error(override.value) == 'the config has no field \'lrr\'\nDid you mean "lr" instead of "lrr"?'


@pytest.mark.slow
def test_cli_user_error_is_one_line_exit_2_without_traceback(tmp_path, env):
    np.savez(tmp_path / "nan.npz", images=np.full((8, 8, 8), np.nan, np.float32), labels=np.arange(8))
    cmd = [sys.executable, "-m", "patch_forcing.main", "--config=configs/digits.py:smoke", f"--workdir={tmp_path}",
           "--config.data.name=arrays", f"--config.data.data_dir={tmp_path / 'nan.npz'}"]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last == f"error: {tmp_path / 'nan.npz'}: the data holds NaN/inf (first in example 0)"
