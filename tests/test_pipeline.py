"""The one-command pipeline on real digits: every stage, the metrics contract, resume."""

import json
import os
import shutil

import numpy as np
import pytest

from wmdd_jax import ConfigError, artefacts, checkpoint, fingerprints, pipeline

CONTRACT = ("dataset", "method", "ipc", "num_classes", "seed", "test_top1", "test_top5",
            "best_top1", "seconds")


def _config(method="wmdd"):
  c = pipeline.default_config()
  c.method = method
  c.ipc = 2
  c.dataset.spec = "digits"
  c.teacher.model = "convnet"
  c.teacher.model_options = {"depth": 2, "width": 16}
  c.teacher.epochs = 4
  c.teacher.batch_size = 64
  c.teacher.learning_rate = 0.05
  c.teacher.crop_padding = 1
  c.recover.iterations = 50
  c.recover.steps_per_call = 10
  c.recover.checkpoint_every = 20
  c.recover.lr = 0.1
  c.recover.r_bn = 1.0
  c.recover.crop_scale = (0.5, 1.0)
  c.eval.epochs = 3
  c.eval.eval_every = 3
  return c


@pytest.fixture(scope="module")
def wmdd_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("wmdd"))
  metrics = pipeline.run(_config(), workdir, log=lambda *_: None)
  return workdir, metrics


def test_metrics_contract_and_files(wmdd_run):
  workdir, metrics = wmdd_run
  with open(os.path.join(workdir, "metrics.json")) as f:
    on_disk = json.load(f)
  for key in CONTRACT:
    assert key in on_disk, key
  assert on_disk["dataset"] == "digits" and on_disk["ipc"] == 2 and on_disk["num_classes"] == 10
  assert 0 <= on_disk["test_top1"] <= 100 and on_disk["test_top1"] <= on_disk["test_top5"]
  for stage in ("teacher", "statistics", "barycenter", "recover", "evaluate"):
    assert on_disk["seconds"][stage] > 0, stage
  for name in ("grid.png", "curves.png", "summary.txt", "synset/meta.json", "stats.npz",
               "barycenter.npz"):
    assert os.path.exists(os.path.join(workdir, name)), name


def test_tensorboard_events_and_matplotlib_curves(wmdd_run):
  """The short run's TensorBoard events hold every stage's scalars under the documented tags,
  matching the JSON files; curves.png is matplotlib's, one panel per stage."""
  from PIL import Image

  from wmdd_jax import tracking

  workdir, metrics = wmdd_run
  with Image.open(os.path.join(workdir, "curves.png")) as img:
    assert img.info.get("Software", "").startswith("Matplotlib")
    assert img.size == (3 * 480, 340)  # teacher, recover, student
  events = os.path.join(workdir, "tensorboard")
  assert any("tfevents" in name for name in os.listdir(events))
  pytest.importorskip("tensorflow")
  scalars = tracking.read_scalars(events)
  assert set(scalars) <= set(tracking.TAGS)
  assert [s for s, _ in scalars["teacher/train_loss"]] == [1, 2, 3, 4]
  assert [s for s, _ in scalars["teacher/test_top1"]] == [4]  # the last epoch is evaluated
  assert scalars["teacher/test_top1"][0][1] == pytest.approx(metrics["teacher_top1"], abs=1e-4)
  assert [s for s, _ in scalars["recover/loss"]] == list(range(1, 51))
  h = np.load(os.path.join(workdir, "recover_history.npz"))
  np.testing.assert_allclose([v for _, v in scalars["recover/bn"]], h["bn"], rtol=1e-6)
  assert [s for s, _ in scalars["student/train_loss"]] == [1, 2, 3]
  assert scalars["student/test_top1"] == [(3, pytest.approx(metrics["test_top1"], abs=1e-4))]


