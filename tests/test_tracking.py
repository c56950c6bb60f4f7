"""Tracking: progress as bars or plain log lines, TensorBoard events, matplotlib curves."""

import io
import logging
import math
import os
import sys

import numpy as np
import pytest
from PIL import Image

from wmdd_jax import report, tracking


class _Recorder(tracking.MetricWriter):
  def __init__(self):
    self.calls = []

  def write_scalars(self, step, scalars):
    self.calls.append((step, dict(scalars)))


class _Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


class _Terminal(io.StringIO):
  def isatty(self):
    return True


@pytest.fixture(autouse=True)
def _auto_progress(monkeypatch):
  for name in ("WMDD_PROGRESS", "WMDD_LOG_SECONDS", "WMDD_TENSORBOARD"):
    monkeypatch.delenv(name, raising=False)


def test_mode_follows_the_terminal_and_the_environment(monkeypatch):
  monkeypatch.setattr(sys, "stderr", io.StringIO())
  assert tracking.progress_mode() == "log"
  assert tracking.progress_mode(enabled=False) == "off"
  monkeypatch.setattr(sys, "stderr", _Terminal())
  assert tracking.progress_mode() == "bar"
  monkeypatch.setenv("WMDD_PROGRESS", "log")
  assert tracking.progress_mode() == "log"
  monkeypatch.setenv("WMDD_PROGRESS", "sometimes")
  with pytest.raises(ValueError, match="WMDD_PROGRESS"):
    tracking.progress_mode()


def test_log_mode_writes_periodic_plain_lines(monkeypatch, caplog):
  stderr = io.StringIO()
  monkeypatch.setattr(sys, "stderr", stderr)
  clock = _Clock()
  caplog.set_level(logging.INFO, logger="wmdd_jax")
  with tracking.Progress(100, desc="recover", unit="step", interval=30, clock=clock) as bar:
    assert bar.mode == "log" and bar.active
    for _ in range(10):
      clock.now += 10.0  # a line every third update (30 s)
      bar.set_postfix(loss=1.23456, chunk=0)
      bar.update(10)
    bar.log("recover: a metric line")
  lines = [r.getMessage() for r in caplog.records if r.name == "wmdd_jax"]
  assert lines[0] == "recover: 30/100 step (30%), 1 step/s, 70 s left; loss=1.235, chunk=0"
  assert len([x for x in lines if "step/s" in x]) == 4  # 30, 60, 90 steps, and the closing line
  assert "recover: a metric line" in lines
  assert lines[-1].startswith("recover: done, 100 step in 100.0 s")
  assert "\r" not in stderr.getvalue() and "\r" not in "".join(lines)


def test_lines_reach_stderr_without_any_logging_setup(monkeypatch):
  stderr = io.StringIO()
  monkeypatch.setattr(sys, "stderr", stderr)
  monkeypatch.setattr(tracking.logger, "hasHandlers", lambda: False)
  tracking.info("teacher epoch 1/2: train_loss 0.5")
  assert stderr.getvalue() == "teacher epoch 1/2: train_loss 0.5\n"


def test_bar_mode_draws_a_bar_and_off_mode_nothing(monkeypatch, caplog):
  terminal = _Terminal()
  monkeypatch.setattr(sys, "stderr", terminal)
  caplog.set_level(logging.INFO, logger="wmdd_jax")
  with tracking.progress(5, desc="teacher", unit="step") as bar:
    assert bar.mode == "bar"
    bar.update(5)
    bar.log("teacher epoch 1/1: train_loss 0.5")
  assert "teacher" in terminal.getvalue() and "train_loss 0.5" in terminal.getvalue()
  assert not [r for r in caplog.records if r.name == "wmdd_jax"]  # the bar shows it instead
  quiet = tracking.progress(5, desc="teacher", enabled=False)
  quiet.update(5)
  quiet.log("nothing")
  quiet.close()
  assert not quiet.active and "nothing" not in terminal.getvalue()


