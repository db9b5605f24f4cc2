"""Entry point: python -m patch_forcing.main --config=configs/digits.py --workdir=/tmp/pf [--mode=train]

Any config field can be overridden, e.g. --config.optim.lr=2e-4 --config.sampler.name=dual_loop.
Modes: train (resumes from the workdir's latest checkpoint), sample (reads <workdir>/inference or
config.sample.checkpoint), evaluate (FID & co. of the same checkpoint).

User errors (a bad flag, config field or input file: `patch_forcing.UserError`, a missing file,
any check in config_lib.validate) print one line and exit 2; --verbose adds the traceback. Any
other exception is a bug and keeps its traceback. A preempted run (SIGTERM/SIGINT) saves its step
and exits 0 with one line naming it.
"""

from __future__ import annotations

import logging as pylogging
import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before anything imports TensorFlow

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from patch_forcing import UserError, cluster, config_lib, generate, train  # noqa: E402
from patch_forcing.evaluation import fid  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (a .py with get_config()).", lock_config=True)
flags.DEFINE_string("workdir", None, "Work directory: local path or any path etils accepts (gs://...).")
flags.DEFINE_enum("mode", "train", list(config_lib.MODES), "What to run.")
flags.DEFINE_bool("verbose", False, "Also print the traceback of user errors (bad flags, config or files).")
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
    try:
        config_lib.validate(FLAGS.config, FLAGS.mode)  # fails on a bad field before anything compiles
    except ValueError as e:  # every check in validate is about a config field
        raise UserError(str(e)) from e
    if FLAGS.mode == "train":
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    elif FLAGS.mode == "sample":
        generate.sample_and_save(FLAGS.config, FLAGS.workdir)
    else:
        fid.evaluate(FLAGS.config, FLAGS.workdir)


# ----------------------------------------------------------------------------- user errors
USER_ERRORS = (UserError, FileNotFoundError)  # and bad flags while parsing; everything else is a bug


def _fail(message: str, code: int) -> None:
    print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    sys.exit(code)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing; a bad flag, override or config file is one line and exit code 2."""
    if FLAGS.is_parsed():
        FLAGS.unparse_flags()  # a second parse in one process (tests) starts afresh
    try:
        rest = FLAGS(argv)
        FLAGS.config.get("seed")  # config_flags defers a config file's load error to the first read
        return rest
    except Exception as e:  # noqa: BLE001 - a config file's get_config may raise anything
        if "--verbose" in argv:
            raise
        _fail(f"bad command line: {_flag_error(e)}", 2)


def _flag_error(e: BaseException) -> str:
    while e.args and isinstance(e.args[0], BaseException):  # ml_collections wraps a KeyError
        e = e.args[0]
    if isinstance(e, KeyError):  # an override names a field the config lacks
        return f"the config has no field {e.args[0]}"
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__  # a config file's traceback ends with its error


def run(argv) -> None:
    """main() with user errors as one line (exit 2), divergence as one line (exit 1) and a
    preemption as one line (exit 0); --verbose re-raises with the traceback."""
    try:
        main(argv)
    except train.Preempted as e:
        for signum in (signal.SIGTERM, signal.SIGINT):  # a late second signal must not turn 0 into 143
            signal.signal(signum, signal.SIG_IGN)
        print(e, file=sys.stderr, flush=True)
    except (*USER_ERRORS, FloatingPointError) as e:
        if FLAGS.verbose:
            raise
        _fail(str(e), 1 if isinstance(e, FloatingPointError) else 2)


if __name__ == "__main__":
    app.run(run, flags_parser=parse_flags)
