"""The whole WMDD run, stage by stage, resumable from its working directory.

``run(config, workdir)`` is what ``experiments/distill.py`` calls. This module orchestrates; the
rest lives elsewhere:

    wmdd_jax/config.py     the config schema (generated from the stages' option dataclasses)
    wmdd_jax/methods.py    what each ``config.method`` switches on (a registry)
    wmdd_jax/artefacts.py  the run's files under ``workdir``: paths, formats, save and load

Every stage saves its outputs under ``workdir`` and is skipped when they are there:

    teacher/           Orbax teacher (or config.teacher.checkpoint)
    teacher_ckpt/      resumable teacher training (Orbax, every teacher.checkpoint_every epochs;
                       removed once teacher/ is saved)
    stats.npz          per-class and global BN-input statistics (+ features.npy, labels)
    barycenter.npz     per-class barycenter support and weights
    recover_ckpt/      resumable recover state (Orbax, every recover.checkpoint_every steps)
    synset/            the synthetic set (Orbax + meta.json); grid.png
    eval.json          student results; metrics.json, curves.png, summary.txt
    tensorboard/       TensorBoard events of the stages run (wmdd_jax.tracking names the tags)

Every stage's record of what it was computed from goes to ``fingerprints.json``: the config
fields it depends on (less :data:`wmdd_jax.config.RESULT_NEUTRAL`) and the records of the stages
it reads (:mod:`wmdd_jax.fingerprints`, :func:`~wmdd_jax.fingerprints.stage_records` for the
lists). A rerun reuses a saved stage only when they
match; otherwise it refuses with a ConfigError naming the stage, the fields (old -> new) and the
files to delete: before any stage runs for a changed config, once the teacher is loaded for a
changed teacher. A workdir from before fingerprints (none recorded)
is accepted as made with the current config and recorded. config.json is written after that
check, so it always describes the results beside it. stats.npz, features.npy and barycenter.npz
also get a sha256 there, checked when they are read back.

One run at a time per workdir: a run holds ``<workdir>/.lock`` (flock; with several processes,
process 0 holds it) and refuses a workdir another live run holds; it removes the temporaries a
killed run left. A finished run on read-only storage can still be reopened: with every stage
done, a rerun reads and prints the results and writes nothing.

Keys: one root key ``key(config.seed)``; each stage gets ``fold_in(root, crc32(stage name))``, so
re-running or resuming any stage reproduces it bit for bit.

Devices (``config.parallel``, :class:`wmdd_jax.distributed.ExecutionOptions`): :func:`execution`
turns it into the one :class:`~wmdd_jax.distributed.Execution` every stage receives. With
``mesh="auto"`` (the default) and more than one device, the statistics pass and the student are
data-parallel and barycenters and recover split the classes over one mesh of all devices; with one
device nothing changes (the teacher trains data-parallel over the local devices either way).
``memory_budget_bytes`` > 0 sizes recover's class chunk from the compiled step's memory per
device. ``units`` > 0 cuts every stage into deterministic work units: the run is then
bit-identical for any device count; debug runs use 4. Several processes (hosts) run the same
command against a shared ``workdir``; process 0 writes the files (see :func:`run`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import time
import zlib
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from wmdd_jax import (
    artefacts,
    checkpoint,
    fingerprints,
    methods,
    statistics,
    store,
    tracking,
    training,
)
from wmdd_jax import barycenter as barycenter_lib
from wmdd_jax import config as config_lib
from wmdd_jax import evaluate as evaluate_lib
from wmdd_jax import recover as recover_lib
from wmdd_jax import teacher as teacher_lib
from wmdd_jax.artefacts import RunFiles
from wmdd_jax.config import default_config
from wmdd_jax.data import open_dataset
from wmdd_jax.distributed import Execution, Sharded, local_execution, make_execution, sharding
from wmdd_jax.distributed import units as units_lib
from wmdd_jax.errors import ConfigError, NonFiniteError, WMDDError, WorkdirError
from wmdd_jax.models import get_model
from wmdd_jax.models.base import running_statistics

# The registered methods are wmdd_jax.methods'; METHODS and METHOD_SETTINGS (read through the
# module __getattr__ below) follow its registry, so a method registered later is listed too.
TABLE3_METHODS = methods.TABLE3_METHODS
STORES = ("float", "jpeg")
STAGES = ("teacher", "synset", "evaluate")
TENSORBOARD = "tensorboard"  # the events directory under the workdir
_RECOVER_TERMS = ("loss", "feature", "bn", "ce")


def __getattr__(name: str) -> Any:
  if name == "METHODS":
    return methods.names()
  if name == "METHOD_SETTINGS":
    return methods.settings()
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def debug_config(config: Any) -> Any:
  """A copy of ``config`` shrunk to run in seconds (``--config.debug=True``).

  The same stages and code, fewer steps; with one process and ``parallel.units`` left at 0 it
  also sets ``units=4`` (deterministic work units, so a debug run does not depend on the device
  count; the sharded ``units=0`` programs are exercised by full runs and tests/test_parallel.py).
  """
  c = config.copy_and_resolve_references() if hasattr(config, "copy_and_resolve_references") \
      else config
  with c.unlocked() if hasattr(c, "unlocked") else contextlib.nullcontext():
    c.teacher.epochs = min(int(c.teacher.epochs), 2)
    c.teacher.eval_every = 1
    c.teacher.max_steps_per_epoch = 20
    c.recover.iterations = min(int(c.recover.iterations), 20)
    c.recover.steps_per_call = min(int(c.recover.steps_per_call), 10)
    c.recover.checkpoint_every = 10
    c.eval.epochs = min(int(c.eval.epochs), 2)
    c.eval.eval_every = 1
    # Debug runs check the code, so they are made independent of the device count: the same
    # metrics.json on 1 CPU as on 4 simulated CPU devices (on one backend; see units.py).
    # (Work units need one process; multi-process debug runs keep the sharded programs.)
    section = c.get("parallel")
    if (section is not None and not int(section.get("units", 0) or 0)
        and jax.process_count() == 1):
      section["units"] = 4
  return c


def execution(config: Any) -> Execution:
  """The execution of ``config.parallel`` (:class:`~wmdd_jax.distributed.ExecutionOptions`).

  Raises:
    ConfigError: a bad mesh mode or units value, units with several processes, or several
      processes without the mesh over all their devices.
  """
  options = config_lib.options(config, "parallel")
  if options.units:
    units_lib.check_units(options.units)  # one process only
  chosen = make_execution(options)
  if jax.process_count() > 1 and not isinstance(chosen, Sharded):
    # Without the global mesh each process would compute statistics of its own shard only.
    raise ConfigError(f"config.parallel.mesh={options.mesh!r} with "
                      f"{jax.process_count()} processes: several processes need the mesh "
                      "over all their devices; set config.parallel.mesh='auto' or 'on'.")
  return chosen


def _teacher_execution(execution: Execution) -> Execution:
  # Teacher training is data-parallel over the local devices even without a mesh, as
  # train_teacher's default (the run's execution when it has a mesh or units).
  return local_execution() if type(execution) is Execution else execution


def work_units(config: Any) -> int:
  """``config.parallel.units`` (0 when absent): deterministic work units per batch."""
  return config_lib.options(config, "parallel").units


def stage_key(root: jax.Array, name: str) -> jax.Array:
  """The named stage's key: independent of every other stage and of run order."""
  return jax.random.fold_in(root, zlib.crc32(name.encode()) & 0x7FFFFFFF)


