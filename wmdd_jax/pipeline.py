"""The whole WMDD run, stage by stage, resumable from its working directory.

``run(config, workdir)`` is what ``experiments/distill.py`` calls. It is the one place that reads
an ml_collections config: each stage below turns its section into the typed options of a library
function. Every stage saves its outputs under ``workdir`` and is skipped when they are there:

    teacher/           Orbax teacher (or config.teacher.checkpoint)
    stats.npz          per-class and global BN-input statistics (+ features.npy, labels)
    barycenter.npz     per-class barycenter support and weights
    recover_ckpt/      resumable recover state (Orbax, every recover.checkpoint_every steps)
    synset/            the synthetic set (Orbax + meta.json); grid.png
    eval.json          student results; metrics.json, curves.png, summary.txt

Keys: one root key ``key(config.seed)``; each stage gets ``fold_in(root, crc32(stage name))``, so
re-running or resuming any stage reproduces it bit for bit.

Devices (``config.parallel``): with ``mesh="auto"`` (the default) and more than one device, the
statistics pass and the student are data-parallel and barycenters and recover split the classes
over one mesh of all devices (:mod:`wmdd_jax.parallel`); with one device nothing changes.
``memory_budget_bytes`` > 0 sizes recover's class chunk from the compiled step's memory per
device. The teacher stage keeps its own data-parallel loop (:mod:`wmdd_jax.train`).
``units`` > 0 cuts every stage into deterministic work units (:mod:`wmdd_jax.units`): the run is
then bit-identical for any device count; debug runs use 4. Several processes (hosts) run the
same command against a shared ``workdir``; process 0 writes the files (see :func:`run`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
import zlib
from typing import Any

import jax
import numpy as np

from wmdd_jax import barycenter as barycenter_lib
from wmdd_jax import checkpoint, parallel, relabel, report, stats, store, synthesis
from wmdd_jax import train as train_lib
from wmdd_jax import units as units_lib
from wmdd_jax.data import open_dataset
from wmdd_jax.errors import ConfigError
from wmdd_jax.models import get_model
from wmdd_jax.models.base import running_statistics

# What each method means, in one place: the recover switches it sets where the config leaves
# them unset (None). The four rows of the paper's Table 3, as the official code runs them:
METHOD_SETTINGS: dict[str, dict[str, Any]] = {
    # Wass+PCBN (WMDD): recover/data_synthesis_new.py --wb true --per-class-bn true; r_wb is
    # r_ce (the objective's default, 1 under "official" as run.sh's R_WB=1).
    "wmdd": dict(feature_target="barycenter", bn_stats="class", layout="class",
                 first_bn_multiplier=1.0),
    # CE+PCBN: data_synthesis_new.py --wb false: loss_main = CE (weight 1, r_wb unused).
    "ce_pcbn": dict(feature_target="none", bn_stats="class", layout="class",
                    first_bn_multiplier=1.0, r_ce=1.0),
    # Wass+BN: recover/data_synthesis.py --wb true: ||F - B_j|| over one image of every class
    # per batch, the teacher's running BN statistics, first-BN multiplier 10 (its default), no CE.
    "wass_bn": dict(feature_target="barycenter", bn_stats="running", layout="slot",
                    first_bn_multiplier=10.0, r_ce=0.0),
    # CE+BN = SRe2L: data_synthesis.py --wb false: CE + running BN statistics, one image of
    # every class per batch, first-BN multiplier 10.
    "sre2l": dict(feature_target="none", bn_stats="running", layout="slot",
                  first_bn_multiplier=10.0, r_ce=1.0),
    # Random real images of each class (no recover).
    "random": {},
}
METHODS = tuple(METHOD_SETTINGS)
TABLE3_METHODS = ("wmdd", "ce_pcbn", "wass_bn", "sre2l")
STORES = ("float", "jpeg")


def default_config():
  """Every field the pipeline reads, with DESIGN section 1's defaults.

  Experiment configs start from this and override what their dataset needs::

      config = pipeline.default_config()
      config.dataset.spec = "digits"
  """
  import ml_collections  # noqa: PLC0415 - configs are a script-level concern

  c = ml_collections.ConfigDict()
  c.method = "wmdd"            # wmdd | sre2l | random
  c.ipc = 10
  c.seed = 0
  c.debug = False
  c.dataset = ml_collections.ConfigDict({"spec": "digits", "options": {},
                                         "train_split": "train", "test_split": "test"})
  c.teacher = ml_collections.ConfigDict({
      "model": "convnet_d3", "model_options": {}, "checkpoint": "",
      "epochs": 30, "batch_size": 128, "learning_rate": 0.1, "momentum": 0.9,
      "weight_decay": 5e-4, "crop_padding": 4, "flip": True, "label_smoothing": 0.0,
      "warmup_epochs": 0.0, "eval_every": 5,
  })
  c.stats = ml_collections.ConfigDict({"batch_size": 256})
  c.barycenter = ml_collections.ConfigDict({"learn_weights": False})
  placeholder = ml_collections.config_dict.placeholder
  # Fields left None take the method's setting (METHOD_SETTINGS), then RecoverOptions' default
  # (r_ce: 1 under objective "official", 0 under "per_class").
  c.recover = ml_collections.ConfigDict({
      "iterations": 2000, "lr": 0.25, "beta1": 0.5, "beta2": 0.9, "r_feat": 1.0,
      "r_bn": 10.0, "r_ce": placeholder(float), "objective": "official",
      "feature_target": placeholder(str), "bn_stats": placeholder(str),
      "first_bn_multiplier": placeholder(float), "layout": placeholder(str),
      "batch_size": 100, "augment": True, "per_image": False, "crop_scale": (0.08, 1.0),
      "jitter_fraction": 1.0 / 7.0, "init": "noise", "steps_per_call": 25,
      "class_chunk": 0, "checkpoint_every": 100,
      # "jpeg": the set is stored as the official code hands it to the student (uint8 JPEG,
      # quality 75, decoded back; wmdd_jax/store.py) and exported to DIR/syn_data.
      "store": "float", "jpeg_quality": 75,
  })
  c.eval = ml_collections.ConfigDict({
      "model": "", "model_options": {}, "epochs": 300, "batch_size": 100, "lr": 1e-3,
      "weight_decay": 0.01, "temperature": 20.0, "eval_every": 25, "use_weights": True,
      "crop_scale": (0.08, 1.0), "cutmix": True,
  })
  # mesh: "auto" (all devices when there are several), "on" (always) or "off" (default device).
  # units: 0: stages sharded by XLA (equal to one device up to round-off); N > 0: every batch
  # (and recover's classes) cut into N deterministic work units, so the run is bit-identical
  # for any device count (wmdd_jax/units.py; train-mode BN then normalises per unit).
  c.parallel = ml_collections.ConfigDict({"mesh": "auto", "memory_budget_bytes": 0, "units": 0})
  return c


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


MESH_MODES = ("auto", "on", "off")


def device_mesh(config: Any) -> jax.sharding.Mesh | None:
  """The mesh the parallel stages use (``config.parallel.mesh``), or None for one device."""
  section = config.get("parallel") or {}
  mode = section.get("mesh", "auto")
  if mode not in MESH_MODES:
    raise ConfigError(f"config.parallel.mesh={mode!r} is not one of {MESH_MODES}.")
  if mode == "off" or (mode == "auto" and jax.device_count() == 1):
    return None
  return parallel.make_mesh()


def work_units(config: Any) -> int:
  """``config.parallel.units`` (0 when absent): deterministic work units, see wmdd_jax/units.py."""
  return units_lib.check_units(int((config.get("parallel") or {}).get("units", 0) or 0))


def stage_key(root: jax.Array, name: str) -> jax.Array:
  """The named stage's key: independent of every other stage and of run order."""
  return jax.random.fold_in(root, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def _to_dict(section: Any) -> dict[str, Any]:
  if section is None:
    return {}
  return section.to_dict() if hasattr(section, "to_dict") else dict(section)


def _dataclass_kwargs(cls: type, section: Any, **overrides: Any) -> dict[str, Any]:
  """The fields of ``cls`` that ``section`` sets (lists become tuples), plus overrides."""
  values = _to_dict(section)
  names = {f.name for f in dataclasses.fields(cls)}
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in names}
  kwargs.update(overrides)
  return kwargs


