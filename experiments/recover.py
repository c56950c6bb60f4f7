"""Teacher + dataset in, synthetic set out: every stage up to recover, no student evaluation.

    python experiments/recover.py --config experiments/configs/digits.py --workdir runs/digits \\
        [--config.teacher.checkpoint=runs/teacher/teacher]

Writes ``<workdir>/synset`` (Orbax SyntheticSet: images, labels, barycenter weights, class names)
and ``<workdir>/grid.png`` (classes x IPC). The teacher is loaded from ``teacher.checkpoint`` (or
``<workdir>/teacher``) when it exists, else trained. Re-running resumes; running
``experiments/distill.py`` on the same workdir afterwards only adds the evaluation.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from wmdd_jax import pipeline
from wmdd_jax.errors import WMDDError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for every stage's outputs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  try:
    pipeline.run(_CONFIG.value, _WORKDIR.value, evaluate=False)
  except WMDDError as e:  # made on purpose: the message names the cause and the fix
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