recover_options = config_lib.recover_options


class _Timer:
  def __init__(self, timings: dict[str, float], name: str):
    self.timings, self.name = timings, name

  def __enter__(self):
    self.start = time.perf_counter()

  def __exit__(self, *exc):
    self.timings[self.name] = round(time.perf_counter() - self.start, 3)


# ------------------------------------------------------------------------------- checks


def _check_config(config: Any) -> None:
  """Every check that needs no dataset: unknown fields, the method, each stage's options."""
  config_lib.check_fields(config)
  config_lib.check_pipeline_fields(config)
  config_lib.check_method_switches(config)
  ipc = config.ipc
  if isinstance(ipc, bool) or not isinstance(ipc, int) or ipc < 1:
    raise ConfigError(f"config.ipc={ipc!r} must be an int >= 1 (images per class).")
  method = methods.get_method(config.method)
  if config.recover.store not in STORES:
    raise ConfigError(f"config.recover.store={config.recover.store!r} is not one of {STORES}.")
  config_lib.options(config, "parallel")
  config_lib.options(config, "stats")
  config_lib.options(config, "eval")
  config_lib.options(config, "barycenter")
  if method.runs_recover:
    options = recover_options(config)  # a bad recover option fails here, before any stage runs
    if config.parallel.memory_budget_bytes and options.couples_classes:
      raise ConfigError(
          "config.parallel.memory_budget_bytes sizes recover's class chunk, which is part of the "
          f"loss for method {config.method!r} with objective {options.objective!r}; set "
          "config.recover.class_chunk / batch_size instead, or objective='per_class'.")
  if not (config.teacher.checkpoint and os.path.exists(config.teacher.checkpoint)):
    config_lib.options(config, "teacher")


def validate(config: Any, dataset: Any) -> None:
  """Checks every stage's options against each other and the dataset, before any compute.

  Raises:
    ConfigError: naming the field, its value and the fix.
  """
  config = config_lib.complete(config)
  _check_config(config)
  ipc = config.ipc
  split = config_lib.split(config, "train")
  counts = list(dataset.class_counts(split))
  smallest = int(min(counts)) if counts else 0
  if ipc > smallest:
    c = int(np.argmin(counts))
    raise ConfigError(f"config.ipc={ipc} exceeds the {smallest} {split} images of class {c} "
                      f"({dataset.class_names[c]}); use ipc <= {smallest}.")
  get_model(config.teacher.model, dataset.num_classes,
            **config_lib.plain(config.teacher.model_options))
  student_name, student_opts = config_lib.student(config)
  get_model(student_name, dataset.num_classes, **student_opts)