def test_teacher_and_student_without_a_terminal_log_lines(monkeypatch, caplog):
  """A real (tiny) teacher and student with stderr redirected: log lines, no carriage returns,
  and their scalars reach the writer under the documented tags."""
  from sklearn.datasets import load_digits

  from wmdd_jax.evaluate import EvaluateOptions, train_student
  from wmdd_jax.models import get_model
  from wmdd_jax.teacher import TeacherOptions, train_teacher

  stderr = io.StringIO()
  monkeypatch.setattr(sys, "stderr", stderr)
  monkeypatch.setenv("WMDD_LOG_SECONDS", "0")  # a line on every update
  caplog.set_level(logging.INFO, logger="wmdd_jax")
  d = load_digits()
  x = np.round(d.images * (255 / 16)).astype(np.uint8)[..., None]
  y = d.target.astype(np.int32)
  model = get_model("convnet", 10, depth=1, width=8)
  writer = _Recorder()
  options = TeacherOptions(epochs=2, batch_size=64, learning_rate=0.05, max_steps_per_epoch=3,
                           eval_every=1, max_eval_batches=1, eval_batch_size=128, flip=False)
  variables = train_teacher(model, (x[:512], y[:512]), (x[512:], y[512:]), options,
                            mean=(0.3,), std=(0.3,), writer=writer)
  assert [step for step, _ in writer.calls] == [1, 2]
  assert set(writer.calls[-1][1]) == set(tracking.TEACHER_TAGS)
  student = EvaluateOptions(epochs=2, batch_size=20, eval_every=2, eval_batch_size=128)
  images = np.random.default_rng(0).normal(size=(10, 2, 8, 8, 1)).astype(np.float32)
  writer.calls.clear()
  train_student(model, model, variables, images, None, (x[512:700], y[512:700]), mean=(0.3,),
                std=(0.3,), options=student, writer=writer)
  assert [step for step, _ in writer.calls] == [1, 2]
  assert set(writer.calls[0][1]) == {"student/train_loss"}
  assert set(writer.calls[1][1]) == set(tracking.STUDENT_TAGS)
  lines = [r.getMessage() for r in caplog.records if r.name == "wmdd_jax"]
  assert any(x.startswith("teacher: 3/6 step (50%)") for x in lines), lines
  assert any(x.startswith("teacher epoch 2/2: train_loss ") and "test_top1" in x for x in lines)
  assert any(x.startswith("teacher: done, 6 step in ") for x in lines)
  assert any(x.startswith("student epoch 2/2: train_loss ") for x in lines)
  assert any(x.startswith("student: done, 2 epoch in ") for x in lines)
  assert "\r" not in stderr.getvalue() and "\r" not in "".join(lines)
  # Each record names the stage's own line, not the tracking module's.
  files = {r.getMessage().split(" ")[0].rstrip(":"): r.filename for r in caplog.records
           if r.name == "wmdd_jax"}
  assert files == {"teacher": "teacher.py", "student": "evaluate.py"}


def test_write_history_subsamples_and_skips_nan():
  writer = _Recorder()
  loss = np.linspace(5.0, 1.0, 2500)
  loss[:10] = np.nan  # steps a resumed run did not see
  tracking.write_history(writer, "recover", {"loss": loss, "bn": np.ones(2500)}, max_points=100)
  steps = [s for s, _ in writer.calls]
  assert len(steps) == 100 and steps[0] == 1 and steps[-1] == 2500
  assert steps == sorted(steps)
  assert set(writer.calls[0][1]) == {"recover/bn"}  # step 1's loss is NaN
  assert writer.calls[-1][1] == {"recover/loss": 1.0, "recover/bn": 1.0}
  empty = _Recorder()
  tracking.write_history(empty, "recover", {})
  assert not empty.calls


