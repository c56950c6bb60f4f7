"""Reruns, bad inputs, kills and corruptions: the pipeline never silently reuses results made with
other settings (stage fingerprints), checks every option before it touches the workdir, holds one
run per workdir, names the damaged file and the fix, never saves a non-finite set, and reports
workdir problems as WorkdirError."""

import errno
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from wmdd_jax import artefacts, checkpoint, pipeline
from wmdd_jax.errors import CheckpointError, ConfigError, NonFiniteError, WMDDError


def _config(**changes):
  """A tiny digits run (seconds per stage on CPU)."""
  c = pipeline.default_config()
  c.method = "wmdd"
  c.ipc = 2
  c.dataset.spec = "digits"
  c.teacher.model = "convnet"
  c.teacher.model_options = {"depth": 2, "width": 8}
  c.teacher.epochs = 1
  c.teacher.max_steps_per_epoch = 4
  c.teacher.batch_size = 64
  c.recover.iterations = 4
  c.recover.steps_per_call = 2
  c.recover.checkpoint_every = 2
  c.eval.epochs = 1
  c.eval.eval_every = 1
  c.eval.batch_size = 10
  with c.unlocked():
    for field, value in changes.items():
      section, _, name = field.rpartition(".")
      (c[section] if section else c)[name] = value
  return c


def _quiet(*_):
  pass


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished run's workdir (copy it before changing anything) and its metrics."""
  workdir = str(tmp_path_factory.mktemp("finished") / "run")
  metrics = pipeline.run(_config(), workdir, log=_quiet)
  return workdir, metrics


@pytest.fixture
def copy(finished, tmp_path):
  """A fresh copy of the finished workdir."""
  target = str(tmp_path / "run")
  shutil.copytree(finished[0], target)
  return target


def _read(path):
  with open(path, "rb") as f:
    return f.read()


def _drop(workdir, *names):
  for name in names:
    path = os.path.join(workdir, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)


# ------------------------------------------------------------------ A. stage fingerprints


def test_finished_run_records_every_stage(finished):
  workdir, _ = finished
  with open(os.path.join(workdir, "fingerprints.json")) as f:
    data = json.load(f)
  assert set(data["stages"]) == {"teacher", "statistics", "barycenter", "synset", "evaluate"}
  assert set(data["files"]) == {"stats.npz", "features.npy", "barycenter.npz"}
  assert data["files"]["stats.npz"] == artefacts.file_sha256(os.path.join(workdir, "stats.npz"))
  assert "training" in data["stages"]["teacher"]  # trained into the workdir
  assert not os.path.exists(os.path.join(workdir, ".lock"))  # released


def test_rerun_loads_and_changes_nothing(finished, copy):
  before = {n: _read(os.path.join(copy, n)) for n in ("fingerprints.json", "config.json")}
  lines = []
  again = pipeline.run(_config(), copy, log=lines.append)
  assert again["test_top1"] == finished[1]["test_top1"]
  assert "evaluation: loaded" in lines and "synthetic set: loaded" in lines
  for name, data in before.items():
    assert _read(os.path.join(copy, name)) == data, name


def test_changed_settings_are_refused_and_config_json_kept(copy):
  config_json = _read(os.path.join(copy, "config.json"))
  c = _config(**{"eval.model": "resnet18", "recover.r_bn": 5.0})
  with pytest.raises(ConfigError) as e:
    pipeline.run(c, copy, log=_quiet)
  message = str(e.value)
  assert "synset stage: recover.r_bn=10.0 -> 5.0" in message
  assert "evaluate stage: eval.model='convnet' -> 'resnet18'" in message
  assert "new --workdir" in message and os.path.join(copy, "eval.json") in message
  assert _read(os.path.join(copy, "config.json")) == config_json  # still describes the results


def test_another_ipc_is_refused_at_the_barycenters(copy):
  with pytest.raises(ConfigError, match=r"barycenter stage: ipc=2 -> 1.*barycenter\.npz"):
    pipeline.run(_config(ipc=1), copy, log=_quiet)


