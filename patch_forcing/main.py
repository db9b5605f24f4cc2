"""Entry point: python -m patch_forcing.main --config=configs/digits.py --workdir=/tmp/pf [--mode=train]

Any config field can be overridden, e.g. --config.optim.lr=2e-4 --config.sampler.name=dual_loop.
Modes: train (resumes from the workdir's latest checkpoint), sample (reads <workdir>/inference or
config.sample.checkpoint), evaluate (FID & co. of the same checkpoint).
"""

from __future__ import annotations

import logging as pylogging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before anything imports TensorFlow

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from patch_forcing import cluster, config_lib, generate, train  # noqa: E402
from patch_forcing.evaluation import fid  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (a .py with get_config()).", lock_config=True)
flags.DEFINE_string("workdir", None, "Work directory: local path or any path etils accepts (gs://...).")
flags.DEFINE_enum("mode", "train", list(config_lib.MODES), "What to run.")
flags.mark_flags_as_required(["config", "workdir"])
cluster.define_flags(FLAGS)


def _quiet_orbax(record) -> bool:
    """Keep orbax's per-save INFO chatter out of the console (warnings still pass)."""
    return record.levelno >= pylogging.WARNING or "orbax" not in record.pathname


def main(argv):
    del argv
    logging.get_absl_handler().addFilter(_quiet_orbax)
    cluster.initialize_from_flags(FLAGS)  # before anything touches a device
    logging.info("JAX %s, process %d/%d, devices: %s", jax.__version__, jax.process_index(),
                 jax.process_count(), jax.devices())
    config_lib.validate(FLAGS.config, FLAGS.mode)  # fails on a bad field before anything compiles
    if FLAGS.mode == "train":
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    elif FLAGS.mode == "sample":
        generate.sample_and_save(FLAGS.config, FLAGS.workdir)
    else:
        fid.evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
