"""Trains (squeezes) the teacher of an experiment config and saves it to ``WORKDIR/teacher``.

    python experiments/pretrain.py --config experiments/configs/digits.py --workdir runs/digits
    python experiments/pretrain.py --config experiments/configs/cifar10.py --workdir runs/c10 \\
        --config.teacher.epochs=50 --config.teacher.model_options.stem=cifar
    python experiments/pretrain.py --config experiments/configs/digits.py --workdir /tmp/d \\
        --config.debug=True        # shrunk: 2 epochs of at most 20 steps, 2 eval batches

Writes ``WORKDIR/teacher`` (Orbax; what ``experiments/distill.py`` with the same workdir then
loads instead of training) and ``WORKDIR/teacher_metrics.jsonl`` (one line per epoch). An
existing teacher is kept: delete it to train again. Each config's docstring gives its expected
runtime and accuracy. The meta is :func:`wmdd_jax.checkpoint.teacher_meta`'s, so
``wmdd_jax.checkpoint.build_teacher(WORKDIR/teacher)`` rebuilds the model from the file alone.
"""

import json
import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from wmdd_jax import checkpoint, pipeline, train
from wmdd_jax.data import open_dataset
from wmdd_jax.errors import ConfigError
from wmdd_jax.models import get_model

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the teacher and its metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def _plain(value):
  return value.to_dict() if hasattr(value, "to_dict") else value


def main(argv):
  del argv
  config = _CONFIG.value
  if config.debug:
    config = pipeline.debug_config(config)
    with config.unlocked():
      config.teacher.max_eval_batches = 2
  workdir = _WORKDIR.value
  os.makedirs(workdir, exist_ok=True)
  path = config.teacher.get("checkpoint") or os.path.join(workdir, "teacher")
  if os.path.exists(path):
    logging.info("A teacher already exists at %s; delete it to train again.", path)
    return

  dataset = open_dataset(config.dataset.spec, **_plain(config.dataset.options))
  train_split = config.dataset.get("train_split", "train")
  test_split = config.dataset.get("test_split", "test")
  teacher = config.teacher
  model_options = _plain(teacher.get("model_options")) or {}
  model = get_model(teacher.model, dataset.num_classes, **model_options)
  fields = {f: _plain(teacher[f]) for f in train.TeacherConfig.__dataclass_fields__
            if f in teacher}
  tcfg = train.TeacherConfig(**{**fields, "seed": int(config.seed)})

  # Small splits are loaded once; large ones (ImageNet) are streamed by the data layer. Teacher
  # training is data-parallel over this host's devices (one process).
  if jax.process_count() > 1:
    raise ConfigError("pretrain.py trains on one host's devices; run it as a single process "
                      "(multi-host teacher training is not supported).")
  try:
    train_data = dataset.load_split(train_split)
    steps_per_epoch = None
  except ConfigError:
    logging.info("Streaming %s: the split does not fit in memory.", train_split)
    bs, seed = tcfg.batch_size, tcfg.seed
    train_data = lambda epoch: dataset.iter_batches(
        train_split, bs, shuffle=True, seed=seed * 100_003 + epoch, drop_remainder=True)
    steps_per_epoch = dataset.num_examples(train_split) // bs
  test_data = lambda epoch: dataset.iter_batches(test_split, tcfg.eval_batch_size)

  metrics_path = os.path.join(workdir, "teacher_metrics.jsonl")
  variables = train.train_teacher(
      model, train_data, test_data, tcfg, mean=dataset.mean, std=dataset.std,
      steps_per_epoch=steps_per_epoch, image_shape=dataset.image_shape,
      metrics_path=metrics_path)
  with open(metrics_path) as f:
    final = json.loads(f.readlines()[-1])  # the last epoch is always evaluated
  meta = checkpoint.teacher_meta(
      model=teacher.model, model_options=model_options, num_classes=dataset.num_classes,
      class_names=dataset.class_names, image_shape=dataset.image_shape, mean=dataset.mean,
      std=dataset.std, dataset=config.dataset.spec, test_top1=final["test_top1"],
      test_top5=final["test_top5"], config=json.loads(config.to_json_best_effort()))
  checkpoint.save_teacher(path, variables, meta)
  print(f"teacher: {teacher.model} test top-1 {final['test_top1']:.2f}% "
        f"top-5 {final['test_top5']:.2f}%; saved to {path}")


if __name__ == "__main__":
  app.run(main)