def test_recover_on_digits_lowers_feature_and_bn_terms(wmdd_run):
  workdir, _ = wmdd_run
  h = np.load(os.path.join(workdir, "recover_history.npz"))
  assert h["feature"][-5:].mean() < 0.8 * h["feature"][:5].mean()
  assert h["bn"][-5:].mean() < 0.8 * h["bn"][:5].mean()


def test_rerun_resumes_without_redoing_stages(wmdd_run):
  workdir, metrics = wmdd_run
  lines = []
  again = pipeline.run(_config(), workdir, log=lines.append)
  assert again["test_top1"] == metrics["test_top1"]
  assert again["seconds"] == metrics["seconds"]  # nothing re-timed: every stage was loaded
  assert any("teacher: loaded" in str(x) for x in lines)
  assert any("synthetic set: loaded" in str(x) for x in lines)


def test_rerun_with_another_objective_refuses_the_saved_set(wmdd_run):
  workdir, _ = wmdd_run
  c = _config()
  c.recover.objective = "per_class"
  with pytest.raises(ConfigError, match="objective='official'.*new --workdir"):
    pipeline.run(c, workdir, log=lambda *_: None)


def test_random_baseline_reuses_teacher(wmdd_run, tmp_path):
  workdir, _ = wmdd_run
  c = _config("random")
  c.teacher.checkpoint = os.path.join(workdir, "teacher")
  m = pipeline.run(c, str(tmp_path), log=lambda *_: None)
  assert m["method"] == "random" and "teacher" not in m["seconds"]
  assert not os.path.exists(tmp_path / "stats.npz")


def test_real_init_starts_from_the_random_baselines_images(wmdd_run, tmp_path):
  """recover.init="real" starts from exactly the images method "random" picks with that seed,
  so wmdd-from-real and random differ only by the recover stage (a paired comparison)."""
  workdir, _ = wmdd_run
  sets = {}
  for method in ("random", "wmdd"):
    c = _config(method)
    c.teacher.checkpoint = os.path.join(workdir, "teacher")
    c.recover.init = "real"
    c.recover.iterations, c.recover.steps_per_call, c.recover.checkpoint_every = 10, 10, 10
    c.recover.lr = 1e-6  # Adam moves each pixel by at most ~lr per step
    pipeline.run(c, str(tmp_path / method), stop_after="synset", log=lambda *_: None)
    sets[method] = np.asarray(
        checkpoint.load_synthetic_set(str(tmp_path / method / "synset")).images)
  np.testing.assert_allclose(sets["wmdd"], sets["random"], atol=1e-4)
  assert np.abs(sets["random"]).max() > 0.1  # real images, not an all-zero start


def test_stop_after_teacher_runs_the_teacher_stage_only(wmdd_run, tmp_path):
  """What experiments/pretrain.py runs: the teacher stage (here: loaded), nothing after it."""
  workdir, metrics = wmdd_run
  c = _config()
  c.teacher.checkpoint = os.path.join(workdir, "teacher")
  out = pipeline.run(c, str(tmp_path), stop_after="teacher", log=lambda *_: None)
  assert out["teacher"] == c.teacher.checkpoint
  assert out["teacher_top1"] == metrics["teacher_top1"] and "teacher" not in out["seconds"]
  assert not os.path.exists(tmp_path / "stats.npz") and not os.path.exists(tmp_path / "synset")
  with pytest.raises(ConfigError, match="stop_after"):
    pipeline.run(c, str(tmp_path), stop_after="recover", log=lambda *_: None)


def _synset(workdir):
  return np.asarray(checkpoint.load_synthetic_set(os.path.join(workdir, "synset")).images)