def recover_options(config: Any) -> synthesis.RecoverOptions:
  """RecoverOptions for ``config.method``: its METHOD_SETTINGS fill the fields left unset."""
  method = config.method
  if method not in METHODS:
    raise ConfigError(f"config.method={method!r} is not one of {METHODS}.")
  kwargs = _dataclass_kwargs(synthesis.RecoverOptions, config.recover)
  for name, value in METHOD_SETTINGS[method].items():
    if kwargs.get(name) is None:
      kwargs[name] = value
  kwargs = {k: v for k, v in kwargs.items() if v is not None}
  return synthesis.RecoverOptions(**kwargs)


class _Timer:
  def __init__(self, timings: dict[str, float], name: str):
    self.timings, self.name = timings, name

  def __enter__(self):
    self.start = time.perf_counter()

  def __exit__(self, *exc):
    self.timings[self.name] = round(time.perf_counter() - self.start, 3)


def _primary() -> bool:
  """Whether this process writes the run's files (process 0; every process computes)."""
  return jax.process_index() == 0


def _write_timings(path: str, timings: dict[str, float]) -> None:
  if _primary():
    report.write_json(path, timings)


def _save_npz(path: str, **arrays: Any) -> None:
  """Every process calls it with the same arrays; process 0 writes them (atomically)."""
  if _primary():
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
  parallel.sync_processes(os.path.basename(path))