def test_writer_without_tensorflow_says_so_once(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "tensorflow", None)  # import tensorflow -> ImportError
  lines = []
  writer = tracking.create_writer(tmp_path / "tb", log=lines.append)
  assert type(writer) is tracking.MetricWriter and writer.logdir is None
  writer.write_scalars(1, {"teacher/train_loss": 1.0})
  writer.close()
  assert len(lines) == 1 and "TensorBoard events are not written" in lines[0]
  assert "tensorflow-cpu" in lines[0] and not os.path.exists(tmp_path / "tb")
  monkeypatch.setenv("WMDD_TENSORBOARD", "0")
  assert type(tracking.create_writer(tmp_path / "tb", log=lines.append)) is tracking.MetricWriter
  assert len(lines) == 1  # turned off on purpose: nothing to say
  assert type(tracking.create_writer(None)) is tracking.MetricWriter
  assert not tracking.prepare_tensorboard()  # off
  monkeypatch.setenv("WMDD_TENSORBOARD", "1")
  assert not tracking.prepare_tensorboard()  # not installed


def test_tensorboard_events_read_back(tmp_path):
  pytest.importorskip("tensorflow")
  with tracking.create_writer(tmp_path / "tb") as writer:
    assert isinstance(writer, tracking.TensorBoardWriter)
    writer.write_scalars(1, {"teacher/train_loss": 2.5, "teacher/test_top1": 50.0})
    writer.write_scalars(2, {"teacher/train_loss": 1.25})
    tracking.write_history(writer, "recover", {"loss": [3.0, np.nan, 1.0]})
  files = os.listdir(tmp_path / "tb")
  assert len(files) == 1 and "tfevents" in files[0]
  scalars = tracking.read_scalars(tmp_path / "tb")
  assert scalars == {"teacher/train_loss": [(1, 2.5), (2, 1.25)],
                     "teacher/test_top1": [(1, 50.0)], "recover/loss": [(1, 3.0), (3, 1.0)]}


def test_metrics_line():
  line = tracking.metrics_line("student epoch 3/10", {"train_loss": 0.123456, "test_top1": 91.0,
                                                       "skipped": math.nan, "none": None})
  assert line == "student epoch 3/10: train_loss 0.1235, test_top1 91"


def test_smooth_is_a_nan_aware_centred_mean():
  y = np.array([1.0, 2.0, np.nan, 4.0, 5.0])
  np.testing.assert_allclose(report.smooth(y, 3), [1.5, 1.5, 3.0, 4.5, 4.5])
  np.testing.assert_allclose(report.smooth(y, 1), [1.0, 2.0, np.nan, 4.0, 5.0])
  assert np.isnan(report.smooth([np.nan, np.nan], 3)).all()


def test_curves_are_drawn_by_matplotlib(tmp_path):
  steps = np.arange(1, 1001)
  rng = np.random.default_rng(0)
  loss = 50.0 * np.exp(-steps / 200) + 0.5 + rng.uniform(0, 1, steps.size)
  panels = [
      ("teacher top-1", {"train": ([1, 2, 3], [50.0, 80.0, 90.0]), "test": ([3], [92.0])},
       {"xlabel": "epoch", "ylabel": "top-1 (%)", "yscale": "linear"}),
      ("recover", {"loss": (steps, loss), "ce": (steps, np.full(steps.size, np.nan))},
       {"xlabel": "iteration"}),
      ("student top-1 (%)", {"top1": ([25, 50], [80.0, 85.0])}),  # the old two-item form
  ]
  path = tmp_path / "curves.png"
  report.save_curves(path, panels)
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with Image.open(path) as img:
    assert img.size == (3 * 480, 340)
    assert img.info.get("Software", "").startswith("Matplotlib")
    pixels = np.asarray(img.convert("L"))
  assert (pixels < 128).mean() > 0.01  # axes, labels and curves were drawn
  assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
  assert report._log_scale_helps([loss]) and not report._log_scale_helps([np.array([1.0, -1])])
