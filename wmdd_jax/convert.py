"""PyTorch (torchvision-format) ResNet weights -> wmdd_jax ResNet variables.

Reads what the teachers of the WMDD line of work come as: torchvision's ``resnet18/50``
``.pth`` files, their ``.safetensors`` conversions, and the official WMDD checkpoints
(``model_49.pth``, a dict whose ``"model"`` entry is the state dict)::

  state = load_state_dict("resnet18-f37072fd.pth")           # {name: np.ndarray}
  variables = torchvision_to_flax(state, arch="resnet18", stem="imagenet")
  model = get_model("resnet18", 1000, stem="imagenet")
  out = apply_model(model, variables, images)               # images f32[B, 224, 224, 3]

Name mapping (Flax path on the left, torchvision key on the right; ``bn`` is the
:class:`~wmdd_jax.models.base.CapturingBatchNorm`'s inner ``nn.BatchNorm``):

  ==========================================  =====================================
  params conv1/kernel        f32[kh,kw,i,o]    conv1.weight        f32[o,i,kh,kw]
  params bn1/bn/scale, bias                    bn1.weight, bn1.bias
  batch_stats bn1/bn/mean, var                 bn1.running_mean, bn1.running_var
  layer2_0/conv1, bn1, ... (same leaves)       layer2.0.conv1, layer2.0.bn1, ...
  layer2_0/downsample_conv                     layer2.0.downsample.0
  layer2_0/downsample_bn                       layer2.0.downsample.1
  params fc/kernel           f32[d, C]         fc.weight           f32[C, d]
  params fc/bias                               fc.bias
  ==========================================  =====================================

``num_batches_tracked`` is ignored, and a leading ``module.`` (DataParallel) or ``_orig_mod.``
(torch.compile) is removed from every key. Every key must be used and every expected key
present; anything else raises an error that names the keys and the likely fix.

The stem cannot be read off the weights alone: ``tiny``, ``cifar`` and ``tiny_official`` all have
a 3x3 ``conv1``; pass the one the checkpoint was trained with (``tiny_official`` for the official
WMDD Tiny-ImageNet teacher).
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from wmdd_jax.errors import CheckpointError, ConfigError, ShapeError
from wmdd_jax.models import get_model
from wmdd_jax.models.resnet import RESNET_LAYOUTS, STEM_CONV, STEMS, Bottleneck

__all__ = ["flax_to_torch_name", "load_state_dict", "torchvision_to_flax", "unwrap_state_dict"]

# Entries of a training checkpoint that hold the model's state dict, in the order tried.
_WRAPPER_KEYS = ("model", "state_dict")
_PREFIXES = ("module.", "_orig_mod.")
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
               "var": "running_var"}
_MODULE_NAMES = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}


def _to_numpy(value: Any) -> np.ndarray:
  """A numpy array from a numpy array or a (CPU or not, any float dtype) torch tensor."""
  if hasattr(value, "detach"):  # torch.Tensor, without importing torch
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()  # bfloat16/float16 -> float32; numpy has no bfloat16
    value = value.numpy()
  return np.asarray(value)


def _looks_like_state_dict(obj: Mapping) -> bool:
  return any(isinstance(k, str) and k.endswith((".weight", ".bias", ".running_mean"))
             for k in obj)


def unwrap_state_dict(obj: Any) -> Mapping[str, Any]:
  """The state dict inside a training checkpoint (``{"model": sd, "optimizer": ...}``).

  Args:
    obj: a state dict, or a dict holding one under ``"model"`` or ``"state_dict"`` (nested
      wrappers are unwrapped too).

  Returns:
    The mapping of parameter names to arrays/tensors.

  Raises:
    ConfigError: ``obj`` is neither.
  """
  seen = 0
  while isinstance(obj, Mapping) and not _looks_like_state_dict(obj) and seen < 4:
    inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
    if inner is None:
      break
    obj, seen = inner, seen + 1
  if not isinstance(obj, Mapping) or not _looks_like_state_dict(obj):
    keys = sorted(map(str, obj))[:10] if isinstance(obj, Mapping) else type(obj).__name__
    raise ConfigError(f"No PyTorch state dict found (top-level keys/type: {keys}). Pass a "
                      "state dict ({'conv1.weight': ..., ...}) or a checkpoint holding one under "
                      f"{' or '.join(repr(k) for k in _WRAPPER_KEYS)}.")
  return obj


def _strip_prefix(name: str) -> str:
  changed = True
  while changed:
    changed = False
    for prefix in _PREFIXES:
      if name.startswith(prefix):
        name, changed = name[len(prefix):], True
  return name


def flax_to_torch_name(path: tuple[str, ...]) -> str:
  """The torchvision key of a Flax variable path.

  Args:
    path: e.g. ("layer2_0", "downsample_bn", "bn", "mean") (collection name excluded).

  Returns:
    e.g. "layer2.0.downsample.1.running_mean".
  """
  parts = []
  for name in path[:-1]:
    if name == "bn":  # CapturingBatchNorm's inner nn.BatchNorm
      continue
    match = re.fullmatch(r"layer(\d+)_(\d+)", name)
    parts.append(f"layer{match[1]}.{match[2]}" if match else _MODULE_NAMES.get(name, name))
  parts.append(_LEAF_NAMES.get(path[-1], path[-1]))
  return ".".join(parts)


def _guess_layout(names: set[str]) -> str | None:
  """The registered arch whose blocks the torchvision keys describe, if any."""
  blocks = []
  for stage in range(1, 5):
    idx = {int(m[1]) for n in names if (m := re.match(rf"layer{stage}\.(\d+)\.", n))}
    blocks.append(len(idx))
  bottleneck = any(re.match(r"layer\d+\.\d+\.conv3\.", n) for n in names)
  for arch, (sizes, block) in RESNET_LAYOUTS.items():
    if tuple(sizes) == tuple(blocks) and (block is Bottleneck) == bottleneck:
      return arch
  return None


def _guess_stem(shape: tuple[int, ...] | None) -> str:
  if shape is None or len(shape) != 4:
    return "unknown"
  kernel = shape[-1]
  stems = [s for s, (k, _, _) in STEM_CONV.items() if k == kernel]
  return " / ".join(stems) if stems else f"a {kernel}x{kernel} conv (no registered stem)"


def _abstract_variables(arch: str, stem: str, num_classes: int, in_channels: int
                        ) -> dict[str, Any]:
  model = get_model(arch, num_classes, stem=stem)
  x = jax.ShapeDtypeStruct((1, 32, 32, in_channels), jnp.float32)
  variables = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False, mutable=["params", "batch_stats"]),
      x)
  return {k: variables[k] for k in ("params", "batch_stats")}


def _set(tree: dict, path: tuple[str, ...], value: np.ndarray) -> None:
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def torchvision_to_flax(state_dict: Mapping[str, Any], *, arch: str, stem: str,
                        num_classes: int | None = None) -> dict[str, Any]:
  """Maps a torchvision-format ResNet state dict onto ``get_model(arch, C, stem=stem)``.

  Args:
    state_dict: torchvision names -> arrays (numpy or torch tensors); a ``{"model": sd}`` or
      ``{"state_dict": sd}`` wrapper and ``module.`` prefixes are accepted.
    arch: "resnet18", "resnet34", "resnet50" or "resnet101".
    stem: the stem the weights were trained with (see :mod:`wmdd_jax.models.resnet`).
    num_classes: classifier width; None reads it from ``fc.weight``.

  Returns:
    ``{"params": ..., "batch_stats": ...}``: nested dicts of float32 numpy arrays, laid out like
    ``init_model(get_model(arch, num_classes, stem=stem), ...)``'s. Conv kernels are HWIO
    (from OIHW), the classifier kernel f32[d, C] (from f32[C, d]).

  Raises:
    ConfigError: unknown arch/stem, keys the model lacks or keys missing (the message names them
      and guesses the arch the keys describe).
    ShapeError: a tensor whose shape does not fit (wrong stem, arch or num_classes).
  """
  arch = arch.lower()
  if arch not in RESNET_LAYOUTS:
    raise ConfigError(f"torchvision_to_flax converts ResNets only; arch {arch!r} is not one of "
                      f"{tuple(RESNET_LAYOUTS)}.")
  if stem not in STEMS:
    raise ConfigError(f"Unknown ResNet stem {stem!r}; use one of {STEMS}.")
  raw = unwrap_state_dict(state_dict)
  tensors: dict[str, Any] = {}
  for key, value in raw.items():
    name = _strip_prefix(str(key))
    if name.endswith("num_batches_tracked"):
      continue
    if name in tensors:
      raise ConfigError(f"The state dict holds {name!r} twice (with and without a 'module.' "
                        "prefix); pass the model's own state dict.")
    tensors[name] = value
  shapes = {k: tuple(np.shape(v)) for k, v in tensors.items()}

  fc = shapes.get("fc.weight")
  if num_classes is None:
    if fc is None or len(fc) != 2:
      raise ConfigError("Cannot infer num_classes: the state dict has no 2-D 'fc.weight'. Pass "
                        "num_classes, or check that this is a ResNet state dict.")
    num_classes = int(fc[0])
  conv1 = shapes.get("conv1.weight")
  in_channels = int(conv1[1]) if conv1 is not None and len(conv1) == 4 else 3
  abstract = _abstract_variables(arch, stem, int(num_classes), in_channels)

  expected: dict[str, tuple[str, tuple[str, ...], tuple[int, ...]]] = {}
  for collection, tree in abstract.items():
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      names = tuple(p.key for p in path)
      expected[flax_to_torch_name(names)] = (collection, names, tuple(leaf.shape))

  missing = sorted(set(expected) - set(tensors))
  unknown = sorted(set(tensors) - set(expected))
  if missing or unknown:
    guess = _guess_layout(set(tensors))
    hint = (f"The keys look like a {guess}; pass arch={guess!r}." if guess and guess != arch
            else f"Check that the file holds a torchvision-format {arch} (not another model or a "
                 "truncated file).")
    raise ConfigError(
        f"The state dict does not fit {arch}: {len(missing)} key(s) missing "
        f"{_few(missing)}, {len(unknown)} key(s) unknown {_few(unknown)}. {hint}")

  bad = [(name, shapes[name], _torch_shape(shape)) for name, (_, _, shape) in expected.items()
         if shapes[name] != _torch_shape(shape)]
  if bad:
    raise ShapeError(_shape_message(bad, arch, stem, int(num_classes), shapes))
  out: dict[str, Any] = {"params": {}, "batch_stats": {}}
  for name, (collection, path, _) in expected.items():
    value = _to_numpy(tensors[name]).astype(np.float32)
    if value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    elif value.ndim == 2:
      value = value.T  # Linear (out, in) -> Dense (in, out)
    _set(out[collection], path, np.ascontiguousarray(value))
  return out


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  """A Flax kernel's shape in PyTorch's layout (HWIO -> OIHW, (in, out) -> (out, in))."""
  if len(flax_shape) == 4:
    h, w, i, o = flax_shape
    return (o, i, h, w)
  return tuple(reversed(flax_shape))


def _few(names: list[str], limit: int = 8) -> str:
  shown = ", ".join(names[:limit])
  return f"[{shown}{', ...' if len(names) > limit else ''}]"


def _shape_message(bad: list, arch: str, stem: str, num_classes: int,
                   shapes: dict[str, tuple[int, ...]]) -> str:
  listed = "; ".join(f"{name}: file {got}, expected {want}" for name, got, want in bad[:6])
  more = f" (and {len(bad) - 6} more)" if len(bad) > 6 else ""
  names = {name for name, _, _ in bad}
  fixes = []
  if "conv1.weight" in names:
    conv1 = shapes["conv1.weight"]
    fixes.append(f"conv1.weight {conv1} fits stem {_guess_stem(conv1)}, not {stem!r}: pass the "
                 "stem the weights were trained with")
  if names & {"fc.weight", "fc.bias"}:
    have = shapes["fc.weight"][0] if len(shapes.get("fc.weight", ())) == 2 else "?"
    fixes.append(f"the file has {have} classes: pass num_classes={have} or None (inferred), not "
                 f"{num_classes}")
  if names - {"conv1.weight", "fc.weight", "fc.bias"}:
    guess = _guess_layout(set(shapes))
    fixes.append(f"inner layers differ: the keys look like a {guess}; check arch" if guess else
                 "inner layers differ: check arch (resnet18/34 vs 50/101) and the model width")
  return (f"{len(bad)} tensor(s) do not fit {arch} with stem {stem!r} and {num_classes} classes: "
          f"{listed}{more}. Fix: " + "; ".join(fixes) + ".")


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a PyTorch state dict from a ``.safetensors`` or ``.pth``/``.pt`` file into numpy.

  ``.safetensors`` is read with ``safetensors.numpy`` (no torch needed). ``.pth``/``.pt``/
  ``.pth.tar`` need torch and are loaded with ``weights_only=True`` (no code from the file is
  run; ``argparse.Namespace`` is allowed, as official training checkpoints store their ``args``).
  A ``{"model": sd, ...}`` / ``{"state_dict": sd}`` wrapper is unwrapped.

  Args:
    path: the file.

  Returns:
    {torchvision key: f32/i64 numpy array} (float16/bfloat16 tensors become float32).

  Raises:
    CheckpointError: the file is missing or unreadable.
    ConfigError: an unsupported suffix, torch missing for a ``.pth``, or no state dict inside.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise CheckpointError(f"No weights file at {path}; fix the path.")
  lower = path.lower()
  if lower.endswith(".safetensors"):
    try:
      from safetensors.numpy import load_file
    except ImportError as e:
      raise ConfigError("Reading .safetensors needs the safetensors package: "
                        "pip install 'wmdd-jax[convert]' (or pip install safetensors).") from e
    try:
      return {k: np.asarray(v) for k, v in load_file(path).items()}
    except Exception as e:
      raise CheckpointError(f"Could not read {path} as safetensors ({type(e).__name__}: {e}). "
                            "Check that the file is complete (re-download it).") from e
  if lower.endswith((".pth", ".pt", ".pth.tar", ".tar", ".ckpt")):
    try:
      import torch
    except ImportError as e:
      raise ConfigError(
          f"Reading {os.path.basename(path)} needs PyTorch: pip install torch==2.13.0 (the CPU "
          "build suffices), or convert the file to .safetensors elsewhere with "
          "safetensors.torch.save_file(state_dict, 'weights.safetensors').") from e
    try:
      with torch.serialization.safe_globals([argparse.Namespace]):
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
      raise CheckpointError(
          f"Could not read {path} with torch.load(weights_only=True) ({type(e).__name__}: "
          f"{str(e)[:300]}). If the file is complete but pickles other objects, and you trust "
          "it, re-save only its state dict: torch.save(torch.load(f, weights_only=False)"
          "['model'], 'weights.pth').") from e
    return {str(k): _to_numpy(v) for k, v in unwrap_state_dict(obj).items()}
  raise ConfigError(f"Unsupported weights file {path}: use a .safetensors, .pth or .pt file.")