def _check_teacher_meta(meta, config, dataset, path) -> None:
  """A loaded teacher must be the model the config names, for this dataset's classes and input."""
  problems = []
  if meta.get("model") not in (None, config.teacher.model):
    problems.append(f"model {meta['model']!r} (config.teacher.model={config.teacher.model!r})")
  if meta.get("num_classes") not in (None, dataset.num_classes):
    problems.append(f"{meta['num_classes']} classes (the dataset has {dataset.num_classes})")
  shape = meta.get("image_shape")
  if shape is not None and tuple(shape)[-1] != tuple(dataset.image_shape)[-1]:
    problems.append(f"{tuple(shape)[-1]} input channels (the dataset has "
                    f"{tuple(dataset.image_shape)[-1]})")
  if shape is not None and tuple(shape)[:2] != tuple(dataset.image_shape)[:2]:
    problems.append(f"{shape[0]}x{shape[1]} input images (the dataset's are "
                    f"{dataset.image_shape[0]}x{dataset.image_shape[1]}; "
                    "config.dataset.options.resize sets them)")
  spec = meta.get("dataset")
  if spec is not None and not _same_spec(spec, config.dataset.spec):
    problems.append(f"dataset {spec!r} (config.dataset.spec={config.dataset.spec!r}; an imported "
                    "teacher: re-import it with --dataset set to the spec of this run)")
  if problems:
    raise ConfigError(f"The teacher checkpoint {path} does not fit this run: "
                      + "; ".join(problems) + ". Point config.teacher.checkpoint at a matching "
                      "teacher, fix config.teacher.model or config.dataset, or remove the "
                      "checkpoint to retrain.")


def _same_spec(a: str, b: str) -> bool:
  """Whether two data specs name the same data (paths compared made absolute)."""
  if a == b:
    return True
  kind_a, _, rest_a = a.partition(":")
  kind_b, _, rest_b = b.partition(":")
  return (kind_a == kind_b and kind_a in ("folder", "idx", "npz")
          and os.path.abspath(rest_a) == os.path.abspath(rest_b))


def _check_synset(synset, config, path) -> None:
  """A saved synthetic set is reused only for the method, IPC, objective and store it was made
  with (sets saved before these were recorded skip the last two)."""
  made = synset.config or {}
  wanted = {"method": config.method, "ipc": int(config.ipc),
            "objective": config.recover.objective, "store": config.recover.store}
  if not methods.get_method(config.method).runs_recover:
    wanted.pop("objective")
  diff = [f"{k}={made[k]!r} (config: {v!r})" for k, v in wanted.items()
          if k in made and made[k] != v]
  if diff:
    raise ConfigError(f"The synthetic set in {path} was made with " + ", ".join(diff)
                      + ": use a new --workdir for this config, or delete the synset/ (and "
                      "eval.json) to make it again.")


def _check_finite(synset: checkpoint.SyntheticSet, config, files: RunFiles) -> None:
  """The last check before the synthetic set is saved: every pixel finite."""
  # Class by class: a full-size boolean mask of an ImageNet-scale set would be gigabytes.
  bad = np.asarray([c for c in range(synset.num_classes)
                    if not np.isfinite(synset.images[c]).all()], np.int64)
  if not bad.size:
    return
  names = ", ".join(f"{c} ({synset.class_names[c]})" for c in bad[:10])
  more = f" and {bad.size - 10} more" if bad.size > 10 else ""
  if methods.get_method(config.method).runs_recover:
    fix = ("recover diverged: lower config.recover.lr or the loss weights (r_bn, r_feat, "
           f"r_ce), check the teacher, then delete {files.recover_ckpt} and "
           f"{files.recover_history} and re-run")
  else:
    fix = "the real images normalise to non-finite values: check the dataset's mean/std"
  raise NonFiniteError(f"The synthetic set has NaN/Inf pixels in {bad.size} of "
                       f"{synset.num_classes} classes: {names}{more}. It was not saved; {fix}.")


# ------------------------------------------------------------------------------- stages


def _teacher_data(dataset, split: str, batch_size: int, seed: int | None):
  """``split`` in memory, or (when it does not fit, one process only) a batch stream.

  Returns:
    (data, steps_per_epoch): arrays and None, or a callable ``epoch -> batches`` (shuffled when
    ``seed`` is given) and the number of full batches per epoch.
  """
  try:
    return dataset.load_split(split), None
  except ConfigError:
    if jax.process_count() > 1:
      raise
  if seed is None:
    return (lambda epoch: dataset.iter_batches(split, batch_size)), None
  # Epoch e: seed * 100_003 + e, as before; with loader="grain" the readers start once.
  stream = dataset.epochs(split, batch_size, seed=seed, drop_remainder=True)
  return stream, stream.steps_per_epoch


