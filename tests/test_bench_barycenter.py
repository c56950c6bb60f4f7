"""bench/barycenter.py --study features: a tiny labelled feature set end to end."""

import json
import sys

import jax
import numpy as np
import pytest

from bench import barycenter as bench
from wmdd_jax.barycenter import free_support_barycenter


def _features(tmp_path):
  """3 classes of 40-70 post-ReLU points in d=6 (unequal sizes), rows shuffled; the labels are
  stored as a workdir's stats.npz stores them."""
  rng = np.random.default_rng(0)
  counts = (40, 70, 55)
  labels = np.repeat(np.arange(3), counts)
  centers = 3.0 * rng.normal(size=(3, 6))
  feats = np.maximum(centers[labels] + rng.normal(size=(labels.size, 6)), 0.0).astype(np.float32)
  order = rng.permutation(labels.size)
  np.save(tmp_path / "features.npy", feats[order])
  np.savez(tmp_path / "stats.npz", labels=labels[order], counts=np.asarray(counts))
  return feats[order], labels[order]


def test_features_study_writes_ratios_to_pot(tmp_path, monkeypatch):
  feats, labels = _features(tmp_path)
  out = tmp_path / "features.json"
  monkeypatch.setattr(sys, "argv", [
      "barycenter", "--study", "features", "--features", str(tmp_path / "features.npy"),
      "--labels", f"{tmp_path / 'stats.npz'}:labels", "--ks", "3", "--keys", "1",
      "--out", str(out)])
  bench.main()
  result = json.loads(out.read_text())
  assert result["config"]["shape"] == [165, 6] and result["config"]["ks"] == [3]
  by_method = {e["method"]: e for e in result["summary"]}
  assert set(bench.FEATURE_METHODS) <= set(by_method)
  # The summary is taken from the per-class rows: POT's spread and each method's median.
  rows = result["per_class"]
  assert [len(r["pot_w2"]) for r in rows] == [2, 2, 2]
  spread = by_method["POT's worse run / its better run"]
  assert spread["w2_ratio_median"] == pytest.approx(
      np.median([max(r["pot_w2"]) / min(r["pot_w2"]) for r in rows]))
  for name in bench.FEATURE_METHODS:
    assert by_method[name]["runs"] == 3  # 3 classes x 1 key
    assert by_method[name]["w2_ratio_median"] == pytest.approx(
        np.median([r[name][0] for r in rows]))
  # The stored ratio of class 1 is the default's exact W2^2 over POT's better run, the class
  # solved from fold_in(key(0), 1) as class_barycenters solves it.
  row = next(r for r in rows if r["class"] == 1)
  points = feats[labels == 1]
  assert row["n"] == 70
  bary = free_support_barycenter(points, 3, jax.random.fold_in(jax.random.key(0), 1))
  w2 = bench.exact_w2(bary.support, bary.weights, points)
  assert row["default"][0] == pytest.approx(w2 / min(row["pot_w2"]), rel=1e-4)


def test_load_labels_names_the_missing_array(tmp_path):
  np.savez(tmp_path / "stats.npz", labels=np.arange(4))
  np.save(tmp_path / "labels.npy", np.arange(5))
  assert bench.load_labels(f"{tmp_path / 'stats.npz'}:labels").tolist() == [0, 1, 2, 3]
  assert bench.load_labels(str(tmp_path / "labels.npy")).tolist() == [0, 1, 2, 3, 4]
  with pytest.raises(SystemExit, match=r"stats\.npz:<key>, one of \['labels'\]"):
    bench.load_labels(f"{tmp_path / 'stats.npz'}:y")