def test_shared_statistics_give_the_same_set_and_stay_independent(wmdd_run, tmp_path):
  """fingerprints.share_statistics: a run reading another run's statistics pass makes exactly
  the set it makes computing its own; recomputing in it never touches the source's files."""
  workdir, _ = wmdd_run
  c = _config("ce_pcbn")
  c.teacher.checkpoint = os.path.join(workdir, "teacher")
  c.recover.iterations, c.recover.steps_per_call, c.recover.checkpoint_every = 10, 10, 10
  source_sha = artefacts.file_sha256(os.path.join(workdir, "features.npy"))
  own, shared = str(tmp_path / "own"), str(tmp_path / "shared")
  pipeline.run(c, own, stop_after="synset", log=lambda *_: None)
  assert fingerprints.share_statistics(workdir, shared)
  assert os.path.samefile(os.path.join(workdir, "features.npy"),
                          os.path.join(shared, "features.npy"))
  lines = []
  m = pipeline.run(c, shared, stop_after="synset", log=lines.append)
  assert "statistics: loaded" in lines and "statistics" not in m["seconds"]
  np.testing.assert_array_equal(_synset(shared), _synset(own))
  # A second share into a workdir that holds a run changes nothing.
  assert not fingerprints.share_statistics(workdir, shared)
  assert not fingerprints.share_statistics(str(tmp_path / "nothing"), str(tmp_path / "new"))
  # Recompute in the shared workdir (its stats.npz deleted): a new features.npy, the source's
  # bytes untouched.
  os.remove(os.path.join(shared, "stats.npz"))
  shutil.rmtree(os.path.join(shared, "synset"))
  m = pipeline.run(c, shared, stop_after="synset", log=lambda *_: None)
  assert m["seconds"]["statistics"] > 0
  assert not os.path.samefile(os.path.join(workdir, "features.npy"),
                              os.path.join(shared, "features.npy"))
  assert artefacts.file_sha256(os.path.join(workdir, "features.npy")) == source_sha


def test_shared_statistics_of_other_data_are_refused(wmdd_run, tmp_path):
  """The shared pass is checked like the run's own: other train data is a ConfigError naming
  the field, before any stage computes."""
  from bench.sweep import with_validation_split
  workdir, _ = wmdd_run
  c = _config("ce_pcbn")
  c.teacher.checkpoint = os.path.join(workdir, "teacher")
  c = with_validation_split(c, 0.2)  # a smaller train split
  assert fingerprints.share_statistics(workdir, str(tmp_path))
  with pytest.raises(ConfigError, match="statistics stage: .*train"):
    pipeline.run(c, str(tmp_path), log=lambda *_: None)
  assert not os.path.exists(tmp_path / "synset")


def test_tensorflow_is_imported_before_the_processes_connect(monkeypatch, tmp_path):
  """Process 0 must not import TensorFlow (seconds) alone after the processes connect: the others
  would wait for it in their first collective, which times out after 30 s."""
  from wmdd_jax import tracking
  from wmdd_jax.distributed import sharding

  calls = []
  monkeypatch.setattr(tracking, "prepare_tensorboard", lambda: calls.append("tensorflow"))
  monkeypatch.setattr(sharding, "initialize_distributed", lambda: calls.append("connect"))
  with pytest.raises(ConfigError, match="config.method"):
    pipeline.run(_config("magic"), str(tmp_path), log=lambda *_: None)
  assert calls == ["tensorflow", "connect"]


def test_unknown_method():
  c = _config("magic")
  with pytest.raises(ConfigError, match="config.method"):
    pipeline.run(c, "/tmp/never-used-wmdd", log=lambda *_: None)


def test_debug_runs_use_work_units_unless_set():
  c = pipeline.default_config()
  assert pipeline.work_units(c) == 0  # full runs: sharded programs
  assert pipeline.work_units(pipeline.debug_config(c)) == 4  # debug: device-count independent
  with c.unlocked():
    c.parallel.units = 2
  assert pipeline.work_units(pipeline.debug_config(c)) == 2
  with c.unlocked():
    c.parallel.units = -1
  with pytest.raises(ConfigError, match="units must be an int"):
    pipeline.run(c, "/tmp/never-used-wmdd", log=lambda *_: None)