def _teacher(config, dataset, workdir, root, timings, log, mesh=None):
  model = get_model(config.teacher.model, dataset.num_classes,
                    **_to_dict(config.teacher.get("model_options")))
  # teacher.checkpoint: where the teacher is loaded from, or saved to when it is not there yet.
  path = config.teacher.get("checkpoint") or os.path.join(workdir, "teacher")
  if os.path.exists(path):
    variables, meta = checkpoint.load_teacher(path)
    _check_teacher_meta(meta, config, dataset, path)
    log(f"teacher: loaded {path}")
    return model, variables, meta
  with _Timer(timings, "teacher"):
    tcfg = train_lib.TeacherConfig(**_dataclass_kwargs(train_lib.TeacherConfig, config.teacher,
                                                       seed=int(config.seed)))
    train = dataset.load_split(_split(config, "train"))
    test = dataset.load_split(_split(config, "test"))
    variables = train_lib.train_teacher(
        model, train, test, tcfg, mean=dataset.mean, std=dataset.std,
        image_shape=dataset.image_shape,
        metrics_path=os.path.join(workdir, "teacher_metrics.jsonl") if _primary() else None,
        progress=_primary(), mesh=mesh,
        units=work_units(config))
    result = train_lib.evaluate(model, variables, test, mean=dataset.mean, std=dataset.std,
                                mesh=mesh, units=work_units(config))
    meta = checkpoint.teacher_meta(
        model=config.teacher.model,
        model_options=_to_dict(config.teacher.get("model_options")),
        num_classes=dataset.num_classes, class_names=dataset.class_names,
        image_shape=dataset.image_shape, mean=dataset.mean, std=dataset.std,
        dataset=config.dataset.spec, test_top1=result["top1"], test_top5=result["top5"])
    checkpoint.save_teacher(path, variables, meta)
  log(f"teacher: trained, test top-1 {meta['test_top1']:.2f}%")
  return model, variables, meta


def validate(config: Any, dataset: Any) -> None:
  """Checks every stage's options against each other and the dataset, before any compute.

  Raises:
    ConfigError: naming the field, its value and the fix.
  """
  ipc = config.ipc
  if isinstance(ipc, bool) or not isinstance(ipc, int) or ipc < 1:
    raise ConfigError(f"config.ipc={ipc!r} must be an int >= 1 (images per class).")
  split = _split(config, "train")
  counts = list(dataset.class_counts(split))
  smallest = int(min(counts)) if counts else 0
  if ipc > smallest:
    c = int(np.argmin(counts))
    raise ConfigError(f"config.ipc={ipc} exceeds the {smallest} {split} images of class {c} "
                      f"({dataset.class_names[c]}); use ipc <= {smallest}.")
  if not (config.teacher.get("checkpoint") and os.path.exists(config.teacher.checkpoint)):
    train_lib.TeacherConfig(**_dataclass_kwargs(train_lib.TeacherConfig, config.teacher,
                                                seed=int(config.seed)))
  ev = config.eval
  relabel.StudentOptions(**_dataclass_kwargs(relabel.StudentOptions, ev, seed=int(config.seed)))
  student_name = ev.get("model") or config.teacher.model
  student_opts = _to_dict(ev.get("model_options")) if ev.get("model") else _to_dict(
      config.teacher.get("model_options"))
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
  if problems:
    raise ConfigError(f"The teacher checkpoint {path} does not fit this run: "
                      + "; ".join(problems) + ". Point config.teacher.checkpoint at a matching "
                      "teacher, fix config.teacher.model, or remove the checkpoint to retrain.")


