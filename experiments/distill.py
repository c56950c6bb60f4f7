"""Runs (or resumes) the whole WMDD pipeline.

    python experiments/distill.py --config experiments/configs/digits.py --workdir runs/digits
    python experiments/distill.py --config experiments/configs/digits.py --workdir DIR \\
        --config.method=random --config.ipc=1 --config.debug=True

Re-running with the same --workdir loads finished stages and continues an interrupted recover.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from wmdd_jax import pipeline

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for every stage's outputs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  pipeline.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