def test_teacher_training_settings_are_checked(copy):
  with pytest.raises(ConfigError, match=r"teacher stage: teacher\.epochs=1 -> 3.*teacher"):
    pipeline.run(_config(**{"teacher.epochs": 3}), copy, log=_quiet)


def test_result_neutral_fields_do_not_invalidate(finished, copy):
  c = _config(**{"recover.steps_per_call": 1, "recover.checkpoint_every": 7, "recover.scan": True,
                 "eval.progress": False, "eval.eval_batch_size": 7, "parallel.units": 2,
                 "barycenter.classes_per_batch": 3, "teacher.eval_every": 9})
  assert pipeline.run(c, copy, log=_quiet)["test_top1"] == finished[1]["test_top1"]
  with open(os.path.join(copy, "config.json")) as f:
    assert json.load(f)["recover"]["steps_per_call"] == 1  # the latest invocation


def test_a_deleted_stage_keeps_its_record_for_the_stages_after_it(copy):
  """stats.npz deleted and stats.batch_size changed: barycenter.npz was made from the old
  statistics, so it is refused (before anything is recomputed)."""
  _drop(copy, "stats.npz", "features.npy")
  with pytest.raises(ConfigError, match=r"barycenter stage: stats\.batch_size=256 -> 128"):
    pipeline.run(_config(**{"stats.batch_size": 128}), copy, log=_quiet)
  assert not os.path.exists(os.path.join(copy, "stats.npz"))


def test_a_changed_external_teacher_is_refused(copy, tmp_path):
  teacher = str(tmp_path / "external_teacher")
  shutil.move(os.path.join(copy, "teacher"), teacher)
  c = _config(**{"teacher.checkpoint": teacher})
  pipeline.run(c, copy, log=_quiet)  # the same weights, from elsewhere: accepted
  variables, meta = checkpoint.load_teacher(teacher)
  variables = jax.tree.map(lambda a: np.asarray(a) + 1e-3, variables)
  checkpoint.save_teacher(teacher, variables, meta, overwrite=True)
  with pytest.raises(ConfigError, match=r"statistics stage: teacher\.weights="):
    pipeline.run(c, copy, log=_quiet)


def test_workdir_without_fingerprints_resumes_and_is_recorded(finished, copy):
  _drop(copy, "fingerprints.json")
  assert pipeline.run(_config(), copy, log=_quiet)["test_top1"] == finished[1]["test_top1"]
  with open(os.path.join(copy, "fingerprints.json")) as f:
    assert {"teacher", "synset", "evaluate"} <= set(json.load(f)["stages"])
  with pytest.raises(ConfigError, match="ipc=2 -> 1"):  # checked from then on
    pipeline.run(_config(ipc=1), copy, log=_quiet)


def test_damaged_fingerprints_file(copy):
  with open(os.path.join(copy, "fingerprints.json"), "w") as f:
    f.write('{"stages": ')
  with pytest.raises(CheckpointError, match="fingerprints.json is damaged.*Delete it"):
    pipeline.run(_config(), copy, log=_quiet)


# ------------------------------------------------------------------ B. options before compute


@pytest.mark.parametrize("field, value, match", [
    ("ipc", 0, "ipc=0 must be an int >= 1"),
    ("ipc", -1, "ipc=-1 must be an int >= 1"),
    ("eval.lr", -1.0, "lr must be > 0"),
    ("eval.crop_scale", (1.0, 0.5), "crop_scale"),
    ("eval.model", "foo", "foo"),
    ("teacher.model", "foo", "foo"),
    ("recover.iterations", 0, "iterations"),
    ("recover.feature_target", "barycentre", "feature_target"),
    ("recover.jpeg_quality", 0, r"jpeg_quality=0 must be an int in \[1, 100\]"),
    ("recover.class_chunk", -1, "class_chunk=-1"),
    ("recover.checkpoint_every", 0, "checkpoint_every=0"),
    ("barycenter.classes_per_batch", 0, "classes_per_batch=0"),
    ("stats.batch_size", 0, "batch_size"),
    ("parallel.mesh", "sometimes", "mesh"),
])
def test_bad_option_fails_before_the_workdir_is_touched(tmp_path, field, value, match):
  workdir = tmp_path / "run"
  with pytest.raises(ConfigError, match=match):
    pipeline.run(_config(**{field: value}), str(workdir), log=_quiet)
  assert not workdir.exists() or set(os.listdir(workdir)) <= {"config.json"}