def _teacher(config, dataset, files, root, timings, log, execution, writer):
  model = get_model(config.teacher.model, dataset.num_classes,
                    **config_lib.plain(config.teacher.model_options))
  # teacher.checkpoint: where the teacher is loaded from, or saved to when it is not there yet.
  path = config.teacher.checkpoint or files.teacher
  if os.path.exists(path):
    variables, meta = checkpoint.load_teacher(path)
    _check_teacher_meta(meta, config, dataset, path)
    log(f"teacher: loaded {path}")
    return model, variables, meta
  with _Timer(timings, "teacher"):
    tcfg = config_lib.options(config, "teacher")
    # Small splits are loaded once; large ones (ImageNet) are streamed from the data layer.
    train, steps_per_epoch = _teacher_data(dataset, config_lib.split(config, "train"),
                                           tcfg.batch_size,
                                           tcfg.seed)
    test, _ = _teacher_data(dataset, config_lib.split(config, "test"), tcfg.eval_batch_size, None)
    variables = teacher_lib.train_teacher(
        model, train, test, tcfg, mean=dataset.mean, std=dataset.std,
        steps_per_epoch=steps_per_epoch, image_shape=dataset.image_shape,
        metrics_path=files.teacher_metrics if artefacts.is_primary() else None,
        progress=artefacts.is_primary(), execution=_teacher_execution(execution),
        checkpoint_dir=files.teacher_ckpt, writer=writer)
    result = training.evaluate(model, variables, test, mean=dataset.mean, std=dataset.std,
                               execution=_teacher_execution(execution))
    meta = checkpoint.teacher_meta(
        model=config.teacher.model,
        model_options=config_lib.plain(config.teacher.model_options),
        num_classes=dataset.num_classes, class_names=dataset.class_names,
        image_shape=dataset.image_shape, mean=dataset.mean, std=dataset.std,
        dataset=config.dataset.spec, test_top1=result["top1"], test_top5=result["top5"],
        config=json.loads(config.to_json_best_effort()))
    checkpoint.save_teacher(path, variables, meta)
    # The teacher is saved whole: its training checkpoints are no longer needed.
    sharding.sync_processes("teacher_saved")
    if artefacts.is_primary():
      shutil.rmtree(files.teacher_ckpt, ignore_errors=True)
  log(f"teacher: trained, test top-1 {meta['test_top1']:.2f}%")
  return model, variables, meta


def _statistics(config, dataset, model, variables, files, timings, log, execution, ledger):
  arrays = (files.stats, files.features)
  if os.path.exists(files.stats):
    recorded = ledger.hashes(*arrays)
    st, feats = artefacts.load_statistics(files, recorded)  # checked against their sha256
    ledger.record("statistics")  # a workdir from before fingerprints: accepted, recorded
    ledger.record_files(*[p for p in arrays if os.path.basename(p) not in recorded])
    log("statistics: loaded")
    return st, feats
  ledger.record("statistics", drop=arrays)
  if os.path.exists(files.features) and artefacts.is_primary():
    # A leftover of a killed pass, or a link shared with other runs
    # (fingerprints.share_statistics): replaced, never written into.
    os.remove(files.features)
  batch = config_lib.options(config, "stats").batch_size
  split = config_lib.split(config, "train")
  with _Timer(timings, "statistics"):
    if jax.process_count() == 1:
      st, feats = statistics.compute_class_statistics(
          model, variables, dataset.iter_batches(split, batch),
          num_classes=dataset.num_classes, image_shape=dataset.image_shape, mean=dataset.mean,
          std=dataset.std, batch_size=batch, total=dataset.num_examples(split),
          feature_path=files.features, execution=execution)
    else:
      # Each process reads its own shard; the features (which every process needs for the
      # barycenters) are then gathered back into the single-process order.
      shard = dataset.iter_batches(split, batch, process_index=jax.process_index(),
                                   process_count=jax.process_count())
      st, local = statistics.compute_class_statistics(
          model, variables, shard, num_classes=dataset.num_classes,
          image_shape=dataset.image_shape, mean=dataset.mean, std=dataset.std,
          batch_size=batch, execution=execution, progress=artefacts.is_primary())
      feats = statistics.Features(sharding.gather_interleaved(local.features),
                                  sharding.gather_interleaved(local.labels))
      artefacts.save_features(files.features, feats.features)
    artefacts.save_statistics(files.stats, st, feats.labels)
  ledger.record_files(*arrays)
  log(f"statistics: {len(st.mean)} BN layers, {int(st.counts.sum())} images")
  return st, feats


def _barycenters(config, features, num_classes, ipc, root, files, timings, log, execution,
                 ledger):
  if os.path.exists(files.barycenter):
    recorded = ledger.hashes(files.barycenter)
    bary = artefacts.load_barycenter(files.barycenter, recorded.get("barycenter.npz"))
    ledger.record("barycenter")
    if not recorded:
      ledger.record_files(files.barycenter)
    log("barycenters: loaded")
    return bary
  ledger.record("barycenter", drop=(files.barycenter,))
  learn = bool(config.barycenter.learn_weights)
  options = config_lib.options_kwargs(config, "barycenter")  # BarycenterOptions fields
  with _Timer(timings, "barycenter"):
    # On a mesh all classes are split at once (classes_per_batch does not apply); work units
    # spread the class batches over the devices.
    bary = barycenter_lib.class_barycenters(
        np.asarray(features.features), features.labels, num_classes, ipc,
        stage_key(root, "barycenter"), learn_weights=learn,
        classes_per_batch=config.barycenter.classes_per_batch, execution=execution, **options)
    bary = barycenter_lib.Barycenter(np.asarray(bary.support), np.asarray(bary.weights))
    artefacts.save_barycenter(files.barycenter, bary)
  ledger.record_files(files.barycenter)
  log(f"barycenters: {num_classes} classes x {ipc} points")
  return bary


