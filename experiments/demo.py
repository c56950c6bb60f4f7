"""`make demo`: WMDD against random real images on scikit-learn's digits, offline, IPC 10.

    python experiments/demo.py --workdir demo_out

Trains one teacher, then runs the whole pipeline for each method under the same protocol, prints
a table of student test top-1 and writes ``<workdir>/demo.json``. Re-running resumes.
Each method's curves are in ``<workdir>/<method>/curves.png``; ``tensorboard --logdir <workdir>``
shows both methods' TensorBoard events side by side (the teacher's under the first method).
"""

import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from wmdd_jax import pipeline, report
from wmdd_jax.errors import WMDDError

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "configs", "digits.py"),
    "Experiment config file.", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", "demo_out", "Output directory.")
_METHODS = flags.DEFINE_list("methods", ["wmdd", "random"], "Methods to compare.")


def main(argv):
  del argv
  # Orbax logs every file it writes at INFO; our progress and metric lines (the wmdd_jax
  # logger, wmdd_jax.tracking) stay at INFO.
  logging.set_verbosity(logging.WARNING)
  start = time.perf_counter()
  root = os.path.abspath(_WORKDIR.value)
  rows = []
  teacher = ""
  for method in _METHODS.value:
    config = _CONFIG.value.copy_and_resolve_references()
    config.method = method
    if teacher:
      config.teacher.checkpoint = teacher
    try:
      metrics = pipeline.run(config, os.path.join(root, method))
    except WMDDError as e:  # made on purpose: the message names the cause and the fix
      sys.exit(f"error: {e}")
    teacher = teacher or os.path.join(root, method, "teacher")
    rows.append(metrics)
  seconds = time.perf_counter() - start
  lines = [f"{'method':<8} {'IPC':>4} {'test top-1':>11} {'best top-1':>11}"]
  lines += [f"{m['method']:<8} {m['ipc']:>4} {m['test_top1']:>10.2f}% {m['best_top1']:>10.2f}%"
            for m in rows]
  teacher_top1 = rows[0].get("teacher_top1")
  lines.append(f"teacher ({_CONFIG.value.teacher.model}) test top-1: {teacher_top1:.2f}%"
               if teacher_top1 is not None else "teacher: loaded")
  lines.append(f"wall time {seconds:.0f} s; files under {root}/<method>/ "
               "(metrics.json, grid.png, curves.png, summary.txt, tensorboard/)")
  print("\n".join(lines))
  report.write_json(os.path.join(root, "demo.json"), {"rows": rows, "seconds": seconds})


if __name__ == "__main__":
  app.run(main)