def _retagged_teacher(finished, tmp_path, **meta_changes):
  variables, meta = checkpoint.load_teacher(os.path.join(finished[0], "teacher"))
  path = str(tmp_path / "teacher")
  checkpoint.save_teacher(path, variables, {**meta, **meta_changes})
  return path


def test_teacher_for_another_dataset_is_refused(finished, tmp_path):
  path = _retagged_teacher(finished, tmp_path, dataset="npz:/data/other.npz")
  with pytest.raises(ConfigError, match=r"dataset 'npz:/data/other.npz' \(config.dataset.spec="
                                        r"'digits'"):
    pipeline.run(_config(**{"teacher.checkpoint": path}), str(tmp_path / "run"), log=_quiet)
  assert not os.path.exists(tmp_path / "run" / "stats.npz")


def test_teacher_for_another_image_size_is_refused(finished, tmp_path):
  path = _retagged_teacher(finished, tmp_path, image_shape=[16, 16, 1])
  with pytest.raises(ConfigError, match=r"16x16 input images \(the dataset's are 8x8"):
    pipeline.run(_config(**{"teacher.checkpoint": path}), str(tmp_path / "run"), log=_quiet)


# ------------------------------------------------------------------ C. one run per workdir


def test_a_second_run_on_a_locked_workdir_fails_fast(copy):
  with artefacts.WorkdirLock(os.path.join(copy, ".lock")):
    with pytest.raises(artefacts.WorkdirBusyError, match=rf"pid {os.getpid()} on host"):
      pipeline.run(_config(), copy, log=_quiet)
  pipeline.run(_config(), copy, log=_quiet)  # released: runs


def test_the_lock_is_held_by_another_process(tmp_path):
  """A real second process: it names the holder; once the holder is gone the lock is free."""
  lock_path = str(tmp_path / ".lock")
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time\nfrom wmdd_jax import artefacts\n"
       f"artefacts.WorkdirLock({lock_path!r}).acquire()\nprint('held', flush=True)\n"
       "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(artefacts.WorkdirBusyError, match=rf"pid {holder.pid} on host"):
      artefacts.WorkdirLock(lock_path).acquire()
  finally:
    holder.kill()
    holder.wait()
  lines = []
  lock = artefacts.WorkdirLock(lock_path, log=lines.append)
  lock.acquire()  # the killed holder left its file behind: taken over, with a log line
  assert any(f"pid {holder.pid}" in line and "taking over" in line for line in lines)
  lock.release()
  assert not os.path.exists(lock_path)


def test_killed_writers_temporaries_are_removed(copy):
  leftovers = ["stats.npz.tmp-99999.npz", "eval.json.tmp-4242", "features.npy.tmp-7.npy",
               ".syn_data.tmp-ab12cd34", "synset.old-31337"]
  for name in leftovers:
    with open(os.path.join(copy, name), "w") as f:
      f.write("half")
  os.makedirs(os.path.join(copy, "synset.tmp-12345", "arrays"))
  chunk = os.path.join(copy, "recover_ckpt", "chunk_0000")
  os.makedirs(os.path.join(chunk, "6.orbax-checkpoint-tmp", "default"))
  os.makedirs(os.path.join(copy, "teacher.orbax-checkpoint-tmp-1733100000"))
  lines = []
  pipeline.run(_config(), copy, log=lines.append)
  left = set(os.listdir(copy))
  assert not left & {*leftovers, "synset.tmp-12345", "teacher.orbax-checkpoint-tmp-1733100000"}
  assert not any("tmp" in name for name in os.listdir(chunk))
  assert any("temporary" in line for line in lines)


