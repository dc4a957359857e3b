"""Launch an experiment from an ml_collections config.

    python -m experiments.main --config=experiments/configs/fashion_mnist.py --workdir=runs/fmnist \
        [--config.training.batch_size=64 ...]

``--mode=train`` (default) trains, resuming from the latest checkpoint in ``--workdir`` if there is one.
Several processes (a TPU pod slice, or several GPU hosts) are joined through ``jax.distributed`` when the
environment configures them (see ``diffjax.sharding.initialize_distributed``).
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (experiments/configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard events and samples.")
flags.DEFINE_enum("mode", "train", ["train"], "What to run.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from diffjax import sharding
    from diffjax.data import describe_dataset
    from diffjax.train import Trainer
    from experiments.configs import validate_config

    sharding.initialize_distributed()
    config = FLAGS.config
    try:  # bad input fails here, in one line, before anything is compiled
        validate_config(config)
        describe_dataset(config.data, config.data.train_split)
        trainer = Trainer(config)
    except (ValueError, OSError) as e:  # OSError: a missing dataset directory or config file
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    logging.info("config:\n%s", config)
    if FLAGS.mode == "train":
        trainer.train(FLAGS.workdir)


def parse_flags(argv):
    """absl's flag parsing, with a bad flag or config override (an unknown key, a wrong type) reported as one
    line on stderr and exit status 2 instead of a traceback."""
    try:
        return FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        msg = " ".join(str(e).replace("\\n", " ").replace("'", "").replace("\\", "").split())
        what = "unknown config key" if isinstance(e, (AttributeError, KeyError)) else "bad flag"
        print(f"error: {what}: {msg}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