def _split(config, which: str) -> str:
  """The dataset split playing the role ``which`` ("train"/"test"; "val" for tuning runs)."""
  return config.dataset.get(f"{which}_split", which)


def _statistics(config, dataset, model, variables, workdir, timings, log, mesh=None):
  path = os.path.join(workdir, "stats.npz")
  if os.path.exists(path):
    data = np.load(path)
    layers = int(data["num_layers"])
    get = lambda name: tuple(data[f"{name}_{i}"] for i in range(layers))
    st = stats.ClassStatistics(get("mean"), get("var"), get("global_mean"), get("global_var"),
                               data["counts"])
    feats = stats.Features(np.load(os.path.join(workdir, "features.npy"), mmap_mode="r"),
                           data["labels"])
    log("statistics: loaded")
    return st, feats
  batch = int(config.stats.get("batch_size", 256))
  split = _split(config, "train")
  feature_path = os.path.join(workdir, "features.npy")
  with _Timer(timings, "statistics"):
    if jax.process_count() == 1:
      st, feats = stats.compute_class_statistics(
          model, variables, dataset.iter_batches(split, batch),
          num_classes=dataset.num_classes, image_shape=dataset.image_shape, mean=dataset.mean,
          std=dataset.std, batch_size=batch, total=dataset.num_examples(split),
          feature_path=feature_path, mesh=mesh, units=work_units(config))
    else:
      # Each process reads its own shard; the features (which every process needs for the
      # barycenters) are then gathered back into the single-process order.
      shard = dataset.iter_batches(split, batch, process_index=jax.process_index(),
                                   process_count=jax.process_count())
      st, local = stats.compute_class_statistics(
          model, variables, shard, num_classes=dataset.num_classes,
          image_shape=dataset.image_shape, mean=dataset.mean, std=dataset.std,
          batch_size=batch, mesh=mesh, progress=_primary())
      feats = stats.Features(parallel.gather_interleaved(local.features),
                             parallel.gather_interleaved(local.labels))
      if _primary():
        tmp = f"{feature_path}.tmp-{os.getpid()}.npy"
        np.save(tmp, feats.features)
        os.replace(tmp, feature_path)
    arrays = {"num_layers": len(st.mean), "counts": st.counts, "labels": feats.labels}
    for name in ("mean", "var", "global_mean", "global_var"):
      for i, a in enumerate(getattr(st, name)):
        arrays[f"{name}_{i}"] = a
    _save_npz(path, **arrays)
  log(f"statistics: {len(st.mean)} BN layers, {int(st.counts.sum())} images")
  return st, feats


def _barycenters(config, features, num_classes, ipc, root, workdir, timings, log, mesh=None):
  path = os.path.join(workdir, "barycenter.npz")
  if os.path.exists(path):
    data = np.load(path)
    log("barycenters: loaded")
    return barycenter_lib.Barycenter(data["support"], data["weights"])
  options = _to_dict(config.barycenter)
  learn = bool(options.pop("learn_weights", False))
  options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
  with _Timer(timings, "barycenter"):
    if work_units(config):
      # One class per program, classes spread over the devices: the same programs and results
      # for any device count.
      options["classes_per_batch"] = 1
      bary = barycenter_lib.class_barycenters(
          np.asarray(features.features), features.labels, num_classes, ipc,
          stage_key(root, "barycenter"), learn_weights=learn,
          devices=units_lib.devices_of(mesh), **options)
    elif mesh is None:
      bary = barycenter_lib.class_barycenters(
          np.asarray(features.features), features.labels, num_classes, ipc,
          stage_key(root, "barycenter"), learn_weights=learn, **options)
    else:
      options.pop("classes_per_batch", None)  # the mesh splits all classes at once
      bary = parallel.class_barycenters(
          np.asarray(features.features), features.labels, num_classes, ipc,
          stage_key(root, "barycenter"), mesh=mesh, learn_weights=learn, **options)
    bary = barycenter_lib.Barycenter(np.asarray(bary.support), np.asarray(bary.weights))
    _save_npz(path, support=bary.support, weights=bary.weights)
  log(f"barycenters: {num_classes} classes x {ipc} points")
  return bary


