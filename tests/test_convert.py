"""Tests of wmdd_jax.convert, teacher meta/build_teacher and experiments/import_teacher.py.

The reference is tests/torch_resnet.py (torchvision's names and topology, written here); tests
that need it skip when torch is absent. The rest build torchvision-format state dicts in numpy.
"""

import argparse
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wmdd_jax import CheckpointError, ConfigError, ShapeError
from wmdd_jax.checkpoint import (
    TEACHER_META_KEYS,
    build_teacher,
    save_teacher,
    teacher_meta,
)
from wmdd_jax.convert import (
    flax_to_torch_name,
    load_state_dict,
    torchvision_to_flax,
    unwrap_state_dict,
)
from wmdd_jax.models import apply_model, get_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _abstract(arch, num_classes, stem, channels=3):
  model = get_model(arch, num_classes, stem=stem)
  x = jax.ShapeDtypeStruct((1, 16, 16, channels), jnp.float32)
  v = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False, mutable=["params", "batch_stats"]),
      x)
  return {k: v[k] for k in ("params", "batch_stats")}


def _torch_shapes(arch, num_classes, stem):
  """{torchvision key: torch shape} of our model's variables (num_batches_tracked excluded)."""
  out = {}
  for tree in _abstract(arch, num_classes, stem).values():
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      shape = leaf.shape
      if len(shape) == 4:
        shape = (shape[3], shape[2], shape[0], shape[1])
      elif len(shape) == 2:
        shape = shape[::-1]
      out[flax_to_torch_name(tuple(p.key for p in path))] = tuple(shape)
  return out


def _numpy_state_dict(arch, num_classes, stem, seed=0):
  """A random torchvision-format state dict (torch's layouts and names), made without torch."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in _torch_shapes(arch, num_classes, stem).items():
    value = rng.normal(size=shape).astype(np.float32) * 0.05
    if name.endswith("running_var"):
      value = np.abs(value) + 0.5
      out[name.replace("running_var", "num_batches_tracked")] = np.array(7, np.int64)
    out[name] = value
  return out


def _torch_reference(arch, stem, num_classes, size, seed=0):
  """(torch model, images f32[2, size, size, 3], torch outputs (logits, means, vars))."""
  torch = pytest.importorskip("torch")
  from tests import torch_resnet

  net = torch_resnet.make_resnet(arch, num_classes, stem, seed=seed)
  x = np.random.default_rng(seed).normal(size=(2, size, size, 3)).astype(np.float32)
  ref = torch_resnet.bn_input_moments(net, torch.from_numpy(x.transpose(0, 3, 1, 2)))
  return net, x, ref


def _errors(ours, ref):
  """(max abs error, max abs error / max |ref|) of two arrays of the same shape."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape
  scale = float(np.max(np.abs(ref)))
  assert scale > 1e-4, "a reference too close to 0 to compare"
  err = float(np.max(np.abs(ours - ref)))
  return err, err / scale


@pytest.mark.torch
@pytest.mark.parametrize("arch,stem,size,wrap", [
    ("resnet18", "imagenet", 45, "plain"),
    ("resnet18", "cifar", 32, "module"),
    ("resnet18", "tiny_official", 37, "official"),
    pytest.param("resnet50", "tiny_official", 33, "plain", marks=pytest.mark.slow),
])
def test_matches_torch_forward(arch, stem, size, wrap):
  """Logits, features and every BN input's per-sample moments equal the PyTorch model's."""
  net, x, (logits, means, variances) = _torch_reference(arch, stem, 10, size)
  state = net.state_dict()  # torch tensors: the converter takes them as they are
  if wrap == "module":  # nn.DataParallel's key prefix
    state = {f"module.{k}": v for k, v in state.items()}
  elif wrap == "official":  # the official WMDD checkpoints: torch.save({"model": sd, ...})
    state = {"model": state, "epoch": 49}
  variables = torchvision_to_flax(state, arch=arch, stem=stem)
  out = apply_model(get_model(arch, 10, stem=stem), variables, x)
  assert len(out.bn_mean) == len(means) == (20 if arch == "resnet18" else 53)
  pairs = {"logits": [(out.logits, logits)], "features": [(out.features, net.features)],
           "bn_mean": list(zip(out.bn_mean, means)), "bn_var": list(zip(out.bn_var, variances))}
  errors = {name: np.max([_errors(a, b.numpy()) for a, b in pair], axis=0)
            for name, pair in pairs.items()}
  print(f"{arch}/{stem}/{size}px max (abs, relative to max |ref|) errors: "
        + ", ".join(f"{k} {a:.1e} {r:.1e}" for k, (a, r) in errors.items()))
  for name, (abs_err, rel_err) in errors.items():
    assert abs_err < 1e-4 and rel_err < 1e-4, (name, abs_err, rel_err)


