"""Benchmark: images/s of the input pipeline, the sync reader against loader='grain' (issue 13).

    .venv/bin/python -m bench.input                                 # bench/results/input.json
    .venv/bin/python -m bench.input --rounds=1 --n224=100 --n32=1000 --teacher_steps=0 \\
        --out=/tmp/input.json                                       # smoke test

Makes its data under ``--data_dir`` (default ``/tmp/wmdd_input_bench``; reused when present)
from ``../shared/datasets/cifar10-dev/cifar10-dev.npz``: a ``folder:`` of 224 px JPEGs (the
32 px images upscaled, quality 90), a ``folder:`` of 32 px JPEGs, and the 32 px arrays
(``npz:``). For every format it reads the train split with each loader through
:meth:`wmdd_jax.data.Dataset.epochs` (what a training loop reads), ``--epochs`` epochs in a
row: ``images_per_s`` is the steady rate from the first batch's arrival to the end (epoch
boundaries included, grain's worker start-up not), ``epoch0_images_per_s`` the rate of the first
epoch with the start-up, ``first_batch_s`` the start-up itself. The loaders are interleaved
within each round; figures are medians over ``--rounds``. Every loader's batches are hashed and
compared with the sync reader's (they must be the same batches in the same order).

Then whether teacher training waits on data: a ConvNet-D3 teacher (as in the issue) trained
from the 32 px JPEG folder streamed through each loader, against the same batches held in
memory; the time the loop spends blocked on the next batch, and the epoch time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import tempfile
import time

import numpy as np
from PIL import Image

from bench.common import RESULTS_DIR, ROOT, machine, peak_rss_mib, write_result
from wmdd_jax.data import open_dataset

NPZ = os.path.join(os.path.dirname(ROOT), "shared", "datasets", "cifar10-dev", "cifar10-dev.npz")

# (name, loader options); the first is the reference every other is checked against.
LOADERS = (
    ("sync", {"loader": "sync"}),
    # Threads per process: the default, min(8, cores) shared among the processes.
    ("grain w0", {"loader": "grain", "worker_count": 0}),  # grain's threads, no processes
    ("grain w1", {"loader": "grain", "worker_count": 1}),
    ("grain w2", {"loader": "grain", "worker_count": 2}),
)


def make_data(data_dir: str, n224: int, n32: int) -> dict[str, str]:
  """Writes the JPEG folders (once); returns {format: spec}."""
  d = np.load(NPZ)
  x, y, names = d["x_train"], d["y_train"], [str(n) for n in d["class_names"]]
  specs = {}
  for fmt, n, size in (("jpeg224", n224, 224), ("jpeg32", n32, 32)):
    root = os.path.join(data_dir, f"{fmt}_{n}")
    done = os.path.join(root, ".complete")
    if not os.path.exists(done):
      for i in range(n):
        folder = os.path.join(root, "train", names[int(y[i])])
        os.makedirs(folder, exist_ok=True)
        im = Image.fromarray(x[i])
        if size != 32:
          im = im.resize((size, size), Image.Resampling.BICUBIC)
        im.save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)
      with open(done, "w") as f:
        f.write("ok\n")
    specs[fmt] = f"folder:{root}"
  specs["npz32"] = f"npz:{NPZ}"
  return specs


def read_epochs(ds, batch: int, seed: int, epochs: int) -> dict:
  """Reads ``epochs`` epochs of ds's train split; times, and a hash of every batch."""
  digest = hashlib.sha256()
  t0 = time.perf_counter()
  stream = ds.epochs("train", batch, seed=seed, drop_remainder=False)
  n, first, first_size = 0, None, 0
  try:
    for epoch in range(epochs):
      for images, labels in stream(epoch):
        if first is None:
          first, first_size = time.perf_counter(), len(labels)
        digest.update(labels.tobytes())
        digest.update(np.ascontiguousarray(images[:, ::7, ::7]).tobytes())
        n += len(labels)
      if epoch == 0:
        epoch0 = time.perf_counter() - t0
  finally:
    stream.close()
  end = time.perf_counter()
  # Steady state: from the first batch's arrival (worker start-up excluded) to the end,
  # epoch boundaries included.
  return {"first_batch_s": first - t0, "epoch0_s": epoch0,
          "steady_images_per_s": (n - first_size) / (end - first),
          "images_per_epoch": n // epochs, "hash": digest.hexdigest()}


def _resolved(ds) -> dict:
  o = ds.loader_options
  if o.loader == "sync":
    return {"worker_count": None, "read_threads": None}
  return {"worker_count": o.worker_count, "read_threads": o.read_threads}


def bench_loaders(specs: dict[str, str], rounds: int, batch: dict[str, int],
                  epochs: int) -> list[dict]:
  rows: dict[tuple[str, str], dict] = {}
  for r in range(rounds):
    for fmt, spec in specs.items():
      base = open_dataset(spec)
      reference = None
      for name, options in LOADERS:
        ds = base.with_loader(**options)
        load0 = os.getloadavg()[0]
        m = read_epochs(ds, batch[fmt], seed=r, epochs=epochs)
        if reference is None:
          reference = m["hash"]
        row = rows.setdefault((fmt, name), {
            "format": fmt, "loader": name, **_resolved(ds),
            "batch": batch[fmt], "images_per_epoch": m["images_per_epoch"],
            "steady": [], "cold": [], "first_batch_s": [], "load_1min": [],
            "same_batches_as_sync": True})
        row["steady"].append(m["steady_images_per_s"])
        row["cold"].append(m["images_per_epoch"] / m["epoch0_s"])
        row["first_batch_s"].append(m["first_batch_s"])
        row["load_1min"].append(load0)
        row["same_batches_as_sync"] &= m["hash"] == reference
        print(f"round {r} {fmt:8s} {name:9s} steady {row['steady'][-1]:8.0f} img/s  epoch0 "
              f"{row['cold'][-1]:8.0f} img/s  first batch {m['first_batch_s']:.2f} s  "
              f"load {load0:.1f}", flush=True)
  out = []
  for (fmt, _), row in rows.items():
    sync = rows[(fmt, "sync")]
    out.append({
        **{k: v for k, v in row.items() if k not in ("steady", "cold", "first_batch_s",
                                                      "load_1min")},
        "images_per_s": statistics.median(row["steady"]),
        "speedup_vs_sync": statistics.median(row["steady"]) / statistics.median(sync["steady"]),
        "epoch0_images_per_s": statistics.median(row["cold"]),
        "first_batch_s": statistics.median(row["first_batch_s"]),
        "images_per_s_rounds": [round(v, 1) for v in row["steady"]],
        "load_1min_rounds": [round(v, 2) for v in row["load_1min"]],
    })
  return out


def teacher_wait(spec: str, classes: list[int], batch: int, epochs: int) -> list[dict]:
  """ConvNet-D3 trained from the streamed split by each loader, and from the same batches in
  memory: per epoch (after the first, which compiles) the time blocked on data and the total."""
  from wmdd_jax.models import get_model  # noqa: PLC0415
  from wmdd_jax.teacher import TeacherOptions, train_teacher  # noqa: PLC0415

  base = open_dataset(spec)
  config = TeacherOptions(epochs=epochs, batch_size=batch, learning_rate=0.05, crop_padding=2,
                          flip=True, eval_every=epochs, seed=0)
  model = get_model("convnet_d3", base.num_classes)
  runs = []
  for name, options in (("in memory", None), *LOADERS):
    ds = base.with_loader(**(options or {"loader": "sync"}))
    stream = ds.epochs("train", batch, seed=config.seed, classes=classes)
    if options is None:  # The same batches, read beforehand.
      held = {e: list(stream(e)) for e in range(epochs)}
      source = lambda e, held=held: iter(held[e])
    else:
      source = stream
    waits: dict[int, float] = {}

    def data(epoch, source=source, waits=waits):
      it = iter(source(epoch))
      while True:
        t = time.perf_counter()
        try:
          item = next(it)
        except StopIteration:
          return
        finally:
          waits[epoch] = waits.get(epoch, 0.0) + time.perf_counter() - t
        yield item

    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "m.jsonl")
      load0 = os.getloadavg()[0]
      train_teacher(model, data, None, config, mean=base.mean, std=base.std,
                    steps_per_epoch=stream.steps_per_epoch, image_shape=base.image_shape,
                    metrics_path=path, progress=False)
      with open(path) as f:
        records = [json.loads(line) for line in f]
    stream.close()
    later = records[1:]  # Epoch 1 compiles the step.
    seconds = sum(r["train_seconds"] for r in later)
    waited = sum(waits[r["epoch"] - 1] for r in later)
    steps = stream.steps_per_epoch * len(later)
    runs.append({"data": name, "epochs_timed": len(later), "steps": steps,
                 "step_s": seconds / steps, "waiting_for_data_s_per_step": waited / steps,
                 "waiting_fraction": waited / seconds,
                 "images_per_s": steps * batch / seconds,
                 "first_epoch_s": records[0]["train_seconds"], "load_1min": load0})
    print(json.dumps(runs[-1]), flush=True)
  return runs


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", default=os.path.join(tempfile.gettempdir(),
                                                         "wmdd_input_bench"))
  parser.add_argument("--n224", type=int, default=1000, help="224 px JPEGs to write")
  parser.add_argument("--n32", type=int, default=8000, help="32 px JPEGs to write (<= 8000)")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--epochs", type=int, default=3, help="epochs read per measurement")
  parser.add_argument("--teacher_steps", type=int, default=6,
                      help="teacher steps per epoch (batch 256, 3 epochs; 0: skip)")
  parser.add_argument("--out", default=os.path.join(RESULTS_DIR, "input.json"))
  args = parser.parse_args(argv)

  t0 = time.perf_counter()
  load_at_start = os.getloadavg()
  specs = make_data(args.data_dir, args.n224, args.n32)
  print(f"data ready in {time.perf_counter() - t0:.0f} s: {specs}", flush=True)
  batch = {"jpeg224": 128, "jpeg32": 256, "npz32": 256}
  results = bench_loaders(specs, args.rounds, batch, args.epochs)
  teacher = []
  if args.teacher_steps:
    # Classes 0..k-1 of the 32 px JPEG folder: ~teacher_steps batches of 256 per epoch.
    counts = open_dataset(specs["jpeg32"]).class_counts("train")
    classes, total = [], 0
    for c, n in enumerate(counts):
      if total >= args.teacher_steps * 256:
        break
      classes.append(c)
      total += n
    teacher = teacher_wait(specs["jpeg32"], classes, 256, 3)
  write_result(args.out, {
      "benchmark": "input pipeline: images/s of loader='sync' (the reader before issue 13) and "
                   "loader='grain' reading the train split epoch after epoch "
                   "(Dataset.epochs); teacher steps waiting on data",
      "data": {fmt: spec.replace(args.data_dir, "<data_dir>").replace(
          os.path.dirname(ROOT), "..") for fmt, spec in specs.items()},
      "results": results,
      "teacher_wait": teacher,
      "total_wall_s": time.perf_counter() - t0,
      "peak_rss_mib": peak_rss_mib(),
      "machine": machine(load_average_at_start=load_at_start),
  })


if __name__ == "__main__":
  main()