def _check_synset(synset, config, path) -> None:
  """A saved synthetic set is reused only for the method, IPC, objective and store it was made
  with (sets saved before these were recorded skip the last two)."""
  made = synset.config or {}
  wanted = {"method": config.method, "ipc": int(config.ipc),
            "objective": config.recover.get("objective", "official"),
            "store": config.recover.get("store", "float")}
  if config.method == "random":
    wanted.pop("objective")
  diff = [f"{k}={made[k]!r} (config: {v!r})" for k, v in wanted.items()
          if k in made and made[k] != v]
  if diff:
    raise ConfigError(f"The synthetic set in {path} was made with " + ", ".join(diff)
                      + ": use a new --workdir for this config, or delete the synset/ (and "
                      "eval.json) to make it again.")


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


def _synthesize(config, dataset, model, variables, workdir, root, timings, log, mesh=None):
  synset_path = os.path.join(workdir, "synset")
  if os.path.exists(synset_path):
    synset = checkpoint.load_synthetic_set(synset_path)
    _check_synset(synset, config, synset_path)
    log("synthetic set: loaded")
    return synset, None
  ipc, method = int(config.ipc), config.method
  c = dataset.num_classes
  uniform = np.full((c, ipc), 1.0 / ipc, np.float32)
  history = None
  if method == "random":
    with _Timer(timings, "select"):
      images = _random_real(dataset, _split(config, "train"), ipc, stage_key(root, "random"))
    weights = uniform
  else:
    options = recover_options(config)
    # The statistics pass (per-class BN statistics and features) only when a term needs it:
    # SRe2L's running statistics come from the teacher itself.
    if options.feature_target == "barycenter" or options.bn_stats in ("class", "global"):
      st, feats = _statistics(config, dataset, model, variables, workdir, timings, log, mesh)
    else:
      st = stats.ClassStatistics((), (), (), (), np.zeros((c,), np.int64))
    if options.feature_target == "barycenter":
      bary = _barycenters(config, feats, c, ipc, root, workdir, timings, log, mesh)
      support, weights = bary.support, bary.weights
    else:
      support, weights = np.zeros((c, ipc, 1), np.float32), uniform
    running_mean, running_var = (), ()
    if options.bn_stats == "running":
      running_mean, running_var = jax.tree.map(
          np.asarray, running_statistics(model, variables, tuple(dataset.image_shape)))
    targets = synthesis.RecoverTargets(support, st.mean, st.var, st.global_mean, st.global_var,
                                       running_mean, running_var)
    initial = None
    if options.init == "real":
      initial = _random_real(dataset, _split(config, "train"), ipc,
                             stage_key(root, "recover_init"))
    every = int(config.recover.get("checkpoint_every", 100))
    budget = int((config.get("parallel") or {}).get("memory_budget_bytes", 0) or 0)
    # Sharded states are saved shard by shard, without gathering them on one host.
    with _Timer(timings, "recover"), checkpoint.RecoverCheckpointer(
        os.path.join(workdir, "recover_ckpt"), save_every=every,
        iterations=options.iterations) as ckpt:
      images, history = synthesis.recover(
          model, variables, targets, ipc=ipc, image_shape=dataset.image_shape,
          mean=dataset.mean, std=dataset.std, options=options, key=stage_key(root, "recover"),
          class_chunk=int(config.recover.get("class_chunk", 0)), initial_images=initial,
          resume=ckpt.resume, on_block=ckpt.on_block, mesh=mesh, progress=_primary(),
          memory_budget_bytes=budget or None, units=work_units(config))
    history_path = os.path.join(workdir, "recover_history.npz")
    if os.path.exists(history_path):
      # A resumed recover saw only its last steps: keep the earlier run's record of the others.
      with np.load(history_path) as before:
        history = {k: np.where(np.isnan(v), before[k], v) if k in before.files
                   and before[k].shape == v.shape else v for k, v in history.items()}
    _save_npz(history_path, **history)
    log(f"recover: {options.iterations} steps, final loss {history['loss'][-1]:.4g}")
    if config.recover.get("store", "float") == "jpeg":
      # As the official pipeline hands the set to the student: uint8 JPEG, decoded back.
      with _Timer(timings, "store"):
        images, jpegs = store.jpeg_roundtrip(
            np.asarray(images), dataset.mean, dataset.std,
            quality=int(config.recover.get("jpeg_quality", 75)))
        if _primary() and c <= 1000:  # the official folder layout names classes with 3 digits
          store.write_image_folder(os.path.join(workdir, "syn_data"), jpegs,
                                   class_ids=range(c), class_names=dataset.class_names,
                                   weights=weights, overwrite=True)
        parallel.sync_processes("syn_data")
      log(f"synthetic set: stored as JPEG quality {config.recover.get('jpeg_quality', 75)}"
          + (f" ({os.path.join(workdir, 'syn_data')})" if c <= 1000 else ""))
  synset = checkpoint.SyntheticSet(
      images, np.repeat(np.arange(c), ipc).reshape(c, ipc), weights, dataset.class_names,
      dataset.mean, dataset.std, {"method": method, "ipc": ipc, "seed": int(config.seed),
                                  "dataset": config.dataset.spec,
                                  "objective": config.recover.get("objective", "official"),
                                  "store": config.recover.get("store", "float")})
  checkpoint.save_synthetic_set(synset_path, synset)
  return synset, history


