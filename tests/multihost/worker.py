"""One host of the multi-host tests (tests/multihost/test_multihost.py), started by the harness as
`python -m tests.multihost.worker --out=DIR --assets=DIR --scenarios=... <cluster flags>`.

It starts exactly as `patch_forcing.main` does (cluster.define_flags / initialize_from_flags), then
runs the scenarios in one process lifetime, each on the real entry functions:
  train       digits over a (data=2, fsdp=4) mesh (data across hosts) with the FID hook; with
              --resume_at=K it stops at step K and a second `train_and_evaluate` resumes from the
              checkpoints (as a relaunch) on a (data=1, fsdp=8) mesh: the parameters are then sharded
              across hosts and restored into another sharding
  duplicate   2 train steps where every host reads process 0's data shard (the deliberately
              broken split that the equivalence check must catch); losses to <out>/duplicate-losses.json
  evaluate    --mode=evaluate of <assets>/inference (a fixed random DiT) in <out>/eval
  sample      --mode=sample of the same
  latents     extract_latents of <assets>/images with <assets>/vae into <out>/latents
  barrier     process 1 dies, process 2 is stuck: process 0 stops at the barrier with an error naming
              it, and JAX's runtime stops the stuck one
Process i writes <out>/process-<i>.json: the latent shards it encoded and how often it called the
writers that only process 0 may call (pictures, reports, metric lines).
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
from absl import flags, logging

from configs import digits
from patch_forcing import cluster, generate, pictures, sharding, train
from patch_forcing.data import pipeline
from patch_forcing.evaluation import fid
from patch_forcing.metric_writer import MetricWriter
from patch_forcing.models import vae as vae_lib
from patch_forcing.tools import extract_latents

FLAGS = flags.FlagValues()
flags.DEFINE_string("out", None, "Output folder shared by all processes.", flag_values=FLAGS)
flags.DEFINE_string("assets", None, "Inference checkpoint, VAE and images made by the test.", flag_values=FLAGS)
flags.DEFINE_list("scenarios", [], "What to run, in this order.", flag_values=FLAGS)
flags.DEFINE_integer("resume_at", 0, "train: stop at this step, then resume (0: one run).", flag_values=FLAGS)
cluster.define_flags(FLAGS)

STEPS = 8
CHIEF_ONLY = []  # (module, name) of the writers counted below


def config(workdir_steps: int = STEPS):
    """Tiny digits: PF-Tiny with width 32 (divisible by fsdp=4), batch 16, FID hook every 4 steps."""
    c = digits.get_config("smoke")
    c.mesh.data, c.mesh.fsdp = 2, 4
    c.train.num_steps = workdir_steps
    c.checkpoint.every_steps, c.checkpoint.async_save = 4, True
    c.log.every_steps, c.log.eval_every_steps, c.log.sample_every_steps = 1, 4, 8
    c.eval.fid_every_steps, c.eval.fid_num_samples = 4, 16
    c.eval.num_samples, c.eval.batch_size = 24, 8
    c.sample.num_images, c.sample.batch_size = 12, 8
    return c


def _count_chief_only_writes(counts: dict) -> None:
    """Count calls of the writers only process 0 may use (the check is in the test)."""
    def counted(owner, name):
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return real(*args, **kwargs)

        setattr(owner, name, wrapper)

    counted(pictures, "save_png")
    counted(fid, "_write")
    real_write = MetricWriter.write

    def write(self, step, scalars):
        if self.enabled:
            counts["metric_writer"] = counts.get("metric_writer", 0) + 1
        return real_write(self, step, scalars)

    MetricWriter.write = write


def _train(out: str) -> None:
    workdir = os.path.join(out, "train")
    if not FLAGS.resume_at:
        train.train_and_evaluate(config(), workdir)
        return
    train.train_and_evaluate(config(FLAGS.resume_at), workdir)  # a run that stops (preempted)
    c = config()
    c.mesh.data, c.mesh.fsdp = 1, 8  # the relaunch shards the model across the hosts
    train.train_and_evaluate(c, workdir)


def _duplicate(out: str) -> None:
    """The train step on 2 batches where every host read process 0's examples; losses to a file."""
    c = config()
    mesh = sharding.make_mesh(c.mesh)
    state, graphdef, rest, shardings = train.init_state(c, mesh)
    step = train.jit_train_step(c, graphdef, rest, shardings, mesh)
    it = pipeline.make_train_iterator(c.data, c.seed, 0, jax.process_count())  # process 0's shard everywhere
    losses = {}
    with jax.set_mesh(mesh):
        for i in (1, 2):
            state, metrics = step(state, sharding.to_global_batch(next(it), mesh))
            losses[i] = float(metrics["loss"])
    if sharding.is_chief():
        with open(os.path.join(out, "duplicate-losses.json"), "w") as f:
            json.dump(losses, f)


def _latents(out: str, assets: str, report: dict) -> None:
    vae = vae_lib.load_vae(local_path=os.path.join(assets, "vae"))
    opt = extract_latents.Options(image_size=16, shard_size=2, batch_size=8, progress=False, workers=2)
    report["latent_shards"] = []
    extract_latents.extract(extract_latents.ImageFolder(os.path.join(assets, "images")),
                            os.path.join(out, "latents"), vae, "tiny", opt,
                            on_shard=report["latent_shards"].append)


def _barrier() -> None:
    if jax.process_index() == 1:
        os._exit(1)  # a host that dies
    if jax.process_index() == 2:
        time.sleep(300)  # a host that is stuck: never reaches the barrier (the runtime stops it)
        return
    sharding.sync("stuck_host")


def main(argv) -> None:
    FLAGS(argv)
    logging.use_absl_handler()  # timestamped INFO lines in the process's log, as under app.run
    logging.set_verbosity(logging.INFO)
    cluster.initialize_from_flags(FLAGS)  # what patch_forcing.main does first
    out, i = FLAGS.out, jax.process_index()
    report: dict = {"process": i, "process_count": jax.process_count(), "devices": jax.device_count(),
                    "chief_only_writes": {}, "seconds": {}}
    _count_chief_only_writes(report["chief_only_writes"])
    c = config()
    c.sample.checkpoint = os.path.join(FLAGS.assets or "", "inference")
    for name in FLAGS.scenarios:
        t = time.time()
        if name == "train":
            _train(out)
        elif name == "duplicate":
            _duplicate(out)
        elif name == "evaluate":
            fid.evaluate(c, os.path.join(out, "eval"))
        elif name == "sample":
            generate.sample_and_save(c, os.path.join(out, "eval"))
        elif name == "latents":
            _latents(out, FLAGS.assets, report)
        elif name == "barrier":
            _barrier()
        else:
            raise ValueError(f"unknown scenario {name!r}")
        report["seconds"][name] = round(time.time() - t, 1)
        print(f"process {i}: {name} done in {report['seconds'][name]} s", flush=True)
    with open(os.path.join(out, f"process-{i}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    jax.config.update("jax_disable_most_optimizations", True)  # tiny models: compile time dominates
    if os.environ.get("PF_TEST_JIT_CACHE"):  # the train runs and hosts compile the same programs
        jax.config.update("jax_compilation_cache_dir", os.environ["PF_TEST_JIT_CACHE"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    main(sys.argv)
