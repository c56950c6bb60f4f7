"""Stage fingerprints: which config fields and inputs each stage's saved results depend on.

A run's ``fingerprints.json`` holds, per stage (:data:`FINGERPRINT_STAGES`), a record of exactly
the fields it depends on and the records of the stages it reads (:func:`stage_records`), plus the
sha256 of the arrays later stages read. Before any stage computes, :class:`Ledger` compares the
saved records with this run's: a stage whose fields changed is refused with a ConfigError naming
the fields (old -> new) and the files to delete, never silently reused. Fields that cannot change
results (:data:`wmdd_jax.config.RESULT_NEUTRAL`) are left out; a workdir written before
fingerprints existed is accepted and recorded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from typing import Any

import jax
import numpy as np

from wmdd_jax import artefacts, methods
from wmdd_jax import config as config_lib
from wmdd_jax.artefacts import RunFiles
from wmdd_jax.errors import ConfigError, WMDDError
from wmdd_jax.report import jsonable

# The stages with a record in fingerprints.json, in run order (later ones read earlier ones).
FINGERPRINT_STAGES = ("teacher", "statistics", "barycenter", "synset", "evaluate")


def _canonical(value: Any) -> Any:
  """``value`` as it reads back from JSON (tuples as lists, numpy scalars as numbers)."""
  return json.loads(json.dumps(value, sort_keys=True, default=jsonable))


def _record(fields: dict[str, Any], inputs: dict[str, Any] | None = None) -> dict[str, Any]:
  """A stage's record: its fields, the records of the stages it reads, and a short hash of both
  (the stage's fingerprint)."""
  fields = _canonical(fields)
  inputs = dict(inputs or {})
  digest = json.dumps({"fields": fields, "inputs": {k: r["fingerprint"] for k, r in
                                                    sorted(inputs.items())}}, sort_keys=True)
  return {"fingerprint": hashlib.sha256(digest.encode()).hexdigest()[:16], "fields": fields,
          "inputs": inputs}


def _section_fields(section: str, values: dict[str, Any]) -> dict[str, Any]:
  """Section values as fingerprint fields: RESULT_NEUTRAL ones left out, DERIVED ones (the
  stages' seed) under their top-level name."""
  neutral = config_lib.RESULT_NEUTRAL.get(section, ())
  derived = config_lib.DERIVED.get(section, {})
  return {derived.get(k, f"{section}.{k}"): v for k, v in values.items() if k not in neutral}


def _data_fields(config, dataset, which: str) -> dict[str, Any]:
  """The data a stage reads: spec, options (less RESULT_NEUTRAL), split and its size."""
  split = config_lib.split(config, which)
  neutral = config_lib.RESULT_NEUTRAL["dataset.options"]
  options = {k: v for k, v in config_lib.plain(config.dataset.options).items() if k not in neutral}
  try:
    count = int(dataset.num_examples(split))
  except WMDDError:  # no such split (a run that stops before the evaluation)
    count = None
  return {"dataset.spec": config.dataset.spec, "dataset.options": options,
          f"dataset.{which}_split": split, f"data.{which}_images": count}


def _workdir_teacher(config, files: RunFiles) -> bool:
  """Whether the teacher lives in (and is trained into) the workdir's teacher/."""
  path = config.teacher.checkpoint
  return not path or os.path.abspath(path) == files.teacher


def _teacher_record(config, weights: str | None = None) -> dict[str, Any]:
  fields = {"teacher.model": config.teacher.model,
            "teacher.model_options": config_lib.plain(config.teacher.model_options)}
  if weights is not None:
    fields["teacher.weights"] = weights
  return _record(fields)


def _teacher_training(config, dataset) -> dict[str, Any]:
  """What a teacher trained into the workdir depends on (checked when it is loaded again)."""
  options = dataclasses.asdict(config_lib.options(config, "teacher"))
  return _canonical({"teacher.model": config.teacher.model,
                     "teacher.model_options": config_lib.plain(config.teacher.model_options),
                     **_section_fields("teacher", options), **_data_fields(config, dataset,
                                                                           "train")})


def weights_sha256(variables: Any) -> str:
  """The sha256 of a teacher's variables (every leaf's path, dtype, shape and bytes)."""
  tree = jax.device_get({"params": variables["params"],
                         "batch_stats": variables.get("batch_stats", {})})
  leaves = [(jax.tree_util.keystr(path, simple=True, separator="/"), np.asarray(leaf))
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]
  digest = hashlib.sha256()
  for name, leaf in sorted(leaves, key=lambda item: item[0]):
    digest.update(f"{name}:{leaf.dtype.str}{list(leaf.shape)};".encode())
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()


def stage_records(config: Any, dataset: Any, teacher_weights: str | None = None
                  ) -> dict[str, dict[str, Any]]:
  """Each stage's fingerprint record for ``config`` (the stages its method runs).

  The fields, less :data:`wmdd_jax.config.RESULT_NEUTRAL` (``data.*`` are the split sizes):

    teacher     teacher.model, teacher.model_options, teacher.weights (sha256 of the variables);
                trained into the workdir, also (checked when it is loaded again) every
                TeacherOptions field, seed, dataset.spec/options/train_split, data.train_images
    statistics  dataset.spec/options/train_split, data.train_images, stats.*; + teacher
    barycenter  ipc, seed, barycenter.* (with learn_weights); + statistics
    synset      method, ipc, seed, dataset.spec/options/train_split, data.train_images; with
                recover: the resolved RecoverOptions (recover.*), recover.class_chunk,
                recover.store (+ jpeg_quality for "jpeg"); + teacher, and statistics and
                barycenter where the method reads them
    evaluate    eval.* (EvaluateOptions), seed, eval.model and eval.model_options (the student,
                resolved), dataset.spec/options/test_split, data.test_images; + synset, teacher

  Args:
    config: a complete run config.
    dataset: the run's dataset (for the split sizes).
    teacher_weights: the teacher's :func:`weights_sha256`; None while it is not loaded (then
      not compared).
  """
  method = methods.get_method(config.method)
  ipc, seed = int(config.ipc), int(config.seed)
  train = _data_fields(config, dataset, "train")
  teacher = _teacher_record(config, teacher_weights)
  records = {"teacher": teacher}
  fields = {"method": config.method, "ipc": ipc, "seed": seed, **train}
  inputs = {}
  if method.runs_recover:
    options = config_lib.recover_options(config)
    fields.update(_section_fields("recover", dataclasses.asdict(options)))
    fields["recover.class_chunk"] = int(config.recover.class_chunk)
    fields["recover.store"] = config.recover.store
    if config.recover.store == "jpeg":
      fields["recover.jpeg_quality"] = int(config.recover.jpeg_quality)
    inputs["teacher"] = teacher
    if method.needs_statistics(options):
      stats_options = dataclasses.asdict(config_lib.options(config, "stats"))
      records["statistics"] = inputs["statistics"] = _record(
          {**train, **_section_fields("stats", stats_options)}, {"teacher": teacher})
    if method.needs_barycenters(options):
      values = config_lib.section_values(config, "barycenter")
      records["barycenter"] = inputs["barycenter"] = _record(
          {"ipc": ipc, "seed": seed, **_section_fields("barycenter", values)},
          {"statistics": records["statistics"]})
  records["synset"] = _record(fields, inputs)
  student, student_options = config_lib.student(config)
  eval_options = dataclasses.asdict(config_lib.options(config, "eval"))
  records["evaluate"] = _record(
      {**_section_fields("eval", eval_options), "eval.model": student,
       "eval.model_options": student_options, **_data_fields(config, dataset, "test")},
      {"synset": records["synset"], "teacher": teacher})
  return records


def _changes(old: dict[str, Any], new: dict[str, Any], out: list | None = None) -> list:
  """(field, old value, new value) where a saved record and this run's differ, through the
  stages it read. A field only one of them has (one a newer wmdd_jax added, or one not known
  yet: the teacher's weights before it is loaded) is not compared."""
  out = [] if out is None else out
  seen = {name for name, _, _ in out}
  before = old.get("fields", {})
  for name, value in new.get("fields", {}).items():
    if name in before and before[name] != value and name not in seen:
      out.append((name, before[name], value))
      seen.add(name)
  old_inputs, new_inputs = old.get("inputs", {}), new.get("inputs", {})
  for name in sorted(old_inputs.keys() | new_inputs.keys()):
    if name in old_inputs and name in new_inputs:
      if old_inputs[name].get("fingerprint") != new_inputs[name].get("fingerprint"):
        _changes(old_inputs[name], new_inputs[name], out)
    elif f"uses the {name} stage" not in seen:
      out.append((f"uses the {name} stage", name in old_inputs, name in new_inputs))
      seen.add(f"uses the {name} stage")
  return out


def _show(value: Any) -> str:
  if isinstance(value, bool):
    return "yes" if value else "no"
  text = repr(value)
  return text if len(text) <= 40 else text[:37] + "..."


def _present(stage: str, config, files: RunFiles) -> bool:
  """Whether the workdir holds results (finished or partial) of ``stage``."""
  if stage == "teacher":
    return _workdir_teacher(config, files) and os.path.exists(files.teacher)
  paths = {"statistics": (files.stats,), "barycenter": (files.barycenter,),
           "synset": (files.synset, files.recover_ckpt, files.recover_history),
           "evaluate": (files.eval,)}[stage]
  return any(os.path.exists(p) for p in paths)


def _stale(stale: list[tuple[str, list]], config, files: RunFiles) -> ConfigError:
  """The error for saved results computed with other settings: ``stale`` lists (stage, its
  changes), earliest stage first."""
  parts = []
  for stage, changes in stale:
    shown = ", ".join(f"{name}={_show(old)} -> {_show(new)}" for name, old, new in changes[:12])
    if len(changes) > 12:
      shown += f" (and {len(changes) - 12} more)"
    parts.append(f"the {stage} stage: {shown}" if shown
                 else f"the {stage} stage: made from the stage(s) above")
  first = stale[0][0]
  paths = []
  for later in FINGERPRINT_STAGES[FINGERPRINT_STAGES.index(first):]:
    if later == "teacher" and not _workdir_teacher(config, files):
      continue
    paths += [os.path.join(files.workdir, name) for name in artefacts.STAGE_FILES[later]
              if os.path.exists(os.path.join(files.workdir, name))]
  return ConfigError(
      f"The saved results in {files.workdir} were computed with other settings than this "
      "run's (saved -> this run): " + "; ".join(parts) + ". Reusing them would mix two configs' "
      f"results: use a new --workdir for this config, or delete {', '.join(paths)} to recompute "
      f"the {first} stage and the stages after it, or set the old values back.")


class Ledger:
  """fingerprints.json of a run: each stage's record, and the sha256 of the arrays later stages
  read. Records are written before a stage computes (so a partial result, e.g. recover_ckpt/,
  is checked too) and kept when it is loaded; nothing is written on read-only storage or by
  processes other than process 0."""

  def __init__(self, files: RunFiles, writable: bool):
    self.files = files
    self.writable = writable
    self._write = writable and artefacts.is_primary()
    self.data = artefacts.read_fingerprints(files.fingerprints)
    self._saved = json.dumps(self.data, sort_keys=True)
    self.records: dict[str, dict[str, Any]] = {}

  def stored(self, stage: str) -> dict[str, Any] | None:
    return self.data["stages"].get(stage)

  def hashes(self, *paths: str) -> dict[str, str]:
    names = [os.path.basename(p) for p in paths]
    return {n: self.data["files"][n] for n in names if n in self.data["files"]}

  def check(self, config, dataset, teacher_weights: str | None = None) -> None:
    """Refuses saved results computed with other settings (a ConfigError naming the stage, the
    fields old -> new and the files to delete); sets :attr:`records` to this run's."""
    self.records = stage_records(config, dataset, teacher_weights)
    stale, reported = [], []
    for stage in FINGERPRINT_STAGES:
      stored = self.stored(stage)
      if stage not in self.records or stored is None or not _present(stage, config, self.files):
        continue
      if stage == "teacher":  # its weights identify it; what trained it is checked here
        changes = _changes(stored, _teacher_record(config))
        if "training" in stored:
          changes = _changes({"fields": stored["training"]},
                             {"fields": _teacher_training(config, dataset)}, changes)
      else:
        changes = _changes(stored, self.records[stage])
      if changes:  # each field named once, at the first stage it reached
        stale.append((stage, [c for c in changes if c[0] not in reported]))
        reported += [c[0] for c in changes]
    if stale:
      raise _stale(stale, config, self.files)

  def record(self, stage: str, *, extra: dict[str, Any] | None = None,
             drop: tuple[str, ...] = ()) -> None:
    """Records this run's record of ``stage`` (forgetting the hashes of the files ``drop``)."""
    self.data["stages"][stage] = {**self.records[stage], **(extra or {})}
    for path in drop:
      self.data["files"].pop(os.path.basename(path), None)
    self._save()

  def record_files(self, *paths: str) -> None:
    """Records the sha256 of each file (process 0 on writable storage)."""
    if self._write:
      for path in paths:
        self.data["files"][os.path.basename(path)] = artefacts.file_sha256(path)
      self._save()

  def _save(self) -> None:
    text = json.dumps(self.data, sort_keys=True)
    if self._write and text != self._saved:
      artefacts.write_fingerprints(self.files.fingerprints, self.data)
      self._saved = text


def after_teacher(config, dataset, files: RunFiles, ledger: Ledger, variables) -> None:
  """With the teacher known: the later stages' saved results are checked against it, and its
  record is kept."""
  ledger.check(config, dataset, weights_sha256(variables))
  extra = {"training": _teacher_training(config, dataset)} if _workdir_teacher(config, files) \
      else None
  ledger.record("teacher", extra=extra)


def has_statistics(workdir: str) -> bool:
  """Whether ``workdir`` holds a finished statistics pass recorded with its files' sha256 (a
  source for :func:`share_statistics`)."""
  files = RunFiles(os.path.abspath(workdir))
  data = artefacts.read_fingerprints(files.fingerprints)
  return "statistics" in data["stages"] and all(
      os.path.basename(p) in data["files"] and os.path.exists(p)
      for p in (files.stats, files.features))


def share_statistics(source: str, workdir: str) -> bool:
  """Lets a new run in ``workdir`` reuse the statistics pass of the run in ``source``.

  The statistics (per-class BN-input moments and the penultimate features) depend only on the
  teacher, the train split and ``stats.*``, not on the method, IPC or seed, so a grid of runs
  with one teacher needs the pass once. This links ``source``'s ``stats.npz`` and
  ``features.npy`` into ``workdir`` (hard links; copies across file systems) and records
  their statistics record (which holds the teacher's weights sha256) and the files' sha256 in
  ``workdir``'s ``fingerprints.json``. The run in ``workdir`` then checks them like its own
  results: a run whose teacher, data or ``stats.*`` differ is refused with a ConfigError naming
  the fields, never given the other statistics, and the arrays are loaded only if their bytes
  match the recorded sha256. The pipeline never writes into an existing ``features.npy`` (a
  recompute replaces the file), so the links stay
  independent.

  Args:
    source: the workdir of a run whose statistics stage finished (``stats.npz`` present and
      recorded with its sha256).
    workdir: a workdir that holds no run yet (created if missing).

  Returns:
    True when linked; False (nothing changed) when ``source`` has no recorded statistics or
    ``workdir`` already holds a run (a ``fingerprints.json``), which then resumes as before.
  """
  src, dst = RunFiles(os.path.abspath(source)), RunFiles(os.path.abspath(workdir))
  data = artefacts.read_fingerprints(src.fingerprints)
  names = [os.path.basename(p) for p in (src.stats, src.features)]
  if not has_statistics(src.workdir):
    return False
  if os.path.exists(dst.fingerprints) or os.path.exists(dst.stats):
    return False
  os.makedirs(dst.workdir, exist_ok=True)
  for name in names:
    target = os.path.join(dst.workdir, name)
    if os.path.exists(target):
      os.remove(target)  # a leftover without a stats.npz: never written into, replaced
    try:
      os.link(os.path.join(src.workdir, name), target)
    except OSError:
      shutil.copyfile(os.path.join(src.workdir, name), target)
  # The statistics record holds its teacher's record (the weights' sha256) as an input, so a
  # run with another teacher is refused by Ledger.check.
  artefacts.write_fingerprints(dst.fingerprints, {
      "stages": {"statistics": data["stages"]["statistics"]},
      "files": {n: data["files"][n] for n in names}})
  return True