# ------------------------------------------------------------------ D. damaged artefacts


def _truncate(path, keep=0.5):
  data = _read(path)
  with open(path, "wb") as f:
    f.write(data[:int(len(data) * keep)])


def _flip(path, offset=-9):
  data = bytearray(_read(path))
  data[offset] ^= 0xFF
  with open(path, "wb") as f:
    f.write(bytes(data))


def _reopen_statistics(copy):
  """Drop the stages after the barycenters, so that a rerun reads the arrays back."""
  _drop(copy, "synset", "recover_ckpt", "recover_history.npz", "eval.json")


@pytest.mark.parametrize("name, damage, match", [
    ("stats.npz", _truncate, r"stats\.npz.*delete .*stats\.npz and .*features\.npy to recompute "
                             "the statistics stage"),
    ("stats.npz", _flip, r"stats\.npz is not the file the statistics stage wrote"),
    ("features.npy", _truncate, r"features\.npy.*statistics stage"),
    ("features.npy", _flip, r"features\.npy is not the file the statistics stage wrote"),
    ("features.npy", os.remove, r"features\.npy is missing"),
    ("barycenter.npz", _truncate, r"barycenter\.npz.*to recompute the barycenter stage"),
    ("barycenter.npz", _flip, r"barycenter\.npz is not the file the barycenter stage wrote"),
])
def test_damaged_arrays_name_the_file_and_the_fix(copy, name, damage, match):
  _reopen_statistics(copy)
  damage(os.path.join(copy, name))
  with pytest.raises(CheckpointError, match=match):
    pipeline.run(_config(), copy, log=_quiet)


@pytest.mark.parametrize("name, damage", [
    ("stats.npz", _truncate), ("features.npy", _truncate), ("features.npy", os.remove),
    ("barycenter.npz", _truncate)])
def test_damaged_arrays_without_recorded_hashes_still_fail_cleanly(copy, name, damage):
  """A workdir from before fingerprints (no hashes): the reader itself names the file."""
  _reopen_statistics(copy)
  _drop(copy, "fingerprints.json")
  damage(os.path.join(copy, name))
  with pytest.raises(CheckpointError, match=rf"{name} is missing, truncated or corrupt .*"
                                            "to recompute the"):
    pipeline.run(_config(), copy, log=_quiet)


@pytest.mark.parametrize("content", ["", '{"test_top1": 5', "{}", "[1, 2]",
                                     '{"test_top1": 1, "test_top5": 2, "best_top1": 1, '
                                     '"best_top5": 2, "history": [{"x": 1}]}'])
def test_damaged_eval_json(copy, content):
  with open(os.path.join(copy, "eval.json"), "w") as f:
    f.write(content)
  with pytest.raises(CheckpointError, match=r"eval\.json.*delete .*eval\.json to recompute the "
                                            "evaluate stage"):
    pipeline.run(_config(), copy, log=_quiet)


def test_damaged_recover_history(copy):
  _truncate(os.path.join(copy, "recover_history.npz"))
  with pytest.raises(CheckpointError, match=r"recover_history\.npz is truncated.*delete it"):
    pipeline.run(_config(), copy, log=_quiet)


@pytest.mark.parametrize("content", ["", '{"teacher": ', '["x"]'])
def test_damaged_timings_are_reset_with_a_warning(finished, copy, content):
  with open(os.path.join(copy, "timings.json"), "w") as f:
    f.write(content)
  lines = []
  metrics = pipeline.run(_config(), copy, log=lines.append)
  assert metrics["test_top1"] == finished[1]["test_top1"] and metrics["seconds"] == {}
  assert any("timings.json is damaged" in str(line) for line in lines)


# ------------------------------------------------------------------ E. finite synthetic sets


