"""Tracking: metrics as TensorBoard events and log lines; progress as bars or periodic lines.

Metric names (TensorBoard tags; stable, the pipeline writes them to ``<workdir>/tensorboard/``):

    tag                    step        what
    teacher/train_loss     epoch       mean training loss of the epoch (cross-entropy)
    teacher/train_top1     epoch       training top-1 of the epoch, augmented batches (%)
    teacher/lr             epoch       learning rate at the epoch's last step
    teacher/images_per_s   epoch       training throughput of the epoch
    teacher/test_top1      epoch       test top-1 (%), at evaluated epochs only
    teacher/test_top5      epoch       test top-5 (%), at evaluated epochs only
    teacher/test_loss      epoch       test cross-entropy, at evaluated epochs only
    recover/loss           iteration   the optimised loss (official: per chunk), mean over chunks
    recover/feature        iteration   the barycenter feature term, per class
    recover/bn             iteration   the BN statistics term, per class
    recover/ce             iteration   the cross-entropy term, per class
    student/train_loss     epoch       mean KD loss of the epoch (every epoch)
    student/test_top1      epoch       test top-1 (%), at evaluated epochs (eval_every) only
    student/test_top5      epoch       test top-5 (%), at evaluated epochs only

Steps are 1-based (epoch 1 is the first epoch). The teacher's and the student's scalars are
written as each epoch ends, from values the loop already brought to the host (no extra device
sync); recover's are written from its per-iteration history when the stage ends (at most
:data:`MAX_POINTS` evenly spaced points per tag, the last one always; its live state is in the
progress lines and ``recover_history.npz`` / ``recover_ckpt/``). A stage that is loaded from the
workdir writes nothing, so a resumed run's events continue where the finished stages left off.
The same values are in ``teacher_metrics.jsonl``, ``recover_history.npz`` and ``eval.json``.

Events are written with ``tf.summary`` (TensorFlow, the ``[tf]`` extra; ``clu.metric_writers``
needs the ``tensorboard`` package, which TensorFlow 2.21 no longer brings). Without TensorFlow
:func:`create_writer` says so in one line and returns a writer that writes nothing: the JSON
files above still hold every metric. ``WMDD_TENSORBOARD=0`` turns events off (and spares the
TensorFlow import, a few seconds). :func:`wmdd_jax.pipeline.run` imports TensorFlow
(:func:`prepare_tensorboard`) before the processes of a multi-process run connect, in each of
them, so that process 0 never starts the stages tens of seconds after the others.

Progress (:func:`progress`): a tqdm bar when stderr is a terminal (or in a notebook); otherwise,
as under SLURM or with output redirected to a file, plain log lines (no carriage returns): one
every ``WMDD_LOG_SECONDS`` seconds (default 60) while a stage runs, one when it ends, and the
stage's metric lines (the teacher's epochs, the student's evaluations). ``WMDD_PROGRESS`` forces
a mode: ``bar``, ``log`` or ``off``. Lines go to the ``wmdd_jax`` logger (:data:`logger`) at
INFO; it is set to INFO when its level is unset, so the lines show even where the root logger is
at WARNING (as the experiment scripts set it, to keep Orbax quiet), and go to stderr when no
logging handler is configured at all. ``logging.getLogger("wmdd_jax").setLevel(logging.WARNING)``
silences them.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

logger = logging.getLogger("wmdd_jax")

TEACHER_TAGS = ("teacher/train_loss", "teacher/train_top1", "teacher/lr", "teacher/images_per_s",
                "teacher/test_top1", "teacher/test_top5", "teacher/test_loss")
RECOVER_TAGS = ("recover/loss", "recover/feature", "recover/bn", "recover/ce")
STUDENT_TAGS = ("student/train_loss", "student/test_top1", "student/test_top5")
TAGS = TEACHER_TAGS + RECOVER_TAGS + STUDENT_TAGS

MAX_POINTS = 1000  # per tag, for histories written at once (TensorBoard keeps 1000 by default)
LOG_SECONDS = 60.0  # default interval between progress lines when stderr is not a terminal
MODES = ("auto", "bar", "log", "off")


# ------------------------------------------------------------------------------- log lines


def _ensure_visible() -> None:
  """Our INFO lines pass even where the root logger is at WARNING (unless a level was set)."""
  if logger.level == logging.NOTSET:
    logger.setLevel(logging.INFO)


def info(message: str, *, stacklevel: int = 1) -> None:
  """Logs ``message`` at INFO on :data:`logger`; to stderr when no handler is configured.

  ``stacklevel`` as :meth:`logging.Logger.info`'s, counted from the caller of this function: the
  record names that caller's file and line (2: the caller's caller).
  """
  _ensure_visible()
  if not logger.isEnabledFor(logging.INFO):
    return
  if logger.hasHandlers():
    logger.info(message, stacklevel=stacklevel + 1)
  else:  # a plain script without logging set up: Python would drop INFO lines
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------- progress


def _in_notebook() -> bool:
  ipython = sys.modules.get("IPython")
  if ipython is None:
    return False
  try:
    shell = ipython.get_ipython()
  except Exception:  # noqa: BLE001 - any failure means: not a notebook
    return False
  return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def progress_mode(enabled: bool = True) -> str:
  """How progress is shown now: ``"bar"``, ``"log"`` or ``"off"``.

  ``WMDD_PROGRESS`` (auto, bar, log, off) decides when set; otherwise a bar when stderr is a
  terminal or this is a notebook, else log lines. ``enabled=False`` is always ``"off"``.
  """
  if not enabled:
    return "off"
  mode = os.environ.get("WMDD_PROGRESS", "auto").strip().lower() or "auto"
  if mode not in MODES:
    raise ValueError(f"WMDD_PROGRESS={mode!r} is not one of {MODES}.")
  if mode != "auto":
    return mode
  stderr = sys.stderr
  tty = bool(getattr(stderr, "isatty", lambda: False)())
  return "bar" if tty or _in_notebook() else "log"


def _log_seconds() -> float:
  raw = os.environ.get("WMDD_LOG_SECONDS", "")
  try:
    return float(raw) if raw.strip() else LOG_SECONDS
  except ValueError:
    raise ValueError(f"WMDD_LOG_SECONDS={raw!r} must be a number of seconds.") from None


def _fmt(value: Any) -> str:
  if isinstance(value, float | np.floating):
    return f"{float(value):.4g}"
  return str(value)


class Progress:
  """A progress display with one interface for the three modes of :func:`progress_mode`.

  ``update(n)`` advances it, ``set_postfix(**values)`` sets what it shows beside the count (no
  output of its own), ``log(message)`` writes a line (above the bar in bar mode, a log line in
  log mode, nothing when off), ``close()`` ends it (log mode: a closing line with the time and
  rate). Also a context manager. ``active`` says whether anything is shown, so a caller can skip
  work (a device sync) done only for the display.
  """

  def __init__(self, total: int | None = None, *, desc: str, unit: str = "it", initial: int = 0,
               leave: bool = True, enabled: bool = True, interval: float | None = None,
               clock: Callable[[], float] = time.monotonic):
    self.mode = progress_mode(enabled)
    self.desc, self.unit, self.total = desc, unit, total
    self.n, self.start_n = int(initial), int(initial)
    self.postfix: dict[str, Any] = {}
    self.interval = _log_seconds() if interval is None else float(interval)
    self._clock = clock
    self._start = self._last = clock()
    self._bar = None
    self._closed = False
    if self.mode == "bar":
      from tqdm.auto import tqdm  # noqa: PLC0415

      self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave,
                       dynamic_ncols=True)

  @property
  def active(self) -> bool:
    return self.mode != "off"

  def update(self, n: int = 1) -> None:
    self.n += int(n)
    if self._bar is not None:
      self._bar.update(n)
    elif self.mode == "log" and n:
      now = self._clock()
      if now - self._last >= self.interval:
        self._last = now
        info(self._line(now), stacklevel=2)  # the record names the stage's line

  def set_postfix(self, **values: Any) -> None:
    self.postfix = {k: v for k, v in values.items() if v is not None}
    if self._bar is not None:
      self._bar.set_postfix({k: _fmt(v) for k, v in self.postfix.items()})

  def log(self, message: str) -> None:
    if self._bar is not None:
      self._bar.write(message, file=sys.stderr)
    elif self.mode == "log":
      info(message, stacklevel=2)

  def _line(self, now: float, done: bool = False) -> str:
    seconds = max(now - self._start, 1e-9)
    rate = (self.n - self.start_n) / seconds
    if done:
      line = (f"{self.desc}: done, {self.n} {self.unit} in {seconds:.1f} s "
              f"({rate:.3g} {self.unit}/s)")
    else:
      line = f"{self.desc}: {self.n}"
      if self.total:
        line += f"/{self.total} {self.unit} ({100.0 * self.n / self.total:.0f}%)"
      else:
        line += f" {self.unit}"
      line += f", {rate:.3g} {self.unit}/s"
      if self.total and rate > 0:
        line += f", {max(self.total - self.n, 0) / rate:.0f} s left"
    if self.postfix:
      line += "; " + ", ".join(f"{k}={_fmt(v)}" for k, v in self.postfix.items())
    return line

  def close(self) -> None:
    self._close()

  def _close(self) -> None:
    if self._closed:
      return
    self._closed = True
    if self._bar is not None:
      self._bar.close()
    elif self.mode == "log" and self.n > self.start_n:
      info(self._line(self._clock(), done=True), stacklevel=3)  # close()'s caller

  def __enter__(self) -> Progress:
    return self

  def __exit__(self, *exc: Any) -> None:
    self._close()


def progress(total: int | None = None, *, desc: str, unit: str = "it", initial: int = 0,
             leave: bool = True, enabled: bool = True, interval: float | None = None) -> Progress:
  """A :class:`Progress`: a tqdm bar on a terminal, periodic log lines otherwise.

  Args:
    total: the count at the end (None: unknown).
    desc: the stage's name, first on every line.
    unit: what is counted ("step", "img", "epoch").
    initial: the count already done (a resumed run).
    leave: keep the bar on screen when it closes (bar mode).
    enabled: False shows nothing (e.g. processes other than 0).
    interval: seconds between log lines (default ``WMDD_LOG_SECONDS`` or 60).
  """
  return Progress(total, desc=desc, unit=unit, initial=initial, leave=leave, enabled=enabled,
                  interval=interval)


def metrics_line(prefix: str, values: Mapping[str, Any]) -> str:
  """``"<prefix>: a 0.512, b 85.1"``: one log line of metrics (floats to 4 significant digits,
  NaN and None left out)."""
  shown = [f"{k} {_fmt(v)}" for k, v in values.items()
           if v is not None and not (isinstance(v, float) and math.isnan(v))]
  return f"{prefix}: " + ", ".join(shown)


# ------------------------------------------------------------------------------- metric writers


class MetricWriter:
  """Where scalars go: ``write_scalars(step, {tag: value})``, then ``flush``/``close``.

  This base class writes nothing (the writer when events are off or TensorFlow is absent).
  """

  logdir: str | None = None

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    del step, scalars

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()


class TensorBoardWriter(MetricWriter):
  """Scalars as TensorBoard events under ``logdir``, through ``tf.summary``.

  TensorFlow is imported here (not at module import) and kept off any GPU, so it never takes
  accelerator memory from JAX. Values are written as float32 scalars with the scalars plugin's
  metadata, what ``tensorboard.summary.scalar`` writes (which itself needs the tensorboard
  package).

  Raises:
    ImportError: TensorFlow is not installed.
  """

  def __init__(self, logdir: str | os.PathLike):
    tf = import_tensorflow()
    from tensorflow.core.framework import summary_pb2  # noqa: PLC0415

    self._tf = tf
    self.logdir = os.fspath(logdir)
    os.makedirs(self.logdir, exist_ok=True)
    self._writer = tf.summary.create_file_writer(self.logdir)
    self._metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
    ).SerializeToString()

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    tf = self._tf
    with self._writer.as_default():
      for tag, value in scalars.items():
        tf.summary.write(tag, tf.constant(float(value), tf.float32), step=int(step),
                         metadata=self._metadata)

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


def import_tensorflow() -> Any:
  """``import tensorflow``, kept off any GPU (so it never takes accelerator memory from JAX).

  Raises:
    ImportError: TensorFlow is not installed.
  """
  import tensorflow as tf  # noqa: PLC0415

  try:
    tf.config.set_visible_devices([], "GPU")
  except (RuntimeError, ValueError):  # TensorFlow already initialised its devices
    pass
  return tf


def prepare_tensorboard() -> bool:
  """Imports TensorFlow now when events are on and it is installed; returns whether it did.

  The import takes seconds (tens under load). A run of several processes does it in every
  process before they connect (:func:`wmdd_jax.pipeline.run`): process 0 importing it alone
  later, as it makes its writer, would reach the first collective that much after the others,
  and a collective's start-up waits only 30 s for the slowest process.
  """
  if not tensorboard_enabled():
    return False
  try:
    import_tensorflow()
  except ImportError:
    return False
  return True


def tensorboard_enabled() -> bool:
  """False when ``WMDD_TENSORBOARD`` is 0/false/off/no."""
  return os.environ.get("WMDD_TENSORBOARD", "1").strip().lower() not in ("0", "false", "off",
                                                                         "no")


def create_writer(logdir: str | os.PathLike | None, *,
                  log: Callable[[str], Any] = info) -> MetricWriter:
  """A :class:`TensorBoardWriter` for ``logdir``, or a writer that writes nothing.

  Args:
    logdir: the events directory; None: no events.
    log: where the one line saying events are not written goes.

  Returns:
    The TensorBoard writer; without TensorFlow (or with ``WMDD_TENSORBOARD=0``, or no
    ``logdir``) a :class:`MetricWriter` that writes nothing.
  """
  if logdir is None or not tensorboard_enabled():
    return MetricWriter()
  try:
    return TensorBoardWriter(logdir)
  except ImportError as e:
    log(f"TensorBoard events are not written ({e}): install TensorFlow for them (pip install "
        "tensorflow-cpu, or the [tf] extra); the metrics are in the run's JSON files either "
        "way. WMDD_TENSORBOARD=0 turns events off without this line.")
    return MetricWriter()


def write_history(writer: MetricWriter, prefix: str, history: Mapping[str, Any], *,
                  max_points: int = MAX_POINTS) -> None:
  """Writes per-iteration arrays as ``<prefix>/<name>`` at steps 1..T.

  At most ``max_points`` evenly spaced steps per name (the last one always); NaN entries (steps
  a resumed run did not see) are skipped.
  """
  arrays = {k: np.asarray(v, np.float64).reshape(-1) for k, v in history.items()}
  length = max((a.size for a in arrays.values()), default=0)
  if length == 0:
    return
  steps = np.unique(np.round(np.linspace(0, length - 1, min(length, max_points))).astype(int))
  for i in steps:
    values = {f"{prefix}/{k}": float(a[i]) for k, a in arrays.items()
              if i < a.size and np.isfinite(a[i])}
    if values:
      writer.write_scalars(int(i) + 1, values)
  writer.flush()


def read_scalars(logdir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
  """The scalars of every events file under ``logdir`` (TensorFlow needed): tag -> [(step,
  value)], in the order written (files by name)."""
  import tensorflow as tf  # noqa: PLC0415
  from tensorflow.core.util import event_pb2  # noqa: PLC0415

  out: dict[str, list[tuple[int, float]]] = {}
  paths = sorted(os.path.join(root, name) for root, _, names in os.walk(os.fspath(logdir))
                 for name in names if "tfevents" in name)
  for path in paths:
    for record in tf.data.TFRecordDataset(path):
      event = event_pb2.Event.FromString(record.numpy())
      for value in event.summary.value:
        if value.HasField("tensor"):
          number = float(tf.make_ndarray(value.tensor))
        else:
          number = float(value.simple_value)
        out.setdefault(value.tag, []).append((int(event.step), number))
  return out


__all__ = ["LOG_SECONDS", "MAX_POINTS", "RECOVER_TAGS", "STUDENT_TAGS", "TAGS", "TEACHER_TAGS",
           "MetricWriter", "Progress", "TensorBoardWriter", "create_writer", "import_tensorflow",
           "info", "logger", "metrics_line", "prepare_tensorboard", "progress", "progress_mode",
           "read_scalars", "tensorboard_enabled", "write_history"]
