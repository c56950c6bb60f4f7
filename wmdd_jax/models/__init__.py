"""Model registry: ``get_model(name, num_classes, **options)`` and ``init_model``.

Every model is a Flax Linen module whose ``__call__(x, train)`` takes f32[B, H, W, ch]
(normalised, any ch) and returns ``(logits f32[B, num_classes], features f32[B, d])``, and whose
BatchNorms are :class:`CapturingBatchNorm`, so :func:`apply_model` also returns each BN input's
per-sample moments in forward order (see :func:`bn_layer_paths` and the model modules for the
exact order).

Names and options:
  * ``resnet18``, ``resnet34``, ``resnet50``, ``resnet101``: ``stem`` ("imagenet" default,
    "tiny", "cifar", "tiny_official"), ``width`` (64), ``zero_init_residual`` (False),
    ``dtype`` (None).
  * ``convnet``: ``depth`` (3), ``width`` (128), ``dtype``, ``features`` ("flat" default, or
    "pooled": the last map's spatial mean); ``convnet_d3`` / ``convnet_d4`` fix the depth.

``dtype`` may be None (float32), a string such as "bfloat16", or a jnp dtype; it is the compute
dtype only (parameters and outputs stay float32).

Your own Flax classifier: ``adapt(module, features=...)`` (:mod:`wmdd_jax.models.adapter`) gives
it this contract, plain ``nn.BatchNorm`` layers included, so it can be a teacher or a student.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wmdd_jax.errors import ConfigError
from wmdd_jax.models.adapter import Adapted, adapt, module_paths
from wmdd_jax.models.base import (
    BN_COLLECTION,
    CapturingBatchNorm,
    ModelOutput,
    apply_model,
    pool_moments,
)
from wmdd_jax.models.convnet import FEATURES as CONVNET_FEATURES
from wmdd_jax.models.convnet import ConvNet
from wmdd_jax.models.resnet import RESNET_LAYOUTS, STEMS, BasicBlock, Bottleneck, ResNet

__all__ = [
    "Adapted",
    "BN_COLLECTION",
    "BasicBlock",
    "Bottleneck",
    "CapturingBatchNorm",
    "ConvNet",
    "ModelOutput",
    "ResNet",
    "STEMS",
    "adapt",
    "apply_model",
    "bn_layer_paths",
    "get_model",
    "init_model",
    "list_models",
    "module_paths",
    "pool_moments",
]

_CONVNET_DEPTHS = {"convnet": None, "convnet_d3": 3, "convnet_d4": 4}


def list_models() -> tuple[str, ...]:
  """The registered model names."""
  return tuple(RESNET_LAYOUTS) + tuple(_CONVNET_DEPTHS)


def _module_options(cls: type[nn.Module], fixed: tuple[str, ...]) -> tuple[str, ...]:
  return tuple(f.name for f in dataclasses.fields(cls)
               if f.name not in ("parent", "name", "num_classes") + fixed)


def _canonical_dtype(dtype: Any) -> Any:
  if dtype is None or dtype in ("", "none", "None", "float32"):
    return None
  try:
    return jnp.dtype(dtype)
  except TypeError as e:
    raise ConfigError(f"Unknown model dtype {dtype!r}; use None, 'float32' or 'bfloat16'.") from e


def get_model(name: str, num_classes: int, **options: Any) -> nn.Module:
  """Builds a registered model.

  Args:
    name: one of :func:`list_models` (case-insensitive).
    num_classes: classifier width, >= 1.
    **options: per-model options (module docstring). Unknown options raise ConfigError.

  Returns:
    An unbound Flax module (hashable, so it can be a static jit argument).
  """
  key = name.lower()
  if key not in list_models():
    raise ConfigError(f"Unknown model {name!r}; registered models: {', '.join(list_models())}.")
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ConfigError(f"num_classes must be a positive int, got {num_classes!r}.")
  options = dict(options)
  if "dtype" in options:
    options["dtype"] = _canonical_dtype(options["dtype"])
  if key in RESNET_LAYOUTS:
    cls, fixed = ResNet, ("stage_sizes", "block_cls")
  else:
    cls, fixed = ConvNet, ()
    depth = _CONVNET_DEPTHS[key]
    if depth is not None:
      if options.get("depth", depth) != depth:
        raise ConfigError(f"Model {name!r} has depth {depth}, but depth={options['depth']} was "
                          "given; use model 'convnet' with a depth option instead.")
      options["depth"] = depth
  allowed = _module_options(cls, fixed)
  unknown = sorted(set(options) - set(allowed))
  if unknown:
    raise ConfigError(f"Unknown option(s) {unknown} for model {name!r}; allowed: {list(allowed)}.")
  if cls is ResNet:
    if options.get("stem", "imagenet") not in STEMS:
      raise ConfigError(f"Unknown ResNet stem {options['stem']!r}; use one of {STEMS}.")
    stage_sizes, block_cls = RESNET_LAYOUTS[key]
    return ResNet(stage_sizes=stage_sizes, block_cls=block_cls, num_classes=num_classes,
                  **options)
  if not isinstance(options.get("depth", 3), int) or options.get("depth", 3) < 1:
    raise ConfigError(f"ConvNet depth must be a positive int, got {options['depth']!r}.")
  if options.get("features", "flat") not in CONVNET_FEATURES:
    raise ConfigError(f"ConvNet features={options['features']!r} is not one of "
                      f"{CONVNET_FEATURES} (a config file's model_options={{'features': "
                      "'pooled'}).")
  return ConvNet(num_classes=num_classes, **options)


def init_model(model: nn.Module, key: jax.Array, image_shape: tuple[int, int, int]
               ) -> dict[str, Any]:
  """Initialises a model's variables.

  Args:
    model: a module from :func:`get_model`.
    key: PRNG key.
    image_shape: (H, W, ch) of one input image.

  Returns:
    ``{"params": ..., "batch_stats": ...}`` (plain dicts; no ``bn_inputs`` collection).
  """
  x = jnp.zeros((1, *image_shape), jnp.float32)
  # Only params/batch_stats are mutable, so the capturing BNs do not sow during init.
  init = jax.jit(lambda k, x: model.init(k, x, train=False, mutable=["params", "batch_stats"]))
  lowered = init.lower(key, x)
  try:
    # Init runs once and its forward pass is dead code, but fully optimising the dozens of RNG
    # initialisers is slow to compile on XLA:CPU for a ResNet-18; backend (LLVM) optimisation
    # level 1 compiles several times faster, runs as fast, and gives the same values up to
    # rounding.
    compiled = lowered.compile(compiler_options={"xla_backend_optimization_level": 1})
  except Exception:  # an XLA build that does not know the option: compile normally
    compiled = lowered.compile()
  variables = compiled(key, x)
  return {k: v for k, v in variables.items() if k != BN_COLLECTION}


def bn_layer_paths(model: nn.Module, image_shape: tuple[int, int, int]) -> tuple[str, ...]:
  """The BN layers' module paths ("layer1_0/bn1", ...) in the order apply_model returns them.

  Args:
    model: a module from :func:`get_model`.
    image_shape: (H, W, ch) of one input image.

  Returns:
    One "/"-joined path per BN layer, forward (call) order; costs one abstract trace, no compute.
  """
  paths: list[str] = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, CapturingBatchNorm) and context.method_name == "__call__":
      paths.append("/".join(context.module.path))
    return next_fun(*args, **kwargs)

  def run(x):
    with nn.intercept_methods(record):
      return model.init(jax.random.key(0), x, train=False, mutable=["params", "batch_stats"])

  jax.eval_shape(run, jax.ShapeDtypeStruct((1, *image_shape), jnp.float32))
  return tuple(paths)