def _random_real(dataset, split, ipc, key):
  """IPC seeded random real images per class, normalised: f32[C, ipc, H, W, ch]."""
  labels = dataset.labels(split)
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())
  out = []
  mean, std = np.asarray(dataset.mean, np.float32), np.asarray(dataset.std, np.float32)
  for c in range(dataset.num_classes):
    count = int(np.sum(labels == c))
    if count < ipc:
      raise ConfigError(f"class {c} ({dataset.class_names[c]}) has {count} train images, fewer "
                        f"than ipc={ipc}; lower ipc.")
    chosen = np.sort(rng.choice(count, ipc, replace=False))
    images = np.concatenate([b for b in dataset.iter_class(split, c, 1024)])[chosen]
    out.append((images.astype(np.float32) / 255.0 - mean) / std)
  return np.stack(out)


def _store_jpeg(config, dataset, images, weights, files, timings, log):
  """recover.store="jpeg": the set as the official pipeline hands it to the student (uint8
  JPEG, decoded back), exported to ``syn_data/`` in the official folder layout."""
  c = dataset.num_classes
  quality = int(config.recover.jpeg_quality)
  with _Timer(timings, "store"):
    images, jpegs = store.jpeg_roundtrip(np.asarray(images), dataset.mean, dataset.std,
                                         quality=quality)
    if artefacts.is_primary() and c <= 1000:  # the official layout names classes with 3 digits
      store.write_image_folder(files.syn_data, jpegs, class_ids=range(c),
                               class_names=dataset.class_names, weights=weights, overwrite=True)
    sharding.sync_processes("syn_data")
  log(f"synthetic set: stored as JPEG quality {quality}"
      + (f" ({files.syn_data})" if c <= 1000 else ""))
  return images


def _synthesize(config, dataset, model, variables, files, root, timings, log, execution,
                ledger, writer):
  if os.path.exists(files.synset):
    synset = checkpoint.load_synthetic_set(files.synset)
    _check_synset(synset, config, files.synset)
    ledger.record("synset")
    log("synthetic set: loaded")
    return synset, None
  ipc, method = int(config.ipc), methods.get_method(config.method)
  c = dataset.num_classes
  uniform = np.full((c, ipc), 1.0 / ipc, np.float32)
  history = None
  if not method.runs_recover:
    ledger.record("synset")
    with _Timer(timings, "select"):
      images = _random_real(dataset, config_lib.split(config, "train"), ipc,
                            stage_key(root, "random"))
    weights = uniform
  else:
    options = recover_options(config)
    # The statistics pass (per-class BN statistics and features) only when a term needs it:
    # SRe2L's running statistics come from the teacher itself.
    if method.needs_statistics(options):
      st, feats = _statistics(config, dataset, model, variables, files, timings, log,
                              execution, ledger)
    else:
      st = statistics.ClassStatistics((), (), (), (), np.zeros((c,), np.int64))
    if method.needs_barycenters(options):
      bary = _barycenters(config, feats, c, ipc, root, files, timings, log, execution, ledger)
      support, weights = bary.support, bary.weights
    else:
      support, weights = np.zeros((c, ipc, 1), np.float32), uniform
    running_mean, running_var = (), ()
    if options.bn_stats == "running":
      running_mean, running_var = jax.tree.map(
          np.asarray, running_statistics(model, variables, tuple(dataset.image_shape)))
    targets = recover_lib.RecoverTargets(support, st.mean, st.var, st.global_mean,
                                         st.global_var, running_mean, running_var)
    initial = None
    if options.init == "real":
      # The very images method "random" evaluates with the same seed, so that the two runs
      # differ only by the recover stage (a paired comparison, not two image draws).
      initial = _random_real(dataset, config_lib.split(config, "train"), ipc,
                             stage_key(root, "random"))
    budget = int(config.parallel.memory_budget_bytes)
    ledger.record("synset")  # before recover_ckpt/ is written: a resumed recover is checked too
    # Sharded states are saved shard by shard, without gathering them on one host.
    with _Timer(timings, "recover"), checkpoint.RecoverCheckpointer(
        files.recover_ckpt, save_every=int(config.recover.checkpoint_every),
        iterations=options.iterations) as ckpt:
      images, history = recover_lib.recover(
          model, variables, targets, ipc=ipc, image_shape=dataset.image_shape,
          mean=dataset.mean, std=dataset.std, options=options, key=stage_key(root, "recover"),
          class_chunk=int(config.recover.class_chunk), initial_images=initial,
          resume=ckpt.resume, on_block=ckpt.on_block, execution=execution,
          progress=artefacts.is_primary(), memory_budget_bytes=budget or None)
    history = artefacts.save_recover_history(files.recover_history, history)
    tracking.write_history(writer, "recover", _recover_terms(history))
    log(f"recover: {options.iterations} steps, final loss {history['loss'][-1]:.4g}")
    if config.recover.store == "jpeg":
      images = _store_jpeg(config, dataset, images, weights, files, timings, log)
  synset = checkpoint.SyntheticSet(
      images, np.repeat(np.arange(c), ipc).reshape(c, ipc), weights, dataset.class_names,
      dataset.mean, dataset.std, {"method": config.method, "ipc": ipc, "seed": int(config.seed),
                                  "dataset": config.dataset.spec,
                                  "objective": config.recover.objective,
                                  "store": config.recover.store})
  _check_finite(synset, config, files)
  checkpoint.save_synthetic_set(files.synset, synset)
  return synset, history


