"""Runs (or resumes) the whole WMDD pipeline.

    python experiments/distill.py --config experiments/configs/digits.py --workdir runs/digits
    python experiments/distill.py --config experiments/configs/digits.py --workdir DIR \\
        --config.method=random --config.ipc=1 --config.debug=True

Re-running with the same --workdir loads finished stages and continues an interrupted recover;
a finished stage whose settings this run changes is refused, naming the fields and the files to
delete (``<workdir>/fingerprints.json``). One run at a time per workdir (``<workdir>/.lock``).
Several hosts: run the same command in each, with a --workdir they all see; on a cluster JAX
detects (Slurm, Open MPI, TPU VMs) nothing else is needed, elsewhere set WMDD_COORDINATOR=
host0:port, WMDD_NUM_PROCESSES=N and WMDD_PROCESS_ID=i (README, "Scaling out").

Progress: bars on a terminal, plain log lines otherwise (a redirected or SLURM log); metrics as
TensorBoard events in ``<workdir>/tensorboard`` (``tensorboard --logdir <workdir>``) and the
stages' curves in ``<workdir>/curves.png``; wmdd_jax/tracking.py names the metrics and the
WMDD_PROGRESS / WMDD_LOG_SECONDS / WMDD_TENSORBOARD switches.
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
  # Orbax logs every file it writes at INFO; our progress and metric lines (the wmdd_jax
  # logger, wmdd_jax.tracking) stay at INFO.
  logging.set_verbosity(logging.WARNING)
  try:
    pipeline.run(_CONFIG.value, _WORKDIR.value)
  except WMDDError as e:  # made on purpose: the message names the cause and the fix
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
