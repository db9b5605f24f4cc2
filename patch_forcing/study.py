"""Studies: the paper's ablations at small scale, every variant and seed an ordinary run.

  python -m patch_forcing.study --study=timesteps --config=configs/digits.py --workdir=/tmp/s
  python -m patch_forcing.study --study=samplers --config=configs/digits.py --workdir=/tmp/s
  python -m patch_forcing.study --study=all --config=configs/mnist.py:study_cpu --workdir=/work/runs/s \
      --config.data.data_dir=../shared/data/mnist

Studies: timesteps (training timestep samplers), samplers (FID vs NFE at equal budgets), difficulty
(does the head predict the per-patch error), context (the "context helps" curve); a comma list runs
several, `all` the four in that order. Runs live in <workdir>/runs/<variant>-seed<k>, shared by the
studies of one workdir; rerunning the same command resumes a killed study without redoing finished
runs or evaluations. Writes <workdir>/<study>/{report.md, results.json, *.png} and the index
<workdir>/report.md. Sizes (seeds, N, NFE budgets, ...) are the config's `study` block.
"""

from __future__ import annotations

import logging as pylogging
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before anything imports TensorFlow

import jax  # noqa: E402
from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from patch_forcing.studies import context, difficulty, report, runner, samplers, timesteps  # noqa: E402
from patch_forcing.tools import cli  # noqa: E402

STUDIES = {"timesteps": timesteps, "samplers": samplers, "difficulty": difficulty, "context": context}
TITLES = {"timesteps": "training timestep samplers", "samplers": "samplers at equal NFE",
          "difficulty": "difficulty head", "context": "context helps"}

FLAGS = flags.FlagValues()
config_flags.DEFINE_config_file("config", None, "Config file (a .py with get_config()); its `study` block sizes the "
                                "study.", flag_values=FLAGS, lock_config=False)
flags.DEFINE_list("study", None, f"Studies to run, in order: some of {list(STUDIES)}, or all (the four).",
                  flag_values=FLAGS)
flags.DEFINE_string("workdir", None, "Study directory: runs/, one folder per study, report.md.", flag_values=FLAGS)
flags.DEFINE_integer("seeds", None, "Seeds per variant (default: config.study.seeds).", flag_values=FLAGS)
flags.DEFINE_list("only", [], "Timesteps variants and/or samplers to run; a study none of whose own names "
                  "are listed runs all of them.", flag_values=FLAGS)
flags.mark_flags_as_required(["config", "study", "workdir"], flag_values=FLAGS)


def run_study(name: str, config, workdir: str, seeds: int | None = None, only=(), config_name: str = "") -> dict:
    """Run (or resume) one study and write its report; returns its results."""
    module = STUDIES[name]
    study = runner.Study(config, workdir, seeds)
    t0, logged = time.time(), study.seconds(name)
    results = module.run(study, tuple(only))
    study.log_time(name, "analysis", time.time() - t0 - (study.seconds(name) - logged))  # besides runs and evals
    results.update(study=name, config=config_name or "config", seeds=list(study.seeds),
                   train_steps=study.train_steps, machine=runner.machine(), wall_seconds=study.seconds(name))
    if name in ("timesteps", "samplers"):
        results["protocol"] = study.protocol_summary()
    markdown = module.write_report(study, results)
    out = report.write(workdir, name, markdown, results)
    print(f"{name}: {out / 'report.md'}", flush=True)
    return results


def _quiet_orbax(record) -> bool:
    return record.levelno >= pylogging.WARNING or "orbax" not in record.pathname


def main(argv):
    cli.parse(FLAGS, argv, __doc__)
    logging.get_absl_handler().addFilter(_quiet_orbax)
    names = list(STUDIES) if FLAGS.study == ["all"] else FLAGS.study
    unknown = [n for n in names if n not in STUDIES]
    if unknown:
        raise SystemExit(f"--study={','.join(FLAGS.study)}: {unknown} are not studies; allowed: "
                         f"{[*STUDIES, 'all']}")
    own = {"timesteps": set(timesteps.BY_NAME), "samplers": set(samplers.NAMES)}
    stray = sorted(set(FLAGS.only) - own["timesteps"] - own["samplers"])
    if stray:
        raise SystemExit(f"--only: {stray} are neither timesteps variants {sorted(own['timesteps'])} nor "
                         f"samplers {list(samplers.NAMES)}")
    if not jax.config.jax_compilation_cache_dir:  # runs of other seeds compile the same programs
        jax.config.update("jax_compilation_cache_dir", os.path.join(FLAGS.workdir, "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    config_name = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "")
    for name in names:
        only = [n for n in FLAGS.only if n in own.get(name, ())]
        run_study(name, FLAGS.config, FLAGS.workdir, FLAGS.seeds, only, config_name)


if __name__ == "__main__":
    cli.run(main)