def test_a_non_finite_synthetic_set_is_never_saved(finished, tmp_path, monkeypatch):
  real = pipeline._random_real

  def broken(*args, **kwargs):
    images = real(*args, **kwargs)
    images[3, 0, 0, 0, 0] = np.nan
    images[7, 1] = np.inf
    return images

  monkeypatch.setattr(pipeline, "_random_real", broken)
  c = _config(method="random", **{"teacher.checkpoint": os.path.join(finished[0], "teacher")})
  with pytest.raises(NonFiniteError, match=r"2 of 10 classes: 3 \(3\), 7 \(7\)"):
    pipeline.run(c, str(tmp_path / "run"), log=_quiet)
  assert not os.path.exists(tmp_path / "run" / "synset")


# ------------------------------------------------------------------ F. workdir problems


def test_workdir_that_is_a_file(tmp_path):
  path = tmp_path / "a_file"
  path.write_text("not a directory")
  with pytest.raises(artefacts.WorkdirError, match=f"{path} is an existing file"):
    pipeline.run(_config(), str(path), log=_quiet)


def test_full_disk_is_a_workdir_error_naming_the_path(tmp_path, monkeypatch):
  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(np, "savez", full)
  path = str(tmp_path / "stats.npz")
  with pytest.raises(artefacts.WorkdirError, match=f"Could not write {path}.*free disk space"):
    artefacts.save_npz(path, a=np.zeros(3))
  assert os.listdir(tmp_path) == []  # no temporary left behind
  monkeypatch.setattr("builtins.open", full)
  with pytest.raises(artefacts.WorkdirError, match="eval.json"):
    artefacts.save_eval(str(tmp_path / "eval.json"), {"test_top1": 1.0})


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory_is_detected(tmp_path):
  os.chmod(tmp_path, 0o555)
  try:
    assert artefacts.prepare_workdir(str(tmp_path)) is False
    with pytest.raises(artefacts.WorkdirError, match="not writable"):
      pipeline.run(_config(), str(tmp_path), log=_quiet)
  finally:
    os.chmod(tmp_path, 0o755)


def test_finished_run_on_read_only_storage_is_read(finished, copy, monkeypatch):
  """Every stage done and nothing writable: the metrics are printed, nothing is written."""
  monkeypatch.setattr(artefacts, "prepare_workdir", lambda path: False)
  with open(os.path.join(copy, "timings.json"), "w") as f:  # must stay as it is
    f.write("{}")
  before = {n: _read(os.path.join(copy, n)) for n in sorted(os.listdir(copy))
            if os.path.isfile(os.path.join(copy, n))}
  lines = []
  metrics = pipeline.run(_config(), copy, log=lines.append)
  assert metrics["test_top1"] == finished[1]["test_top1"]
  assert any("read-only" in line for line in lines)
  assert any("student test top-1" in line for line in lines)
  after = {n: _read(os.path.join(copy, n)) for n in sorted(os.listdir(copy))
           if os.path.isfile(os.path.join(copy, n))}
  assert after == before
  _drop(copy, "eval.json")
  with pytest.raises(artefacts.WorkdirError, match="evaluate stage"):
    pipeline.run(_config(), copy, log=_quiet)


def test_a_full_disk_under_orbax_is_a_workdir_error(finished, tmp_path, monkeypatch):
  def full(*args, **kwargs):
    raise ValueError('RESOURCE_EXHAUSTED: Failed writing: "x": No space left on device')

  monkeypatch.setattr(checkpoint, "save_synthetic_set", full)
  c = _config(method="random", **{"teacher.checkpoint": os.path.join(finished[0], "teacher")})
  with pytest.raises(artefacts.WorkdirError, match="the disk is full.*free disk space"):
    pipeline.run(c, str(tmp_path / "run"), log=_quiet)


def test_errors_are_wmdd_errors():
  for cls in (artefacts.WorkdirError, artefacts.WorkdirBusyError):
    assert issubclass(cls, WMDDError) and issubclass(cls, OSError)
