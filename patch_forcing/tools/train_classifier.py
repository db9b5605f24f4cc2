"""Train the small classifier whose features give FID/precision/recall on digits and MNIST.

  python -m patch_forcing.tools.train_classifier --config=configs/digits.py --workdir=/tmp/pf_digits
  python -m patch_forcing.tools.train_classifier --config=configs/mnist.py --workdir=/tmp/pf_mnist \
      --config.data.data_dir=/path/to/mnist

writes <workdir>/classifier/{params.npz, classifier.json} (architecture, data splits, seed and the
test accuracy on `config.data.split_eval`). `--mode=evaluate` trains it itself when
`config.eval.feature_network='auto'` and it is absent.
"""

from __future__ import annotations

from absl import flags
from etils import epath
from ml_collections import config_flags

from patch_forcing.evaluation import features
from patch_forcing.tools import cli

FLAGS = flags.FlagValues()
config_flags.DEFINE_config_file("config", None, "Config file (a .py with get_config()); its data block is used.",
                                flag_values=FLAGS)
flags.DEFINE_string("workdir", None, "Writes <workdir>/classifier.", flag_values=FLAGS)
flags.DEFINE_integer("steps", 0, f"Training steps (0: {features.DEFAULT_STEPS}).", flag_values=FLAGS)
flags.DEFINE_integer("seed", None, "Seed (default: config.seed).", flag_values=FLAGS)
flags.mark_flags_as_required(["config", "workdir"], flag_values=FLAGS)


def main(argv):
    cli.parse(FLAGS, argv, __doc__)
    config = FLAGS.config
    out = str(epath.Path(FLAGS.workdir) / "classifier")
    meta = features.train_classifier(config.data, out, FLAGS.steps or None,
                                     config.seed if FLAGS.seed is None else FLAGS.seed)
    print(f"wrote {out}: test accuracy {meta['test_accuracy']:.4f}")


if __name__ == "__main__":
    cli.run(main)
