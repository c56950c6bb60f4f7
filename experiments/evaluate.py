"""Evaluates a synthetic set: students x seeds, soft and hard labels, against random real images.

    python experiments/evaluate.py --config.set=demo_out/wmdd \\
        --config.students="convnet_d3(width=64),resnet18(stem=cifar)"
    python experiments/evaluate.py --config.set=/data/wmdd_syn \\
        --config.dataset.spec=folder:/data/imagenette --config.teacher=runs/in/teacher \\
        --config.seeds=0

Every field of :func:`get_config` (below) is a ``--config.<field>`` flag.

The set: a pipeline workdir, a ``synset/`` directory, or class folders of PNG/JPEG images (the
official code's output; no classes.json needed: see :func:`get_config`). Every
(student, seed) is trained with the teacher's soft labels (``wmdd_jax.evaluate.train_student``,
or stored soft labels, ``--config.soft_labels=DIR``) and with hard labels (cross-entropy on the
same views, mixed by CutMix), and the same on random real images of the same per-class counts.
Prints a table of test top-1 (mean +- sample std over seeds) and the gain over random images,
and writes it to ``<out>.md`` and every run to ``<out>.json``. ``--config.store_soft_labels=DIR``
saves the teacher's logits for each seed's views (``wmdd_jax.protocol``, a documented ``.npz``);
``--config.export=DIR`` writes the set with labels, weights and soft labels for PyTorch users.
"""

import json
import os
import re
import shlex
import sys
import time
from typing import Any

import ml_collections
import numpy as np
from ml_collections import config_dict

from wmdd_jax import checkpoint, protocol, store
from wmdd_jax.data import open_dataset
from wmdd_jax.data.folder import read_class_folders
from wmdd_jax.errors import ConfigError, WMDDError
from wmdd_jax.evaluate import EvaluateOptions
from wmdd_jax.models import get_model

# Fields of EvaluateOptions the suite sets itself.
_OWN = ("seed", "progress")


def get_config() -> ml_collections.ConfigDict:
  """The evaluation's fields and defaults (each a ``--config.<field>`` flag).

  ``set`` is a pipeline workdir (its ``synset/``, teacher and student protocol are used), a
  ``synset/`` directory, or a folder of PNG/JPEG images per class (the official WMDD/SRe2L
  ``new000/class000_id000.jpg`` layout, an ImageFolder; class order from the real dataset's
  class names, else sorted folder order). Students are registered models with options in
  parentheses, e.g. ``resnet18(stem=cifar,width=32)``; "" is the teacher's model. Every
  ``eval.*`` field left None takes the workdir's value (its config.json), else
  EvaluateOptions' default (the paper's protocol). Writes ``<out>.json`` and ``<out>.md``
  (default ``out``: ``<set>/evaluate``).
  """
  c = ml_collections.ConfigDict()
  c.set = ""                  # workdir, synset/ directory, or class-folder image set (required)
  c.dataset = ml_collections.ConfigDict({
      "spec": "",             # the real dataset ("" : the workdir's / the teacher's)
      "options": {},          # open_dataset options
      "train_split": "train",  # random real images come from here
      "test_split": "test",   # students are tested here
  })
  c.teacher = ""              # teacher checkpoint ("" : the workdir's); soft labels on the fly
  c.soft_labels = ""          # directory of soft_labels_seed<s>.npz: used instead of a teacher
  c.store_soft_labels = ""    # write the teacher's soft labels of each seed here
  c.export = ""               # write the set for PyTorch users here (PNG + labels.json + npz)
  c.students = ""             # comma-separated: name or name(key=value,...); "": the teacher's
  c.seeds = "0,1,2"
  c.labels = "soft,hard"
  c.random_baseline = True    # also train on random real images (same counts per class)
  c.out = ""                  # results stem: <out>.json, <out>.md ("" : <set>/evaluate)
  c.eval = ml_collections.ConfigDict()
  for field in EvaluateOptions.__dataclass_fields__.values():
    if field.name in _OWN:
      continue
    kind = type(field.default)
    c.eval[field.name] = config_dict.placeholder(kind)
  return c


def parse_students(spec: str) -> list[tuple[str, str, dict[str, Any]]]:
  """``"a,b(k=v,k2=v2)"`` -> [(label, name, options)], values parsed as int/float/bool/str."""
  out = []
  for item in re.findall(r"[^,()]+(?:\([^)]*\))?", spec or ""):
    item = item.strip()
    if not item:
      continue
    m = re.fullmatch(r"([\w.-]+)(?:\((.*)\))?", item)
    if not m:
      raise ConfigError(f"Cannot read student {item!r}; write name or name(key=value,...).")
    options = {}
    for pair in filter(None, (p.strip() for p in (m.group(2) or "").split(","))):
      key, sep, value = pair.partition("=")
      if not sep:
        raise ConfigError(f"Student option {pair!r} of {item!r} is not key=value.")
      options[key.strip()] = _value(value.strip())
    out.append((item, m.group(1), options))
  return out


def _value(text: str) -> Any:
  if text.lower() in ("true", "false"):
    return text.lower() == "true"
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return text


