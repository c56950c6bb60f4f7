"""Trains (squeezes) the teacher of an experiment config and saves it to ``WORKDIR/teacher``.

    python experiments/pretrain.py --config experiments/configs/digits.py --workdir runs/digits
    python experiments/pretrain.py --config experiments/configs/cifar10.py --workdir runs/c10 \\
        --config.teacher.epochs=50 --config.teacher.model_options.stem=cifar
    python experiments/pretrain.py --config experiments/configs/digits.py --workdir /tmp/d \\
        --config.debug=True        # shrunk: 2 epochs of at most 20 steps, 2 eval batches

The pipeline's teacher stage and nothing after it (``pipeline.run(..., stop_after="teacher")``):
writes ``WORKDIR/teacher`` (Orbax; what ``experiments/distill.py`` with the same workdir then
loads instead of training; or ``--config.teacher.checkpoint``) and
``WORKDIR/teacher_metrics.jsonl`` (one line per epoch), plus the run's ``config.json`` and
``timings.json``. A split too large for memory is streamed. An existing teacher is kept: delete
it to train again. Each config's docstring gives its expected runtime and accuracy. The meta is
:func:`wmdd_jax.checkpoint.teacher_meta`'s, so
``wmdd_jax.checkpoint.build_teacher(WORKDIR/teacher)`` rebuilds the model from the file alone.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from wmdd_jax import pipeline
from wmdd_jax.errors import WMDDError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the teacher and its metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  config = _CONFIG.value
  if config.debug:
    config = pipeline.debug_config(config)
    config.teacher.max_eval_batches = 2  # per-epoch evaluations on two batches only
  workdir = _WORKDIR.value
  path = config.teacher.checkpoint or os.path.join(workdir, "teacher")
  if os.path.exists(path):
    logging.info("A teacher already exists at %s; delete it to train again.", path)
    return
  try:
    out = pipeline.run(config, workdir, stop_after="teacher", log=logging.info)
  except WMDDError as e:  # made on purpose: the message names the cause and the fix
    sys.exit(f"error: {e}")
  print(f"teacher: {config.teacher.model} test top-1 {out['teacher_top1']:.2f}% "
        f"top-5 {out['teacher_top5']:.2f}%; saved to {out['teacher']}")


if __name__ == "__main__":
  app.run(main)
