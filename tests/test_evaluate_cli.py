"""experiments/evaluate.py and wmdd_jax.protocol: stored soft labels, hard labels, image folders
without classes.json, the PyTorch export, and the students x seeds table."""

import importlib.util
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from wmdd_jax import ConfigError, DataError, checkpoint, protocol, store
from wmdd_jax.data.folder import read_class_folders
from wmdd_jax.evaluate import EvaluateOptions, train_student
from wmdd_jax.models import get_model
from wmdd_jax.relabel import batch_key, epoch_batches, make_views, stream_keys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (8, 8, 1)
C = 3


def _load(path, name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """A 3-class 8x8 greyscale dataset (npz:) whose classes are bright blobs in different places,
  and a ConvNet teacher trained on it for a few steps by hand."""
  tmp = tmp_path_factory.mktemp("world")
  rng = np.random.default_rng(0)

  def draw(n):
    y = np.repeat(np.arange(C), n // C)
    x = rng.integers(0, 60, size=(len(y), *SHAPE)).astype(np.uint8)
    for i, c in enumerate(y):
      x[i, 2 * c:2 * c + 3, 1:6] = 220
    return x, y

  x_train, y_train = draw(60)
  x_test, y_test = draw(30)
  names = np.asarray(["alpha", "beta", "gamma"])
  path = tmp / "blobs.npz"
  np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
           class_names=names)
  spec = f"npz:{path}"
  from wmdd_jax.data import open_dataset

  dataset = open_dataset(spec)
  model = get_model("convnet", C, depth=1, width=8)
  from wmdd_jax import teacher as teacher_lib

  options = teacher_lib.TeacherOptions(epochs=4, batch_size=20, learning_rate=0.05,
                                       crop_padding=0, flip=False, eval_every=4)
  variables = teacher_lib.train_teacher(model, dataset.load_split("train"), None, options,
                                        mean=dataset.mean, std=dataset.std, image_shape=SHAPE,
                                        progress=False)
  meta = checkpoint.teacher_meta(model="convnet", model_options={"depth": 1, "width": 8},
                                 num_classes=C, class_names=list(names), image_shape=SHAPE,
                                 mean=dataset.mean, std=dataset.std, dataset=spec)
  teacher_dir = checkpoint.save_teacher(tmp / "teacher", variables, meta)
  return {"tmp": tmp, "spec": spec, "dataset": dataset, "teacher": teacher_dir,
          "x_train": x_train, "y_train": y_train}


def _official_folder(root, world, ipc=2):
  """The set as the official recover writes it: new{c:03d}/class{c:03d}_id{j:03d}.jpg, its
  sample_weights.txt, and no classes.json (two train images of each class)."""
  pixels = np.stack([world["x_train"][world["y_train"] == c][:ipc] for c in range(C)])
  return store.write_image_folder(root, pixels, weights=np.full((C, ipc), 0.5))


_make_views = jax.jit(make_views, static_argnames=("scale", "ratio", "use_cutmix", "alpha"))


def test_view_schedule_is_the_views_of_train_student(key):
  options = EvaluateOptions(epochs=2, batch_size=4, crop_scale=(0.3, 1.0))
  images = jax.random.normal(key, (12, *SHAPE))
  schedule = protocol.view_schedule(12, SHAPE, options, key)
  _, shuffle_key, views_key = stream_keys(key)
  for epoch in range(2):
    for step, idx in enumerate(epoch_batches(shuffle_key, epoch, 12, 4)):
      want, mix = _make_views(batch_key(views_key, epoch, step), images[idx],
                              scale=options.crop_scale)
      b = schedule.batch(epoch, step)
      np.testing.assert_array_equal(b["index"], idx)
      got = protocol._apply_views(images[b["index"]], b["crop"], b["flip"], b["perm"],
                                  b["box"])
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
      assert float(b["lam"]) == float(mix.lam)


def test_stored_soft_labels_reproduce_train_student(world, tmp_path):
  """Evaluating with the stored soft labels (float16 on disk) gives what the on-the-fly teacher
  gives: same accuracy, losses to 1e-3."""
  teacher, tvars, _ = checkpoint.build_teacher(world["teacher"])
  ds = world["dataset"]
  x = store.normalize_like_official(world["x_train"][::5], ds.mean, ds.std)  # 12 images
  weights = np.linspace(0.5, 1.5, len(x)).astype(np.float32)
  options = EvaluateOptions(epochs=2, batch_size=6, eval_every=1, progress=False)
  key = protocol.student_key(1)
  labels = protocol.teacher_soft_labels(teacher, tvars, x, options, key, mean=ds.mean,
                                        std=ds.std, seed=1)
  path = protocol.save_soft_labels(tmp_path / "soft_labels_seed1.npz", labels)
  loaded = protocol.load_soft_labels(path)
  assert loaded.meta["format"] == protocol.SOFT_LABELS_FORMAT and loaded.meta["seed"] == 1
  np.testing.assert_allclose(loaded.logits, labels.logits, rtol=1e-2, atol=1e-2)
  student = get_model("convnet", C, depth=1, width=4)
  test = ds.load_split("test")
  want = train_student(student, teacher, tvars, x, weights, test, mean=ds.mean, std=ds.std,
                       options=options, key=key)
  got = protocol.train_on_schedule(student, x, loaded.schedule, test, mode="soft",
                                   soft_logits=loaded.logits, weights=weights, mean=ds.mean,
                                   std=ds.std, options=options, key=key)
  assert [r.top1 for r in got.history] == [r.top1 for r in want.history]
  np.testing.assert_allclose([r.train_loss for r in got.history],
                             [r.train_loss for r in want.history], rtol=1e-3)


def test_summaries():
  cell = protocol.summarize([80.0, 84.0, 88.0])
  assert (cell["mean"], cell["std"], cell["n"]) == (84.0, 4.0, 3)  # sample std
  assert protocol.format_cell(cell) == "84.0 +- 4.0"
  assert protocol.format_cell(protocol.summarize([70.0])) == "70.0"
  table = protocol.markdown_table({"summary": {"s": {"set/soft": cell, "gain/soft": cell}}},
                                  ["soft"])
  assert table.splitlines()[2] == "| s | 84.0 +- 4.0 | +84.0 +- 4.0 |"  # no empty columns


def test_read_class_folders_rules(world, tmp_path):
  names = list(world["dataset"].class_names)
  root = _official_folder(tmp_path / "official", world)
  images, labels, mapping = read_class_folders(root, names, image_shape=SHAPE)
  assert images.shape == (6, *SHAPE) and labels.tolist() == [0, 0, 1, 1, 2, 2]
  assert mapping == {"new000": "alpha", "new001": "beta", "new002": "gamma"}
  # By name, in any folder order, and PNGs.
  for c, name in [(2, "gamma"), (0, "alpha")]:
    os.makedirs(tmp_path / "named" / name)
    Image.fromarray(world["x_train"][world["y_train"] == c][0][..., 0]).save(
        tmp_path / "named" / name / "a.png")
  _, labels, _ = read_class_folders(str(tmp_path / "named"), names, image_shape=SHAPE)
  assert labels.tolist() == [0, 2]
  os.makedirs(tmp_path / "named" / "delta")
  Image.fromarray(world["x_train"][0][..., 0]).save(tmp_path / "named" / "delta" / "a.png")
  with pytest.raises(DataError, match="rename or remove"):  # not silently sorted
    read_class_folders(str(tmp_path / "named"), names)
  os.makedirs(tmp_path / "other" / "x")
  with pytest.raises(DataError, match="not its class names"):
    read_class_folders(str(tmp_path / "other"), names)


def test_evaluate_an_official_image_folder_without_classes_json(world, tmp_path):
  """The CLI's run() on a folder as the official code writes it: soft and hard labels, random
  real images; stores soft labels and exports for PyTorch; then the
  stored soft labels alone (no teacher) give the same soft-label results."""
  evaluate = _load("experiments/evaluate.py", "evaluate_cli")
  root = _official_folder(tmp_path / "syn", world)
  assert not os.path.exists(os.path.join(root, "classes.json"))
  config = evaluate.get_config()
  config.set = root
  config.dataset.spec = world["spec"]
  config.teacher = world["teacher"]
  config.students = "convnet(depth=1,width=4)"
  config.seeds = "1"
  config.eval.epochs = 2
  config.eval.eval_every = 2
  config.store_soft_labels = str(tmp_path / "soft")
  config.export = str(tmp_path / "export")
  config.out = str(tmp_path / "results" / "evaluate")
  result = evaluate.run(config, log=lambda *a: None)
  assert len(result["runs"]) == 2 * 2  # sources x label modes
  assert all(np.isfinite(r["top1"]) for r in result["runs"])
  cells = result["summary"]["convnet(depth=1,width=4)"]
  assert cells["set/soft"]["n"] == 1 and cells["gain/hard"]["n"] == 1
  assert cells["gain/soft"]["mean"] == pytest.approx(
      cells["set/soft"]["mean"] - cells["random/soft"]["mean"])
  with open(config.out + ".json") as f:
    assert json.load(f)["images_per_class"] == [2, 2, 2]
  with open(config.out + ".md") as f:
    table = f.read()
  assert "| convnet(depth=1,width=4) |" in table and "gain over random" in table
  # The export: PNG class folders in label order, labels.json, exact floats, soft labels.
  with open(tmp_path / "export" / "labels.json") as f:
    meta = json.load(f)
  assert meta["class_names"] == ["alpha", "beta", "gamma"]
  assert [e["label"] for e in meta["files"]] == [0, 0, 1, 1, 2, 2]
  assert meta["soft_labels"] == ["soft_labels_seed1.npz"]
  data = np.load(tmp_path / "export" / "synset.npz")
  assert data["images"].shape == (6, *SHAPE) and data["weights"].tolist() == [0.5] * 6
  png = np.asarray(Image.open(tmp_path / "export" / meta["files"][3]["file"]))
  np.testing.assert_array_equal(png, data["images_u8"][3][..., 0])
  # Stored soft labels instead of the teacher: the same soft-label accuracies.
  config.teacher = ""
  config.soft_labels = config.store_soft_labels
  config.store_soft_labels = config.export = ""
  config.labels = "soft"
  config.random_baseline = False
  config.out = str(tmp_path / "results" / "stored")
  stored = evaluate.run(config, log=lambda *a: None)
  want = {(r["student"], r["seed"]): r["top1"] for r in result["runs"]
          if r["source"] == "set" and r["labels"] == "soft"}
  got = {(r["student"], r["seed"]): r["top1"] for r in stored["runs"]}
  assert got == want
  assert {r["how"] for r in stored["runs"]} == {"stored soft labels"}


def test_student_specs_and_protocol_defaults():
  evaluate = _load("experiments/evaluate.py", "evaluate_cli_specs")
  specs = evaluate.parse_students("convnet_d3(width=64), resnet18(stem=cifar,width=16),convnet")
  assert specs == [("convnet_d3(width=64)", "convnet_d3", {"width": 64}),
                   ("resnet18(stem=cifar,width=16)", "resnet18", {"stem": "cifar", "width": 16}),
                   ("convnet", "convnet", {})]
  with pytest.raises(ConfigError, match="key=value"):
    evaluate.parse_students("resnet18(cifar)")
  config = evaluate.get_config()
  # eval fields left None: the workdir's protocol, else EvaluateOptions' (the paper's) defaults.
  run_eval = {"epochs": 300, "crop_scale": [0.5, 1.0], "model": "convnet_d3", "seed": 7}
  options = evaluate.eval_options(config, run_eval)
  assert (options.epochs, options.crop_scale, options.lr) == (300, (0.5, 1.0), 1e-3)
  config.eval.epochs = 5
  assert evaluate.eval_options(config, run_eval).epochs == 5


@pytest.mark.torch
def test_pytorch_rebuilds_the_stored_views(world, tmp_path):
  """A PyTorch user with only the export (synset.npz + soft_labels_seed<s>.npz) rebuilds every
  view the stored logits belong to: torchvision's resized_crop (slice + bilinear antialiased
  interpolate), flip and the batch's CutMix box give our views to float round-off."""
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  teacher, tvars, _ = checkpoint.build_teacher(world["teacher"])
  ds = world["dataset"]
  x = store.normalize_like_official(world["x_train"][::6], ds.mean, ds.std)  # 10 images
  options = EvaluateOptions(epochs=1, batch_size=4, crop_scale=(0.2, 1.0))
  labels = protocol.teacher_soft_labels(teacher, tvars, x, options, protocol.student_key(0))
  protocol.save_soft_labels(tmp_path / "soft_labels_seed0.npz", labels)
  root = store.export_for_pytorch(tmp_path / "export", x, np.zeros(len(x), int),
                                  list(ds.class_names), ds.mean, ds.std,
                                  soft_labels=[tmp_path / "soft_labels_seed0.npz"])
  images = torch.from_numpy(np.load(os.path.join(root, "synset.npz"))["images"]).permute(0, 3, 1,
                                                                                          2)
  soft = np.load(os.path.join(root, "soft_labels_seed0.npz"))
  h, w = images.shape[-2:]
  b = int(json.loads(str(soft["meta"]))["batch_size"])
  assert soft["flip"].any() and (soft["mix_box"][..., 2] > soft["mix_box"][..., 0]).any()
  for start in range(0, len(x), b):
    rows = slice(start, start + b)
    views = []
    for i, (y0, x0, bh, bw) in zip(soft["index"][0, rows], soft["crop"][0, rows]):
      crop = images[i:i + 1, :, y0:y0 + bh, x0:x0 + bw]  # resized_crop(img, y0, x0, bh, bw)
      views.append(F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False,
                                 antialias=True)[0])
    views = torch.stack(views)
    flip = torch.from_numpy(soft["flip"][0, rows])
    views = torch.where(flip[:, None, None, None], views.flip(-1), views)
    by0, bx0, by1, bx1 = soft["mix_box"][0, start // b]
    partner = torch.from_numpy(soft["partner"][0, rows] - start)
    mixed = views.clone()
    mixed[:, :, by0:by1, bx0:bx1] = views[partner][:, :, by0:by1, bx0:bx1]
    batch = labels.schedule.batch(0, start // b)
    want = protocol.apply_views(x[batch["index"]], batch["crop"], batch["flip"], batch["perm"],
                                batch["box"])
    np.testing.assert_allclose(mixed.permute(0, 2, 3, 1).numpy(), np.asarray(want), atol=1e-4)