def _evaluate(config, dataset, teacher_model, teacher_vars, synset, workdir, root, timings, log,
              mesh=None):
  path = os.path.join(workdir, "eval.json")
  if os.path.exists(path):
    with open(path) as f:
      log("evaluation: loaded")
      return json.load(f)
  ev = config.eval
  student_name = ev.get("model") or config.teacher.model
  student_opts = _to_dict(ev.get("model_options")) if ev.get("model") else _to_dict(
      config.teacher.get("model_options"))
  student = get_model(student_name, dataset.num_classes, **student_opts)
  # One set of progress bars with several processes: process 0's.
  options = relabel.StudentOptions(**_dataclass_kwargs(relabel.StudentOptions, ev,
                                                       seed=int(config.seed),
                                                       progress=_primary() and bool(
                                                           ev.get("progress", True))))
  images, _, weights = synset.flat()
  barycentric = (config.method != "random"
                 and recover_options(config).feature_target == "barycenter")
  if not config.eval.get("use_weights", True) or not barycentric:
    weights = np.ones_like(weights)  # only barycenter targets come with weights
  with _Timer(timings, "evaluate"):
    result = relabel.train_student(
        student, teacher_model, teacher_vars, images, weights,
        dataset.load_split(_split(config, "test")),
        mean=dataset.mean, std=dataset.std, options=options, key=stage_key(root, "student"),
        mesh=mesh, units=work_units(config))
  out = {"test_top1": float(result.top1), "test_top5": float(result.top5),
         "best_top1": float(result.best_top1), "best_top5": float(result.best_top5),
         "student": student_name,
         "history": [dict(r._asdict()) for r in result.history]}
  if _primary():
    report.write_json(path, out)
  parallel.sync_processes("eval.json")
  log(f"evaluation: student {student_name} test top-1 {out['test_top1']:.2f}% "
      f"(best {out['best_top1']:.2f}%)")
  return out