def _evaluate(config, dataset, teacher_model, teacher_vars, synset, files, root, timings, log,
              execution, ledger, writer):
  result = artefacts.load_eval(files.eval)
  if result is not None:
    ledger.record("evaluate")
    log("evaluation: loaded")
    return result
  ledger.record("evaluate")
  student_name, student_opts = config_lib.student(config)
  student = get_model(student_name, dataset.num_classes, **student_opts)
  # One set of progress bars with several processes: process 0's.
  options = config_lib.options(config, "eval",
                               progress=artefacts.is_primary() and bool(config.eval.progress))
  images, _, weights = synset.flat()
  method = methods.get_method(config.method)
  barycentric = method.uses_barycenter_weights(
      recover_options(config) if method.runs_recover else None)
  if not config.eval.use_weights or not barycentric:
    weights = np.ones_like(weights)  # only barycenter targets come with weights
  with _Timer(timings, "evaluate"):
    result = evaluate_lib.train_student(
        student, teacher_model, teacher_vars, images, weights,
        dataset.load_split(config_lib.split(config, "test")),
        mean=dataset.mean, std=dataset.std, options=options, key=stage_key(root, "student"),
        execution=execution, writer=writer)
  out = {"test_top1": float(result.top1), "test_top5": float(result.top5),
         "best_top1": float(result.best_top1), "best_top5": float(result.best_top5),
         "student": student_name,
         "history": [dict(r._asdict()) for r in result.history]}
  artefacts.save_eval(files.eval, out)
  log(f"evaluation: student {student_name} test top-1 {out['test_top1']:.2f}% "
      f"(best {out['best_top1']:.2f}%)")
  return out


# ------------------------------------------------------------------------------- the run


def _report(config, dataset, files, result, history, meta, timings, log, *,
            write: bool = True) -> dict[str, Any]:
  """metrics.json, curves.png and summary.txt of a finished run (``write=False``: none, e.g. on
  read-only storage); returns the metrics."""
  if history is None:
    history = artefacts.load_recover_history(files.recover_history)
  if write:
    panels = _curve_panels(_teacher_records(files.teacher_metrics), history,
                           result.get("history", []))
    if panels:
      artefacts.save_curves(files.curves, panels)
  metrics = {
      "dataset": config.dataset.spec, "method": config.method, "ipc": int(config.ipc),
      "num_classes": dataset.num_classes, "seed": int(config.seed),
      "test_top1": result["test_top1"], "test_top5": result["test_top5"],
      "best_top1": result["best_top1"], "best_top5": result["best_top5"],
      "teacher_top1": meta.get("test_top1"), "student": result.get("student"),
      "seconds": timings, "backend": jax.default_backend(), "devices": jax.device_count(),
  }
  summary = (f"{config.method} on {config.dataset.spec}, IPC {config.ipc}, seed {config.seed}: "
             f"student test top-1 {metrics['test_top1']:.2f}% (best {metrics['best_top1']:.2f}%),"
             f" top-5 {metrics['test_top5']:.2f}%; teacher {metrics['teacher_top1']}%.\n"
             f"seconds per stage: {json.dumps(timings)}\nfiles: {files.workdir}\n")
  if write:
    artefacts.write_metrics(files.metrics, metrics)
    artefacts.write_text(files.summary, summary)
  log(summary.strip())
  return metrics


