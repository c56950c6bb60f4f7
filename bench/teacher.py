"""Benchmark: train a ConvNet-D3 teacher on Fashion-MNIST (and optionally a ResNet-18).

    .venv/bin/python -m bench.teacher                    # ConvNet-D3 (docs/benchmarks.md: time)
    .venv/bin/python -m bench.teacher --resnet_epochs=2  # also a short ResNet-18 (cifar stem)
    .venv/bin/python -m bench.teacher --epochs=1 --max_steps=20 --out=/tmp/t.json  # smoke test
    python -m bench.teacher --sweep --out=bench/results/teacher_sweep_gpu.json  # SWEEP, on a GPU

Reads the IDX files through ``open_dataset("idx:<dir>")`` (default ``../shared/datasets/
fashion-mnist`` next to the repository), trains with :func:`wmdd_jax.teacher.train_teacher` and
writes ``bench/results/teacher.json``: test top-1/top-5, wall time, training images/s, peak RSS
and the machine (devices, CPU count, load average: this machine is shared, so timings vary).
Target: ConvNet-D3 >= 92% test top-1 (the DD literature reports ~93.5% with long training).
``--sweep`` trains the :data:`SWEEP` grid instead (the runs that picked the defaults below).
The figures are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

from bench.common import RESULTS_DIR, ROOT, machine, peak_rss_mib, write_result
from wmdd_jax.data import open_dataset
from wmdd_jax.models import get_model
from wmdd_jax.teacher import TeacherOptions, train_teacher


def run(name: str, model_name: str, model_options: dict, ds, config: TeacherOptions,
        progress: bool) -> dict:
  model = get_model(model_name, ds.num_classes, **model_options)
  train = ds.load_split("train")
  test = ds.load_split("test")
  with tempfile.TemporaryDirectory() as tmp:
    metrics_path = os.path.join(tmp, "metrics.jsonl")
    t0 = time.perf_counter()
    train_teacher(model, train, test, config, mean=ds.mean, std=ds.std,
                  metrics_path=metrics_path, progress=progress)
    wall = time.perf_counter() - t0
    with open(metrics_path) as f:
      epochs = [json.loads(line) for line in f]
  final = epochs[-1]
  # The first epoch includes compilation; report the steady-state median of the others.
  steady = [e["images_per_s"] for e in epochs[1:]] or [epochs[0]["images_per_s"]]
  result = {
      "name": name,
      "model": model_name,
      "model_options": model_options,
      "config": {k: v for k, v in config.__dict__.items()},
      "test_top1": final.get("test_top1"),
      "test_top5": final.get("test_top5"),
      "wall_seconds": wall,
      "train_images_per_s_median": statistics.median(steady),
      "first_epoch_seconds": epochs[0]["train_seconds"],
      "epochs": epochs,
  }
  print(f"{name}: test top-1 {result['test_top1']:.2f}%  wall {wall:.0f} s  "
        f"{result['train_images_per_s_median']:.0f} img/s", flush=True)
  return result


# (epochs, lr, augmentation, batch, label smoothing): the grid that picked the CPU defaults (run
# on a GPU, where each run takes seconds): bench/results/teacher_sweep_gpu.json.
SWEEP = (
    [(e, lr, aug, 128, 0.0) for e in (3, 4, 6) for lr in (0.02, 0.05, 0.1)
     for aug in ("none", "flip", "crop2flip")]
    + [(4, 0.05, "flip", 128, 0.1), (4, 0.1, "flip", 256, 0.0), (4, 0.2, "flip", 256, 0.0),
       (3, 0.1, "flip", 256, 0.0), (3, 0.2, "flip", 256, 0.0), (4, 0.05, "none", 64, 0.0),
       (4, 0.1, "none", 64, 0.0), (5, 0.1, "none", 128, 0.0), (5, 0.2, "none", 128, 0.0),
       (5, 0.05, "none", 64, 0.0), (4, 0.02, "none", 64, 0.0), (6, 0.2, "none", 128, 0.0),
       (5, 0.1, "none", 64, 0.0), (4, 0.1, "flip", 64, 0.0)])


def sweep(ds, out: str) -> None:
  """Trains ConvNet-D3 for every SWEEP entry; writes their final test top-1 to ``out``."""
  train, test = ds.load_split("train"), ds.load_split("test")
  runs = []
  for epochs, lr, aug, batch, smoothing in SWEEP:
    config = TeacherOptions(epochs=epochs, batch_size=batch, learning_rate=lr, weight_decay=5e-4,
                           crop_padding=2 if aug == "crop2flip" else 0, flip=aug != "none",
                           label_smoothing=smoothing, eval_every=epochs, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "m.jsonl")
      t0 = time.perf_counter()
      train_teacher(get_model("convnet_d3", ds.num_classes), train, test, config, mean=ds.mean,
                    std=ds.std, metrics_path=path, progress=False)
      with open(path) as f:
        last = json.loads(f.readlines()[-1])
    runs.append(dict(epochs=epochs, lr=lr, aug=aug, bs=batch, ls=smoothing,
                     test_top1=last["test_top1"], seconds=time.perf_counter() - t0))
    print(json.dumps(runs[-1]), flush=True)
  write_result(out, {"benchmark": "teacher_sweep", "dataset": ds.spec, "runs": runs})


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", default="idx:" + os.path.join(
      os.path.dirname(ROOT), "shared", "datasets", "fashion-mnist"))
  # Defaults picked by the SWEEP grid on a GPU (bench/results/teacher_sweep_gpu.json, rendered in
  # docs/benchmarks.md): with a CPU-sized number of epochs, no augmentation and a small batch
  # converged fastest there.
  parser.add_argument("--epochs", type=int, default=5)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--lr", type=float, default=0.1)
  parser.add_argument("--weight_decay", type=float, default=5e-4)
  parser.add_argument("--crop_padding", type=int, default=0)
  parser.add_argument("--flip", action="store_true", help="random horizontal flips")
  parser.add_argument("--max_steps", type=int, default=None, help="cap steps per epoch (smoke)")
  parser.add_argument("--resnet_epochs", type=int, default=0,
                      help="also train ResNet-18 (cifar stem) this many epochs (0: skip)")
  parser.add_argument("--out", default=os.path.join(RESULTS_DIR, "teacher.json"))
  parser.add_argument("--no_progress", action="store_true")
  parser.add_argument("--sweep", action="store_true",
                      help="run the SWEEP grid instead (meant for a GPU) and write --out")
  args = parser.parse_args(argv)

  t0 = time.perf_counter()
  load_at_start = os.getloadavg()
  ds = open_dataset(args.data)
  if args.sweep:
    sweep(ds, args.out)
    return
  common = dict(batch_size=args.batch_size, learning_rate=args.lr,
                weight_decay=args.weight_decay, crop_padding=args.crop_padding, flip=args.flip,
                eval_every=1, max_steps_per_epoch=args.max_steps, seed=0)
  runs = [run("convnet_d3", "convnet_d3", {}, ds, TeacherOptions(epochs=args.epochs, **common),
              not args.no_progress)]
  if args.resnet_epochs:
    runs.append(run("resnet18_cifar", "resnet18", {"stem": "cifar"}, ds,
                    TeacherOptions(epochs=args.resnet_epochs, **common), not args.no_progress))
  out = {
      "benchmark": "teacher",
      "dataset": args.data,
      "image_shape": list(ds.image_shape),
      "train_examples": ds.num_examples("train"),
      "test_examples": ds.num_examples("test"),
      "target_top1": 92.0,
      "runs": runs,
      "total_wall_seconds": time.perf_counter() - t0,
      "peak_rss_mib": peak_rss_mib(),
      "machine": machine(load_average_at_start=load_at_start),
  }
  write_result(args.out, out)
  print(f"peak RSS {out['peak_rss_mib']:.0f} MiB")


if __name__ == "__main__":
  main()
