"""A run's files: where each lives in the working directory, and how each is written and read.

    teacher/              Orbax teacher (wmdd_jax.checkpoint; or config.teacher.checkpoint)
    teacher_metrics.jsonl one line per teacher epoch
    stats.npz             per-class and global BN-input statistics, class counts, labels
    features.npy          penultimate features of the train split (f32[N, d])
    barycenter.npz        per-class barycenter support and weights
    recover_ckpt/         resumable recover state (Orbax, wmdd_jax.checkpoint)
    recover_history.npz   per-step recover loss and terms
    synset/               the synthetic set (Orbax + meta.json, wmdd_jax.checkpoint); grid.png
    syn_data/             the set as the official JPEG folder (recover.store="jpeg")
    eval.json             student results
    metrics.json, timings.json, config.json, curves.png, summary.txt

With several processes every process computes and calls the writers with the same data; process
0 writes (atomically: a temporary file, then a rename) and the others wait for it
(:func:`wmdd_jax.distributed.sharding.sync_processes`), so each file appears once and whole.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np

from wmdd_jax import report
from wmdd_jax.barycenter import Barycenter
from wmdd_jax.distributed import sharding
from wmdd_jax.statistics import ClassStatistics, Features

_STAT_FIELDS = ("mean", "var", "global_mean", "global_var")


@dataclasses.dataclass(frozen=True)
class RunFiles:
  """The paths of a run's files under ``workdir`` (see the module docstring)."""

  workdir: str

  def _path(self, name: str) -> str:
    return os.path.join(self.workdir, name)

  teacher = property(lambda self: self._path("teacher"))
  teacher_metrics = property(lambda self: self._path("teacher_metrics.jsonl"))
  stats = property(lambda self: self._path("stats.npz"))
  features = property(lambda self: self._path("features.npy"))
  barycenter = property(lambda self: self._path("barycenter.npz"))
  recover_ckpt = property(lambda self: self._path("recover_ckpt"))
  recover_history = property(lambda self: self._path("recover_history.npz"))
  synset = property(lambda self: self._path("synset"))
  syn_data = property(lambda self: self._path("syn_data"))
  grid = property(lambda self: self._path("grid.png"))
  eval = property(lambda self: self._path("eval.json"))
  metrics = property(lambda self: self._path("metrics.json"))
  timings = property(lambda self: self._path("timings.json"))
  config = property(lambda self: self._path("config.json"))
  curves = property(lambda self: self._path("curves.png"))
  summary = property(lambda self: self._path("summary.txt"))


def is_primary() -> bool:
  """Whether this process writes the run's files (process 0; every process computes)."""
  return jax.process_index() == 0


def save_npz(path: str, **arrays: Any) -> None:
  """Every process calls it with the same arrays; process 0 writes them (atomically)."""
  if is_primary():
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
  sharding.sync_processes(os.path.basename(path))


def _write_json(path: str, data: Any) -> None:
  if is_primary():
    report.write_json(path, data)


# ----------------------------------------------------------------------------- statistics


def save_statistics(path: str, stats: ClassStatistics, labels: np.ndarray) -> None:
  """stats.npz: ``num_layers``, ``counts``, ``labels`` and ``<field>_<layer>`` for the mean,
  var, global_mean and global_var of every BN layer."""
  arrays = {"num_layers": len(stats.mean), "counts": stats.counts, "labels": labels}
  for name in _STAT_FIELDS:
    for i, a in enumerate(getattr(stats, name)):
      arrays[f"{name}_{i}"] = a
  save_npz(path, **arrays)


def save_features(path: str, features: np.ndarray) -> None:
  """features.npy, written by process 0 (atomically). The single-process statistics pass
  streams it itself (``compute_class_statistics(feature_path=...)``)."""
  if is_primary():
    tmp = f"{path}.tmp-{os.getpid()}.npy"
    np.save(tmp, features)
    os.replace(tmp, path)


def load_statistics(files: RunFiles) -> tuple[ClassStatistics, Features]:
  """stats.npz and features.npy (memory-mapped) as written by the statistics stage."""
  data = np.load(files.stats)
  layers = int(data["num_layers"])
  get = lambda name: tuple(data[f"{name}_{i}"] for i in range(layers))  # noqa: E731
  stats = ClassStatistics(*(get(name) for name in _STAT_FIELDS), data["counts"])
  feats = Features(np.load(files.features, mmap_mode="r"), data["labels"])
  return stats, feats


# ----------------------------------------------------------------------------- barycenters


def save_barycenter(path: str, bary: Barycenter) -> None:
  """barycenter.npz: ``support`` f32[C, k, d] and ``weights`` f32[C, k]."""
  save_npz(path, support=bary.support, weights=bary.weights)


def load_barycenter(path: str) -> Barycenter:
  data = np.load(path)
  return Barycenter(data["support"], data["weights"])


# ----------------------------------------------------------------------------- recover


def save_recover_history(path: str, history: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Writes recover_history.npz and returns what it wrote.

  A resumed recover saw only its last steps (NaN for the others): where an earlier record of the
  same shape is on disk, its values fill those steps.
  """
  if os.path.exists(path):
    with np.load(path) as before:
      history = {k: np.where(np.isnan(v), before[k], v) if k in before.files
                 and before[k].shape == v.shape else v for k, v in history.items()}
  save_npz(path, **history)
  return history


def load_recover_history(path: str) -> dict[str, np.ndarray] | None:
  """recover_history.npz as a dict, or None when there is none (random real images)."""
  if not os.path.exists(path):
    return None
  return dict(np.load(path))


# ----------------------------------------------------------------------------- results


def save_eval(path: str, result: dict[str, Any]) -> None:
  """eval.json: test_top1/top5, best_top1/top5, student, history (one dict per evaluation)."""
  _write_json(path, result)
  sharding.sync_processes(os.path.basename(path))


def load_eval(path: str) -> dict[str, Any] | None:
  """eval.json, or None when the evaluation has not finished."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def read_timings(path: str) -> dict[str, float]:
  """timings.json (seconds per stage) of an earlier, resumed run; {} for a new one."""
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def write_timings(path: str, timings: dict[str, float]) -> None:
  _write_json(path, timings)


def write_metrics(path: str, metrics: dict[str, Any]) -> None:
  """metrics.json (the README's contract: dataset, method, ipc, ..., seconds)."""
  _write_json(path, metrics)


def write_config(path: str, config: Any) -> None:
  """config.json: the run's resolved config."""
  if is_primary():
    with open(path, "w") as f:
      f.write(config.to_json_best_effort(indent=2) if hasattr(config, "to_json_best_effort")
              else json.dumps(dict(config), indent=2, default=str))


def write_text(path: str, text: str) -> None:
  """A text file (summary.txt), written by process 0."""
  if is_primary():
    with open(path, "w") as f:
      f.write(text)


__all__ = ["RunFiles", "is_primary", "load_barycenter", "load_eval", "load_recover_history",
           "load_statistics", "read_timings", "save_barycenter", "save_eval", "save_features",
           "save_npz", "save_recover_history", "save_statistics", "write_config",
           "write_metrics", "write_text", "write_timings"]