def _recover_terms(history: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
  """The recover history's loss and terms, less those zero throughout (switched off)."""
  if history is None:
    return {}
  return {k: np.asarray(history[k]) for k in _RECOVER_TERMS
          if k in history and np.nanmax(np.abs(history[k]), initial=0) > 0}


def _teacher_records(path: str) -> list[dict[str, Any]]:
  """teacher_metrics.jsonl's records (none when the teacher was loaded; bad lines skipped)."""
  records = []
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          record = json.loads(line)
        except ValueError:
          continue
        if isinstance(record, dict) and "epoch" in record:
          records.append(record)
  return records


def _curve_panels(teacher: list[dict[str, Any]], history: dict[str, np.ndarray] | None,
                  student: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
  """curves.png's panels: teacher accuracy, recover loss and terms, student accuracy (those the
  run has)."""
  panels: list[tuple[Any, ...]] = []
  if teacher:
    series = {"train": ([r["epoch"] for r in teacher],
                        [r.get("train_top1", np.nan) for r in teacher])}
    tested = [r for r in teacher if "test_top1" in r]
    if tested:
      series["test"] = ([r["epoch"] for r in tested], [r["test_top1"] for r in tested])
    panels.append(("teacher top-1", series, {"xlabel": "epoch", "ylabel": "top-1 (%)",
                                             "yscale": "linear"}))
  terms = _recover_terms(history)
  if terms:
    steps = np.arange(1, len(next(iter(terms.values()))) + 1)
    panels.append(("recover: loss (official: per chunk) and terms (per class)",
                   {k: (steps, v) for k, v in terms.items()},
                   {"xlabel": "iteration", "ylabel": "loss (mean over chunks)"}))
  if student:
    epochs = [h["epoch"] for h in student]
    panels.append(("student on the real test split",
                   {"top-1": (epochs, [h["top1"] for h in student]),
                    "top-5": (epochs, [h["top5"] for h in student])},
                   {"xlabel": "epoch", "ylabel": "accuracy (%)", "yscale": "linear"}))
  return panels


def _may_write_events(config, workdir: str, stop_after: str) -> bool:
  """Whether a stage may run, so events may be written (asked before the config is checked:
  True when it cannot tell)."""
  try:
    return bool(_unfinished(config, RunFiles(os.path.abspath(workdir)), stop_after))
  except Exception:  # noqa: BLE001 - a bad config fails later, with its own message
    return True


def _unfinished(config, files: RunFiles, stop_after: str) -> list[str]:
  """The stages up to ``stop_after`` whose results are not in the workdir yet."""
  needed = [("teacher", config.teacher.checkpoint or files.teacher)]
  if stop_after != "teacher":
    needed.append(("synset", files.synset))
  if stop_after == "evaluate":
    needed.append(("evaluate", files.eval))
  return [stage for stage, path in needed if not os.path.exists(path)]


@contextlib.contextmanager
def _open_workdir(config, dataset, files: RunFiles, stop_after: str, log
                  ) -> Iterator[fingerprints.Ledger]:
  """The workdir, ready for the stages: created, locked (one run at a time; process 0 with
  several processes), rid of a killed run's temporaries, its saved results checked against
  this config, then config.json written. On read-only storage with every stage done: none of
  that is written, the results are read.

  Raises:
    WorkdirError: the path is a file, cannot be created, is not writable with stages to run,
      or is locked by another run (WorkdirBusyError).
    ConfigError: saved results computed with other settings (see
      :class:`wmdd_jax.fingerprints.Ledger`).
  """
  writable = artefacts.prepare_workdir(files.workdir)
  if not writable:
    missing = _unfinished(config, files, stop_after)
    if missing:
      raise WorkdirError(
          f"The workdir {files.workdir} is not writable, and the {', '.join(missing)} stage(s) "
          "still have results to write there; make it writable or use another --workdir.")
    log(f"{files.workdir} is read-only and every stage is done: reading its results (nothing "
        "is written)")
  lock = None
  if writable and artefacts.is_primary():  # several processes share the workdir by design
    lock = artefacts.WorkdirLock(files.lock, log=log)
    lock.acquire()
  try:
    if lock is not None:
      artefacts.remove_temporary(files.workdir, log)
    ledger = fingerprints.Ledger(files, writable)
    ledger.check(config, dataset)  # before config.json, which then describes the results
    if writable:
      artefacts.write_config(files.config, config)
    yield ledger
  finally:
    if lock is not None:
      lock.release()


# OSErrors of writers outside artefacts.py (Orbax, the statistics memmap) that mean "the workdir
# cannot take this write": reported as a WorkdirError naming the path.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def run(config: Any, workdir: str, *, log=print, evaluate: bool = True,
        stop_after: str | None = None) -> dict[str, Any]:
  """Runs (or resumes) every stage and writes ``workdir/metrics.json``; returns the metrics.

  With ``stop_after="synset"`` (or ``evaluate=False``) it stops after the synthetic set
  (``workdir/synset`` and ``grid.png``) and returns ``{"synset": path, "seconds": ...}``
  (``experiments/recover.py``); with ``stop_after="teacher"`` after the teacher, returning
  ``{"teacher": path, "teacher_top1", "teacher_top5", "seconds"}`` (``experiments/pretrain.py``).

  A rerun loads every finished stage, after checking it was computed with this config's
  settings (``fingerprints.json``, see the module docstring); a stage computed with others is
  refused, never silently reused.

  Several processes (a cluster JAX detects, or ``WMDD_COORDINATOR``/``WMDD_NUM_PROCESSES``/
  ``WMDD_PROCESS_ID``, see :func:`wmdd_jax.distributed.initialize_distributed`) each call ``run``
  with the same config and a ``workdir`` they all see (a shared file system). Every process computes
  every stage over one mesh of all devices, reading its own shard of the statistics pass; process 0
  writes the files and logs (and holds the workdir's lock), the others wait for them; Orbax
  checkpoints are written collectively.

  Raises:
    ConfigError: an unknown field or method, a bad option, mesh mode or units value (units > 0
      with several processes), or saved results computed with other settings; all before any
      stage runs.
    WorkdirError: a workdir that is a file, not writable, full, or in use by another run.
    CheckpointError: a damaged file of a finished stage (names it and the fix).
    NonFiniteError: a synthetic set with NaN/Inf pixels (not saved).
  """
  if stop_after not in (None, *STAGES):
    raise ConfigError(f"stop_after={stop_after!r} is not one of {STAGES} (or None: every stage).")
  stop_after = stop_after or ("evaluate" if evaluate else "synset")
  if _may_write_events(config, workdir, stop_after):
    # TensorBoard's TensorFlow import (seconds) before the processes connect, in every process:
    # initialize_distributed waits for them all, a first collective only 30 s.
    tracking.prepare_tensorboard()
  sharding.initialize_distributed()  # a no-op without a detected cluster or WMDD_COORDINATOR
  config = config_lib.complete(config)  # every field present; an unknown one fails here
  if config.debug:
    config = debug_config(config)
  _check_config(config)
  if not artefacts.is_primary():
    log = lambda *args, **kwargs: None  # noqa: E731 - one progress log, from process 0
  run_execution = execution(config)  # a bad device option fails here, before any stage runs
  files = RunFiles(os.path.abspath(workdir))
  dataset = open_dataset(config.dataset.spec, **config_lib.plain(config.dataset.options))
  validate(config, dataset)  # every option, before the workdir is touched
  with _open_workdir(config, dataset, files, stop_after, log) as ledger:
    try:
      return _stages(config, dataset, files, ledger, stop_after, log, run_execution)
    except WMDDError:
      raise
    except OSError as e:
      if e.errno not in _WRITE_ERRNOS:
        raise
      raise WorkdirError(artefacts.write_failure(e.filename or files.workdir, e)) from e
    except Exception as e:
      # Orbax/TensorStore report a full disk as e.g. ValueError("RESOURCE_EXHAUSTED: Failed
      # writing ...: No space left on device").
      if "No space left on device" not in str(e):
        raise
      raise WorkdirError(
          f"A write under {files.workdir} failed: the disk is full ({type(e).__name__}: "
          f"{str(e)[:300]}); free disk space (or use a --workdir on another disk), then re-run: "
          "finished stages are kept.") from e


def _stages(config, dataset, files: RunFiles, ledger: fingerprints.Ledger, stop_after: str, log,
            run_execution: Execution) -> dict[str, Any]:
  """The stages of :func:`run`, in an open workdir."""
  write = ledger.writable
  timings = artefacts.read_timings(files.timings, log)
  root = jax.random.key(int(config.seed))

  def save_timings():
    if write:
      artefacts.write_timings(files.timings, timings)

  # Events of the stages this run computes (process 0; none when every stage is loaded). Made
  # before any stage, so its start-up (the TensorFlow import) is in no stage's seconds.
  events = None
  if write and artefacts.is_primary() and _unfinished(config, files, stop_after):
    events = os.path.join(files.workdir, TENSORBOARD)
  writer = tracking.create_writer(events, log=log)
  if writer.logdir:
    log(f"TensorBoard events: tensorboard --logdir {writer.logdir}")
  try:
    model, variables, meta = _teacher(config, dataset, files, root, timings, log,
                                      run_execution, writer)
    fingerprints.after_teacher(config, dataset, files, ledger, variables)
    save_timings()
    if stop_after == "teacher":
      return {"teacher": config.teacher.checkpoint or files.teacher,
              "teacher_top1": meta.get("test_top1"), "teacher_top5": meta.get("test_top5"),
              "seconds": timings}
    variables = jax.device_put(variables)
    synset, history = _synthesize(config, dataset, model, variables, files, root, timings, log,
                                  run_execution, ledger, writer)
    save_timings()
    mean, std = np.asarray(synset.mean), np.asarray(synset.std)
    if write:
      artefacts.save_grid(files.grid, synset.images * std + mean)
    if stop_after == "synset":
      log(f"synthetic set: {files.synset}, grid: {files.grid}")
      return {"synset": files.synset, "seconds": timings}
    result = _evaluate(config, dataset, model, variables, synset, files, root, timings, log,
                       run_execution, ledger, writer)
  finally:
    writer.close()
    with contextlib.suppress(WorkdirError):  # bookkeeping: never hides the error under way
      save_timings()
  return _report(config, dataset, files, result, history, meta, timings, log, write=write)


# METHODS and METHOD_SETTINGS come from the module __getattr__ (the live registry).
__all__ = ["METHODS", "METHOD_SETTINGS", "STAGES", "STORES", "TABLE3_METHODS",  # noqa: F822
           "debug_config", "default_config", "execution", "recover_options", "run", "stage_key",
           "validate", "work_units"]