def _ints(text: str, what: str) -> list[int]:
  try:
    return [int(s) for s in str(text).split(",") if s.strip()]
  except ValueError as e:
    raise ConfigError(f"config.{what}={text!r} must be comma-separated integers.") from e


def load_set(config: Any) -> dict[str, Any]:
  """The set and everything around it: images, labels, weights, dataset, teacher, protocol."""
  root = os.path.abspath(config.set) if config.set else ""
  if not root or not os.path.exists(root):
    raise ConfigError(f"config.set={config.set!r} does not exist; pass a pipeline workdir, a "
                      "synset/ directory or a folder of class folders.")
  run_config: dict[str, Any] = {}
  if os.path.isfile(os.path.join(root, "config.json")):
    with open(os.path.join(root, "config.json")) as f:
      run_config = json.load(f)
  synset_dir = next((d for d in (os.path.join(root, "synset"), root)
                     if os.path.isfile(os.path.join(d, "meta.json"))), None)
  teacher_path = config.teacher or (run_config.get("teacher", {}).get("checkpoint")
                                    or (os.path.join(root, "teacher") if run_config else ""))
  teacher = None
  if teacher_path and os.path.exists(teacher_path):
    teacher = checkpoint.build_teacher(teacher_path)
  elif config.teacher:
    raise ConfigError(f"config.teacher={config.teacher!r} does not exist; pass a teacher "
                      "checkpoint (experiments/pretrain.py or import_teacher.py writes one).")
  spec = (config.dataset.spec or run_config.get("dataset", {}).get("spec")
          or (teacher[2].get("dataset") if teacher else ""))
  if not spec:
    raise ConfigError("The real dataset is unknown: pass --config.dataset.spec (the set's "
                      "class order, test split and random images come from it).")
  options = dict(config.dataset.options) or run_config.get("dataset", {}).get("options", {})
  dataset = open_dataset(spec, **options)
  if synset_dir is not None:
    synset = checkpoint.load_synthetic_set(synset_dir)
    images, labels, weights = synset.flat()
    if list(synset.class_names) != list(dataset.class_names):
      raise ConfigError(f"The set's classes {synset.class_names[:3]}... are not the dataset's "
                        f"{dataset.class_names[:3]}...; pass the dataset the set was made from.")
    kind = f"synthetic set {synset_dir}"
  else:
    pixels, labels, mapping = read_class_folders(root, list(dataset.class_names),
                                                 image_shape=tuple(dataset.image_shape))
    images = store.normalize_like_official(pixels, dataset.mean, dataset.std)
    weights = None
    table = store.read_sample_weights(root)
    counts = np.bincount(labels, minlength=dataset.num_classes)
    if table is not None and table.shape == (dataset.num_classes, counts.max()) \
        and (counts == counts.max()).all():
      weights = table.reshape(-1)
    kind = f"image folder {root} ({len(mapping)} class folders)"
  return {"root": root, "kind": kind, "images": np.asarray(images, np.float32),
          "labels": np.asarray(labels, np.int32).reshape(-1),
          "weights": None if weights is None else np.asarray(weights, np.float32).reshape(-1),
          "dataset": dataset, "spec": spec, "teacher": teacher, "teacher_path": teacher_path,
          "run_eval": run_config.get("eval", {}), "run_config": run_config}


def eval_options(config: Any, run_eval: dict[str, Any]) -> EvaluateOptions:
  """EvaluateOptions: the defaults, then the workdir's eval section, then config.eval."""
  fields = EvaluateOptions.__dataclass_fields__
  values = {k: v for k, v in run_eval.items() if k in fields and k not in ("seed", "progress")}
  values.update({k: v for k, v in config.eval.items() if v is not None})
  values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
  return EvaluateOptions(**values, progress=False)


