"""Evaluating a synthetic set: students x seeds, soft and hard labels, random real images.

    python experiments/evaluate.py --config experiments/configs/evaluate.py \\
        --config.set=demo_out/wmdd --config.out=bench/results/evaluate_demo
    python experiments/evaluate.py --config experiments/configs/evaluate.py \\
        --config.set=syn_data --config.dataset.spec=folder:/data/imagenette \\
        --config.teacher=runs/in/teacher --config.students="resnet18,convnet_d4"

``set`` is a pipeline workdir (its ``synset/``, teacher and student protocol are used), a
``synset/`` directory, or a folder of PNG/JPEG images per class (the official WMDD/SRe2L
``new000/class000_id000.jpg`` layout, an ImageFolder; class order from the real dataset's class
names, else sorted folder order). Students are registered models with options in parentheses,
e.g. ``resnet18(stem=cifar,width=32)``; "" is the teacher's model. Every ``eval.*`` field left
None takes the workdir's value (its config.json), else EvaluateOptions' default (the paper's
protocol). Writes ``<out>.json`` and ``<out>.md`` (default ``out``: ``<set>/evaluate``).
"""

import ml_collections
from ml_collections import config_dict

from wmdd_jax.evaluate import EvaluateOptions

# Fields of EvaluateOptions the suite sets itself.
_OWN = ("seed", "progress")


def get_config():
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