def run(config: Any, workdir: str, *, log=print, evaluate: bool = True) -> dict[str, Any]:
  """Runs (or resumes) every stage and writes ``workdir/metrics.json``; returns the metrics.

  With ``evaluate=False`` it stops after the synthetic set (``workdir/synset`` and ``grid.png``)
  and returns ``{"synset": path, "seconds": ...}`` (``experiments/recover.py``).

  Several processes (``WMDD_COORDINATOR``/``WMDD_NUM_PROCESSES``/``WMDD_PROCESS_ID``, see
  :func:`wmdd_jax.parallel.initialize_distributed`) each call ``run`` with the same config and a
  ``workdir`` they all see (a shared file system). Every process computes every stage over one
  mesh of all devices, reading its own shard of the statistics pass; process 0 writes the files
  and logs, the others wait for them; Orbax checkpoints are written collectively.

  Raises:
    ConfigError: an unknown method, mesh mode or units value (units > 0 with several
      processes).
  """
  parallel.initialize_distributed()  # a no-op unless WMDD_COORDINATOR is set
  if config.get("debug", False):
    config = debug_config(config)
  if config.method not in METHODS:
    raise ConfigError(f"config.method={config.method!r} is not one of {METHODS}.")
  if config.recover.get("store", "float") not in STORES:
    raise ConfigError(f"config.recover.store={config.recover.store!r} is not one of {STORES}.")
  if config.method != "random":
    options = recover_options(config)  # a bad recover option fails here, before any stage runs
    budget = int((config.get("parallel") or {}).get("memory_budget_bytes", 0) or 0)
    if budget and options.couples_classes:
      raise ConfigError(
          "config.parallel.memory_budget_bytes sizes recover's class chunk, which is part of the "
          f"loss for method {config.method!r} with objective {options.objective!r}; set "
          "config.recover.class_chunk / batch_size instead, or objective='per_class'.")
  if not _primary():
    log = lambda *args, **kwargs: None  # noqa: E731 - one progress log, from process 0
  mesh = device_mesh(config)
  if mesh is None and jax.process_count() > 1:
    # Without the global mesh each process would compute statistics of its own shard only.
    raise ConfigError(f"config.parallel.mesh={config.parallel.mesh!r} with "
                      f"{jax.process_count()} processes: several processes need the mesh "
                      "over all their devices; set config.parallel.mesh='auto' or 'on'.")
  work_units(config)  # a bad value fails here, before any stage runs
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  if _primary():
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2) if hasattr(config, "to_json_best_effort")
              else json.dumps(dict(config), indent=2, default=str))
  timings_path = os.path.join(workdir, "timings.json")
  timings: dict[str, float] = {}
  if os.path.exists(timings_path):
    with open(timings_path) as f:
      timings = json.load(f)
  root = jax.random.key(int(config.seed))
  dataset = open_dataset(config.dataset.spec, **_to_dict(config.dataset.get("options")))
  validate(config, dataset)
  try:
    model, variables, meta = _teacher(config, dataset, workdir, root, timings, log, mesh)
    _write_timings(timings_path, timings)
    variables = jax.device_put(variables)
    synset, history = _synthesize(config, dataset, model, variables, workdir, root, timings, log,
                                  mesh)
    _write_timings(timings_path, timings)
    mean, std = np.asarray(synset.mean), np.asarray(synset.std)
    if _primary():
      report.save_grid(os.path.join(workdir, "grid.png"), synset.images * std + mean)
    if not evaluate:
      log(f"synthetic set: {os.path.join(workdir, 'synset')}, grid: "
          f"{os.path.join(workdir, 'grid.png')}")
      return {"synset": os.path.join(workdir, "synset"), "seconds": timings}
    result = _evaluate(config, dataset, model, variables, synset, workdir, root, timings, log,
                       mesh)
  finally:
    _write_timings(timings_path, timings)
  if history is None and os.path.exists(os.path.join(workdir, "recover_history.npz")):
    history = dict(np.load(os.path.join(workdir, "recover_history.npz")))
  panels = []
  if history is not None:
    steps = np.arange(1, len(history["loss"]) + 1)
    panels.append(("recover loss (official: per chunk) and terms (per class)",
                   {k: (steps, history[k]) for k in ("loss", "feature", "bn", "ce")
                    if np.nanmax(np.abs(history[k]), initial=0) > 0}))
  hist = result.get("history", [])
  if hist:
    panels.append(("student test top-1 (%)", {"top1": ([h["epoch"] for h in hist],
                                                      [h["top1"] for h in hist])}))
  if panels and _primary():
    report.save_curves(os.path.join(workdir, "curves.png"), panels)
  metrics = {
      "dataset": config.dataset.spec, "method": config.method, "ipc": int(config.ipc),
      "num_classes": dataset.num_classes, "seed": int(config.seed),
      "test_top1": result["test_top1"], "test_top5": result["test_top5"],
      "best_top1": result["best_top1"], "best_top5": result["best_top5"],
      "teacher_top1": meta.get("test_top1"), "student": result.get("student"),
      "seconds": timings, "backend": jax.default_backend(), "devices": jax.device_count(),
  }
  if _primary():
    report.write_json(os.path.join(workdir, "metrics.json"), metrics)
  summary = (f"{config.method} on {config.dataset.spec}, IPC {config.ipc}, seed {config.seed}: "
             f"student test top-1 {metrics['test_top1']:.2f}% (best {metrics['best_top1']:.2f}%),"
             f" top-5 {metrics['test_top5']:.2f}%; teacher {metrics['teacher_top1']}%.\n"
             f"seconds per stage: {json.dumps(timings)}\nfiles: {workdir}\n")
  if _primary():
    with open(os.path.join(workdir, "summary.txt"), "w") as f:
      f.write(summary)
  log(summary.strip())
  return metrics


__all__ = ["MESH_MODES", "METHODS", "METHOD_SETTINGS", "STORES", "TABLE3_METHODS",
           "default_config", "validate", "device_mesh", "recover_options", "run",
           "stage_key", "work_units"]