@pytest.mark.torch
def test_tiny_official_stem_reproduces_pytorch_padding():
  """3x3/2 conv with padding 3: output side (H + 6 - 3) // 2 + 1, the same values as PyTorch."""
  torch = pytest.importorskip("torch")
  conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=3, bias=False)
  x = np.random.default_rng(1).normal(size=(1, 3, 37, 37)).astype(np.float32)
  with torch.no_grad():
    ref = conv(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
  from flax import linen as nn

  from wmdd_jax.models.resnet import STEM_CONV
  k, s, p = STEM_CONV["tiny_official"]
  ours = nn.Conv(4, (k, k), strides=s, padding=((p, p), (p, p)), use_bias=False).apply(
      {"params": {"kernel": conv.weight.detach().numpy().transpose(2, 3, 1, 0)}},
      x.transpose(0, 2, 3, 1))
  assert ref.shape == ours.shape == (1, 21, 21, 4)
  np.testing.assert_allclose(ours, ref, atol=1e-5)


@pytest.mark.torch
@pytest.mark.parametrize("arch,stems,expected", [
    ("resnet18", ("imagenet", "tiny", "cifar", "tiny_official"), 11_689_512),
    ("resnet34", ("imagenet",), 21_797_672),
    ("resnet50", ("imagenet", "tiny_official"), 25_557_032),
    ("resnet101", ("imagenet",), 44_549_160)])
def test_reference_has_our_parameters(arch, stems, expected):
  """tests/torch_resnet.py has our keys, shapes and parameter count (torchvision's, at 224 px)."""
  pytest.importorskip("torch")
  from tests import torch_resnet

  for stem in stems:
    net = torch_resnet.make_resnet(arch, 1000, stem, seed=0)
    assert not net.training
    ours = _torch_shapes(arch, 1000, stem)
    theirs = {k: tuple(v.shape) for k, v in net.state_dict().items()
              if not k.endswith("num_batches_tracked")}
    assert theirs == ours
    count = sum(p.numel() for p in net.parameters())
    params = _abstract(arch, 1000, stem)["params"]
    assert count == sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    # The 7x7 stem has 64*3*(49-9) more weights than the 3x3 ones.
    assert count == expected - (0 if stem == "imagenet" else 64 * 3 * 40)


@pytest.mark.torch
def test_pth_round_trip(tmp_path):
  """A .pth as the official code writes it (model + optimizer + argparse args) loads safely."""
  torch = pytest.importorskip("torch")
  from tests import torch_resnet

  net = torch_resnet.make_resnet("resnet18", 5, "tiny_official", seed=3)
  path = tmp_path / "model_49.pth"
  torch.save({"model": net.state_dict(), "optimizer": {"state": {}, "param_groups": []},
              "args": argparse.Namespace(lr=0.2, dataset="tiny-imagenet"), "epoch": 49}, path)
  state = load_state_dict(path)
  reference = torch_resnet.state_dict_numpy(net)
  assert set(state) == set(reference)
  for k, v in reference.items():
    np.testing.assert_array_equal(state[k], v)
  variables = torchvision_to_flax(state, arch="resnet18", stem="tiny_official")
  assert variables["params"]["fc"]["kernel"].shape == (512, 5)


def test_safetensors_round_trip_without_torch(tmp_path):
  from safetensors.numpy import save_file

  state = _numpy_state_dict("resnet18", 7, "cifar", seed=1)
  path = tmp_path / "resnet18.safetensors"
  save_file(state, str(path))
  loaded = load_state_dict(path)
  assert set(loaded) == set(state)
  a = torchvision_to_flax(loaded, arch="resnet18", stem="cifar")
  b = torchvision_to_flax(state, arch="resnet18", stem="cifar", num_classes=7)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == np.float32
    np.testing.assert_array_equal(x, y)
  # The layouts: conv OIHW -> HWIO, fc (out, in) -> (in, out), BN at .../bn1/bn/...
  np.testing.assert_array_equal(a["params"]["conv1"]["kernel"],
                                state["conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(a["params"]["fc"]["kernel"], state["fc.weight"].T)
  np.testing.assert_array_equal(a["batch_stats"]["layer2_0"]["downsample_bn"]["bn"]["var"],
                                state["layer2.0.downsample.1.running_var"])
  np.testing.assert_array_equal(a["params"]["layer3_1"]["bn2"]["bn"]["scale"],
                                state["layer3.1.bn2.weight"])


def test_shape_errors_name_the_key_and_the_fix():
  state = _numpy_state_dict("resnet18", 10, "imagenet")
  with pytest.raises(ShapeError, match=r"conv1\.weight.*stem imagenet.*not 'cifar'"):
    torchvision_to_flax(state, arch="resnet18", stem="cifar")
  with pytest.raises(ShapeError, match=r"fc\.weight.*num_classes=10"):
    torchvision_to_flax(state, arch="resnet18", stem="imagenet", num_classes=1000)
  # The 3x3 stems share their shapes: any of them converts (the user must pick the right one).
  small = _numpy_state_dict("resnet18", 10, "tiny")
  for stem in ("tiny", "cifar", "tiny_official"):
    torchvision_to_flax(small, arch="resnet18", stem=stem)


def test_missing_and_unknown_keys_raise():
  state = _numpy_state_dict("resnet18", 10, "imagenet")
  partial = {k: v for k, v in state.items() if k != "layer1.0.bn1.running_var"}
  with pytest.raises(ConfigError, match=r"missing \[layer1\.0\.bn1\.running_var\]"):
    torchvision_to_flax(partial, arch="resnet18", stem="imagenet")
  with pytest.raises(ConfigError, match=r"unknown \[head\.weight\]"):
    torchvision_to_flax({**state, "head.weight": np.zeros(3)}, arch="resnet18", stem="imagenet")
  with pytest.raises(ConfigError, match=r"look like a resnet34; pass arch='resnet34'"):
    torchvision_to_flax(_numpy_state_dict("resnet34", 10, "imagenet"), arch="resnet18",
                        stem="imagenet")
  with pytest.raises(ConfigError, match="look like a resnet50"):
    torchvision_to_flax(_numpy_state_dict("resnet50", 10, "cifar"), arch="resnet101",
                        stem="cifar")
  with pytest.raises(ConfigError, match="ResNets only"):
    torchvision_to_flax(state, arch="convnet", stem="imagenet")
  with pytest.raises(ConfigError, match="stem"):
    torchvision_to_flax(state, arch="resnet18", stem="cifar10")


def test_wrappers_and_readers(tmp_path):
  state = {"conv1.weight": np.zeros((1, 1, 1, 1))}
  assert unwrap_state_dict({"state_dict": state, "epoch": 3}) is state
  assert unwrap_state_dict({"model": {"state_dict": state}}) is state
  with pytest.raises(ConfigError, match="No PyTorch state dict"):
    unwrap_state_dict({"optimizer": {}, "epoch": 1})
  with pytest.raises(CheckpointError, match="No weights file"):
    load_state_dict(tmp_path / "nope.pth")
  (tmp_path / "w.h5").write_bytes(b"x")
  with pytest.raises(ConfigError, match=r"\.safetensors, \.pth or \.pt"):
    load_state_dict(tmp_path / "w.h5")
  (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
  with pytest.raises(CheckpointError, match="bad.safetensors"):
    load_state_dict(tmp_path / "bad.safetensors")


def test_teacher_meta_validates():
  good = dict(model="resnet18", model_options={"stem": "cifar"}, num_classes=3,
              class_names=["a", "b", "c"], image_shape=(32, 32, 3), mean=IMAGENET[0],
              std=IMAGENET[1], dataset="npz:x.npz")
  meta = teacher_meta(**good, test_top1=50.0)
  assert tuple(meta)[:len(TEACHER_META_KEYS)] == TEACHER_META_KEYS
  assert meta["image_shape"] == [32, 32, 3] and meta["test_top1"] == 50.0
  for bad, match in [({"class_names": ["a"]}, "1 class names"),
                     ({"mean": (0.5,)}, "one value per channel"),
                     ({"std": (1.0, 0.0, 1.0)}, "positive"),
                     ({"model_options": {"stem": "x"}}, "stem"),
                     ({"model": "vgg"}, "Unknown model"),
                     ({"image_shape": (32, 32)}, "image_shape"),
                     ({"num_classes": 3.0}, "num_classes")]:
    with pytest.raises(ConfigError, match=match):
      teacher_meta(**{**good, **bad})


def _import_teacher_module():
  spec = importlib.util.spec_from_file_location(
      "import_teacher", os.path.join(ROOT, "experiments", "import_teacher.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_import_teacher_end_to_end(tmp_path, capsys):
  """safetensors file -> import_teacher.py -> build_teacher -> the same forward pass."""
  from safetensors.numpy import save_file

  state = _numpy_state_dict("resnet18", 4, "tiny_official", seed=2)
  weights = tmp_path / "teacher.safetensors"
  save_file(state, str(weights))
  names = tmp_path / "names.txt"
  names.write_text("cat\ndog\n\nbird\nfish\n")
  out = tmp_path / "teacher"
  script = _import_teacher_module()
  args = ["--weights", str(weights), "--arch", "resnet18", "--stem", "tiny_official",
          "--dataset", "folder:data/tiny-imagenet-200", "--out", str(out), "--image-size", "40",
          "--class-names-from", str(names)]
  path = script.main(args)
  printed = capsys.readouterr().out
  assert "4 classes" in printed and "saved to" in printed

  model, variables, meta = build_teacher(path)
  assert model == get_model("resnet18", 4, stem="tiny_official")
  assert meta["class_names"] == ["cat", "dog", "bird", "fish"]
  assert meta["image_shape"] == [40, 40, 3] and meta["dataset"] == "folder:data/tiny-imagenet-200"
  np.testing.assert_allclose(meta["mean"], IMAGENET[0])
  np.testing.assert_allclose(meta["std"], IMAGENET[1])
  assert meta["source"]["format"] == "torchvision"
  x = np.random.default_rng(0).normal(size=(2, 40, 40, 3)).astype(np.float32)
  restored = apply_model(model, variables, x)
  direct = apply_model(model, torchvision_to_flax(state, arch="resnet18", stem="tiny_official"),
                       x)
  np.testing.assert_array_equal(restored.logits, direct.logits)
  assert np.all(np.isfinite(restored.logits))

  with pytest.raises(CheckpointError, match="overwrite"):
    script.main(args)
  names.write_text("a\nb\nc\n")
  with pytest.raises(ConfigError, match="3 class names"):
    script.main(args + ["--overwrite"])
  # Class names from a dataset spec (scikit-learn's digits: 10 classes) must match in number.
  with pytest.raises(ConfigError, match="10 class names"):
    script.main(args[:-1] + ["digits", "--overwrite"])


def test_build_teacher_rejects_old_or_wrong_meta(tmp_path):
  state = _numpy_state_dict("resnet18", 3, "cifar")
  variables = torchvision_to_flax(state, arch="resnet18", stem="cifar")
  # What pipeline._teacher wrote before teacher_meta existed.
  old = {"model": "resnet18", "model_options": {"stem": "cifar"}, "class_names": ["a", "b", "c"],
         "dataset": "digits", "test_top1": 1.0}
  path = save_teacher(tmp_path / "old", variables, old)
  with pytest.raises(CheckpointError, match=r"old or incomplete meta.*num_classes.*teacher_meta"):
    build_teacher(path)
  meta = teacher_meta(model="resnet18", model_options={"stem": "cifar"}, num_classes=3,
                      class_names=["a", "b", "c"], image_shape=(8, 8, 3), mean=IMAGENET[0],
                      std=IMAGENET[1], dataset="digits")
  path = save_teacher(tmp_path / "wrong", variables, {**meta, "model": "resnet34"})
  with pytest.raises(CheckpointError, match="do not fit"):
    build_teacher(path)