def test_distill_script_debug_writes_metrics(tmp_path):
  import subprocess
  import sys

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [sys.executable, os.path.join(root, "experiments", "distill.py"),
         "--config", os.path.join(root, "experiments", "configs", "digits.py"),
         "--workdir", str(tmp_path), "--config.debug=True", "--config.ipc=2",
         "--config.recover.objective=official", "--config.recover.store=jpeg"]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "metrics.json") as f:
    metrics = json.load(f)
  for key in CONTRACT:
    assert key in metrics, key
  assert metrics["ipc"] == 2 and metrics["method"] == "wmdd"
  # recover.store=jpeg: the set the student saw is exactly the decoded official-layout JPEGs.
  from wmdd_jax import checkpoint, store
  synset = checkpoint.load_synthetic_set(str(tmp_path / "synset"))
  pixels, ids = store.read_image_folder(str(tmp_path / "syn_data"), channels=1)
  assert list(ids) == list(range(10)) and pixels.shape[:2] == (10, 2)
  np.testing.assert_array_equal(
      synset.images, store.normalize_like_official(pixels, synset.mean, synset.std))
  assert synset.config["objective"] == "official" and synset.config["store"] == "jpeg"


def test_method_switches_set_the_official_table3_terms():
  c = _config()
  expected = {  # (feature term, BN statistics, CE weight, first-BN multiplier, layout)
      "wmdd": ("barycenter", "class", 1.0, 1.0, "class"),  # data_synthesis_new.py --wb true
      "ce_pcbn": ("none", "class", 1.0, 1.0, "class"),  # data_synthesis_new.py --wb false
      "wass_bn": ("barycenter", "running", 0.0, 10.0, "slot"),  # data_synthesis.py --wb true
      "sre2l": ("none", "running", 1.0, 10.0, "slot"),  # data_synthesis.py --wb false
  }
  assert set(expected) == set(pipeline.TABLE3_METHODS)
  for method, terms in expected.items():
    with c.unlocked():
      c.method = method
    o = pipeline.recover_options(c)
    assert (o.feature_target, o.bn_stats, o.r_ce, o.first_bn_multiplier, o.layout) == terms
    assert o.objective == "official"
  # The per-class objective has no CE by default; explicit settings win over the method's.
  with c.unlocked():
    c.method = "wmdd"
    c.recover.objective = "per_class"
  assert pipeline.recover_options(c).r_ce == 0.0
  with c.unlocked():
    c.method = "sre2l"
    c.recover.bn_stats = "global"
    c.recover.first_bn_multiplier = 1.0
  o = pipeline.recover_options(c)
  assert (o.bn_stats, o.first_bn_multiplier, o.layout) == ("global", 1.0, "slot")
  with c.unlocked():
    c.recover.objective = "oficial"
  with pytest.raises(ConfigError, match="objective"):
    pipeline.run(c, "/tmp/never-used-wmdd", log=lambda *_: None)


@pytest.mark.parametrize("field, value, match", [
    ("ipc", 0, "ipc=0 must be an int >= 1"),
    ("ipc", 10_000, "exceeds the"),
    ("eval.lr", -1.0, "EvaluateOptions"),
    ("eval.model", "resnet7", "Unknown model"),
    ("teacher.epochs", 0, "TeacherOptions"),
    ("recover.iterations", 0, "iterations"),
    ("recover.feature_target", "barycentre", "feature_target"),
])
def test_bad_config_fails_before_any_stage(tmp_path, field, value, match):
  import time

  c = _config()
  with c.unlocked():
    section, _, name = field.rpartition(".")
    (c[section] if section else c)[name] = value
  start = time.perf_counter()
  with pytest.raises(ConfigError, match=match):
    pipeline.run(c, str(tmp_path), log=lambda *_: None)
  assert time.perf_counter() - start < 5
  assert not os.path.exists(tmp_path / "teacher")