def run(config: Any, log=print) -> dict[str, Any]:
  """Everything the script does; returns the results dict it writes."""
  start = time.perf_counter()
  s = load_set(config)
  dataset, teacher = s["dataset"], s["teacher"]
  options = eval_options(config, s["run_eval"])
  seeds = _ints(config.seeds, "seeds")
  modes = [m.strip() for m in config.labels.split(",") if m.strip()]
  student_specs = parse_students(config.students)
  if not student_specs:
    model_name = (s["run_eval"].get("model") or (teacher[2]["model"] if teacher else ""))
    model_options = (s["run_eval"].get("model_options") if s["run_eval"].get("model")
                     else (teacher[2].get("model_options") if teacher else {})) or {}
    if not model_name:
      raise ConfigError("No student named: pass --config.students=name[,name(k=v)...].")
    label = model_name + (f"({','.join(f'{k}={v}' for k, v in model_options.items())})"
                          if model_options else "")
    student_specs = [(label, model_name, dict(model_options))]
  students = [(label, get_model(name, dataset.num_classes, **opts))
              for label, name, opts in student_specs]
  weights = s["weights"] if options.use_weights else None
  log(f"evaluating {s['kind']}: {len(s['labels'])} images, {dataset.num_classes} classes; "
      f"students {[lbl for lbl, _ in students]}, seeds {seeds}, labels {modes}")

  soft = {}
  if config.soft_labels:
    for seed in seeds:
      path = os.path.join(config.soft_labels, f"soft_labels_seed{seed}.npz")
      soft[seed] = protocol.load_soft_labels(path)
  stored_paths = []
  if config.store_soft_labels:
    if teacher is None:
      raise ConfigError("config.store_soft_labels needs a teacher (config.teacher).")
    for seed in seeds:
      labels = protocol.teacher_soft_labels(teacher[0], teacher[1], s["images"], options,
                                            protocol.student_key(seed), mean=dataset.mean,
                                            std=dataset.std, seed=seed)
      path = os.path.join(config.store_soft_labels, f"soft_labels_seed{seed}.npz")
      stored_paths.append(protocol.save_soft_labels(path, labels))
      log(f"soft labels of seed {seed}: {path}")
  if config.export:
    store.export_for_pytorch(config.export, s["images"], s["labels"], dataset.class_names,
                             dataset.mean, dataset.std, weights=s["weights"],
                             soft_labels=stored_paths, overwrite=True)
    log(f"exported for PyTorch: {config.export}")

  counts = np.bincount(s["labels"], minlength=dataset.num_classes)
  train_split, test_split = config.dataset.train_split, config.dataset.test_split
  random_images = None
  if config.random_baseline:
    random_images = lambda seed: protocol.random_real(dataset, train_split, counts, seed)
  result = protocol.evaluate_set(
      s["images"], s["labels"], weights, dataset.load_split(test_split),
      students=students, seeds=seeds, label_modes=modes,
      teacher=None if teacher is None else teacher[:2], soft_labels=soft or None,
      random_images=random_images, mean=dataset.mean, std=dataset.std, options=options, log=log)
  table = protocol.markdown_table(result, modes)
  teacher_note = (f"teacher {s['teacher_path']} ({teacher[2].get('model')}, test top-1 "
                  f"{teacher[2]['test_top1']:.1f}%)" if teacher and "test_top1" in teacher[2]
                  else f"teacher {s['teacher_path'] or 'none'}")
  seconds = time.perf_counter() - start
  ipc = sorted(set(counts.tolist()))
  title = (f"{s['kind']} on {s['spec']} (images per class {ipc}): student test top-1 (%), "
           f"mean +- sample std over seeds {seeds}")
  notes = (f"Soft labels: the teacher's logits on each view (KD, T={options.temperature:g}); "
           "hard labels: cross-entropy on the same views with CutMix-mixed one-hot labels. "
           f"{options.epochs} epochs, batch {options.batch_size}, crops {options.crop_scale}, "
           f"CutMix {options.cutmix}. "
           + (f"Random real: the same per-class counts from {train_split!r}, drawn per seed; "
              "gain = set - random, paired by seed. " if config.random_baseline else "")
           + f"{teacher_note}. {seconds:.0f} s in all.")
  markdown = f"{title}\n\n{table}\n\n{notes}\n"
  print(markdown)
  out = config.out or os.path.join(s["root"], "evaluate")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  data = {"benchmark": "a synthetic set under the soft- and hard-label protocols, several "
                       "students and seeds, against random real images",
          "script": "experiments/evaluate.py",
          "command": "python " + shlex.join(["experiments/evaluate.py", *sys.argv[1:]]),
          "set": s["root"], "kind": s["kind"], "dataset": s["spec"],
          "teacher": s["teacher_path"], "images_per_class": counts.tolist(),
          "students": [lbl for lbl, _ in students], "seeds": seeds, "labels": modes,
          "options": {k: getattr(options, k) for k in EvaluateOptions.__dataclass_fields__},
          **result, "seconds": round(seconds, 1), "machine": _machine()}
  from wmdd_jax import report  # noqa: PLC0415

  report.write_json(f"{out}.json", data)
  with open(f"{out}.md", "w") as f:
    f.write(markdown)
  log(f"wrote {out}.json and {out}.md")
  return data


def _machine() -> dict[str, Any]:
  import platform  # noqa: PLC0415

  import jax  # noqa: PLC0415

  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                 cpu)
  except OSError:
    pass
  return {"backend": jax.default_backend(), "device_count": jax.device_count(),
          "devices": [str(d) for d in jax.devices()], "cpu_model": cpu,
          "cpu_count": os.cpu_count(), "jax": jax.__version__}


def main() -> None:
  """Parses the flags (``--config.<field>`` of :func:`get_config`; defined here so that importing
  this file, as the tests do, defines none) and runs :func:`run`."""
  from absl import app, logging  # noqa: PLC0415
  from ml_collections import config_flags  # noqa: PLC0415

  config = config_flags.DEFINE_config_dict("config", get_config(),
                                           "The evaluation (--config.<field>=value).",
                                           lock_config=True)

  def start(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments {argv[1:]}; see --help.")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
    try:
      run(config.value)
    except WMDDError as e:  # made on purpose: the message names the cause and the fix
      sys.exit(f"error: {e}")

  app.run(start)


if __name__ == "__main__":
  main()
