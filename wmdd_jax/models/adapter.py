"""Your own Flax classifier as a wmdd_jax teacher or student: :func:`adapt`.

Every stage calls a model as ``model.apply(variables, x, train=train)`` and expects
``(logits f32[B, C], features f32[B, d])``; the statistics pass and recover also need each
BatchNorm input's per-sample moments, which the registered models record with
:class:`~wmdd_jax.models.CapturingBatchNorm`. :func:`adapt` gives any Flax Linen classifier
that contract without touching its code:

    model = adapt(MyNet(num_classes=10), features="head:input")
    variables = init_model(model, key, (32, 32, 3))
    out = apply_model(model, variables, images)   # logits, features, BN-input moments

What the adapter provides, and how:

* **train / eval mode.** ``train`` is passed to the wrapped module under the name its
  ``__call__`` takes (``train``, ``training`` or ``is_training``; ``deterministic`` and
  ``use_running_average`` get ``not train``), or under ``train_arg``. Every plain
  ``nn.BatchNorm`` whose mode is not fixed by its attribute or its call gets
  ``use_running_average=not train``, so a module that takes no mode argument still trains its BN
  statistics with the student and uses the running ones in eval mode.
* **features.** ``features`` names them: ``"<path>"`` is the output of the submodule at that
  path (relative to the wrapped module, ``/``-joined, e.g. ``"backbone/pool"`` or ``"Dense_0"``),
  ``"<path>:input"`` its first input; None (the default) is the input of the last ``nn.Dense``
  called, which for most classifiers is the penultimate feature vector. Features with more than
  two dimensions are flattened to [B, d]. For anything else pass a callable ``fn(module, x,
  train) -> (logits, features)`` that calls the bound module itself. :func:`module_paths` lists
  the submodules a forward pass calls, to pick from.
* **BN-input moments.** Every plain ``nn.BatchNorm`` call (any ``axis``) records the
  per-sample mean and biased variance of its input over all axes but the batch and the feature
  axes, in call order, exactly as ``CapturingBatchNorm`` does (a Flax method interceptor,
  :func:`flax.linen.intercept_methods`; nothing in the wrapped module changes). A wrapped
  registered model keeps its own ``CapturingBatchNorm`` records (not counted twice).
* **dropout** is switched off (``deterministic=True``) where its call leaves it open: the
  distillation protocol has no dropout, and the student's step passes no dropout key. A
  ``nn.Dropout(deterministic=False)`` fixed in the module fails with Flax's missing-rng error.

The running-statistics ablations (``bn_stats="running"``: ``sre2l``, ``wass_bn``) need the
teacher's BN running statistics in forward order: :func:`running_statistics` here reads them
from adapted and registered models alike (``wmdd_jax.models.base.running_statistics`` knows only
the registered models' layout).

Not covered: other normalisation layers (LayerNorm, GroupNorm: nothing is recorded, so the BN
terms see only the BatchNorms), and Flax NNX modules (Linen's method interceptors do not reach
them).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wmdd_jax.errors import ConfigError, ShapeError
from wmdd_jax.models.base import (
    _CALL_ORDER,
    BN_COLLECTION,
    CapturingBatchNorm,
    bn_layer_paths,
)

# Names a module's __call__ may use for the mode flag: True in training, and the inverted ones.
_TRAIN_NAMES = ("train", "training", "is_training")
_EVAL_NAMES = ("deterministic", "use_running_average")


def _train_arg(module: nn.Module) -> str | None:
  try:
    params = inspect.signature(type(module).__call__).parameters
  except (TypeError, ValueError):
    return None
  for name in _TRAIN_NAMES + _EVAL_NAMES:
    if name in params:
      return name
  return None


def _moments(x: jax.Array, feature_axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """Per-sample (mean, biased var) over every axis but 0 and ``feature_axes``: f32[B, ch...]."""
  xf = x.astype(jnp.float32)
  axes = tuple(a for a in range(1, x.ndim) if a not in feature_axes)
  if not axes:  # BatchNorm on [B, ch]: every sample is one position.
    return xf, jnp.zeros_like(xf)
  mean = jnp.mean(xf, axis=axes, keepdims=True)
  var = jnp.mean(jnp.square(xf - mean), axis=axes)
  return jnp.squeeze(mean, axes), var


def _feature_axes(bn: nn.BatchNorm, ndim: int) -> tuple[int, ...]:
  axis = bn.axis if isinstance(bn.axis, tuple | list) else (bn.axis,)
  return tuple(a % ndim for a in axis)


class Adapted(nn.Module):
  """A Flax classifier with the wmdd_jax model contract (see the module docstring).

  Build it with :func:`adapt`. ``__call__(x, train)`` returns ``(logits f32[B, C], features
  f32[B, d])``; the wrapped module's variables live under ``"module"``.

  Attributes:
    module: the wrapped classifier (unbound).
    features: ``None``, ``"<path>"``, ``"<path>:input"`` or a callable (module docstring).
    train_arg: the keyword the wrapped ``__call__`` takes for the mode ("" for none); one of
      ``deterministic`` / ``use_running_average`` receives ``not train``.
  """

  module: nn.Module
  features: str | Callable[..., Any] | None = None
  train_arg: str = ""

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    """Args: x f32[B, H, W, ch] normalised; train: BN in train mode. Returns (logits, features)."""
    root = (*self.path, "module")  # the wrapped module's path (a dataclass field's name)
    spec = self.features
    target, take = None, "output"
    if spec is None:
      take = "last_dense_input"
    elif isinstance(spec, str):
      path, _, part = spec.partition(":")
      if part not in ("", "input", "output"):
        raise ConfigError(f"features={spec!r}: the part after ':' must be 'input' or 'output'.")
      target, take = tuple(p for p in path.split("/") if p), part or "output"
    captured: list[jax.Array] = []
    called: list[tuple[str, str]] = []
    capture_bn = self.is_mutable_collection(BN_COLLECTION)

    def interceptor(next_fun, args, kwargs, context):
      module = context.module
      if context.method_name != "__call__":
        return next_fun(*args, **kwargs)
      rel = tuple(module.path)[len(root):]
      called.append(("/".join(rel), type(module).__name__))
      if isinstance(module, nn.BatchNorm) and not isinstance(module.parent, CapturingBatchNorm):
        if (module.use_running_average is None and len(args) < 2
            and "use_running_average" not in kwargs):
          kwargs = {**kwargs, "use_running_average": not train}
        if capture_bn and module.is_mutable_collection(BN_COLLECTION):
          x_in = args[0]
          module.sow(BN_COLLECTION, "moments", _moments(x_in, _feature_axes(module, x_in.ndim)))
          order = getattr(_CALL_ORDER, "paths", None)
          if order is not None:
            order.append(tuple(module.path))
      elif (isinstance(module, nn.Dropout) and module.deterministic is None and len(args) < 2):
        kwargs = {**kwargs, "deterministic": True}
      out = next_fun(*args, **kwargs)
      if take == "last_dense_input" and isinstance(module, nn.Dense):
        captured.append(args[0])
      elif target is not None and rel == target:
        captured.append(args[0] if take == "input" else out)
      return out

    with nn.intercept_methods(interceptor):
      if callable(spec) and not isinstance(spec, str):
        logits, features = spec(self.module, x, train)
      else:
        kwargs = {}
        if self.train_arg:
          kwargs[self.train_arg] = (not train) if self.train_arg in _EVAL_NAMES else train
        out = self.module(x, **kwargs)
        logits = out[0] if isinstance(out, tuple | list) else out
        if not captured:
          names = ", ".join(f"{p or '<root>'} ({t})" for p, t in called) or "none"
          what = ("no nn.Dense was called" if target is None
                  else f"no submodule at {'/'.join(target)!r} was called")
          raise ConfigError(
              f"adapt(features={spec!r}): {what}. Name the features with features='<path>' or "
              f"'<path>:input' (paths relative to the wrapped module; called: {names}), or pass "
              "a callable (module, x, train) -> (logits, features).")
        features = captured[-1]
    if not isinstance(logits, jax.Array) or logits.ndim != 2:
      raise ShapeError(f"The adapted model's logits must be f32[B, num_classes], got "
                       f"{getattr(logits, 'shape', type(logits).__name__)}; if the module returns "
                       "a dict or several outputs, pass features=callable returning (logits, "
                       "features).")
    features = jnp.asarray(features)
    if features.ndim > 2:
      features = features.reshape(features.shape[0], -1)
    return logits.astype(jnp.float32), features.astype(jnp.float32)


def adapt(module: nn.Module, features: str | Callable[..., Any] | None = None, *,
          train_arg: str | None = "auto") -> Adapted:
  """Wraps a Flax Linen classifier so it can serve as teacher or student.

  Args:
    module: an unbound ``nn.Module`` whose ``__call__(x, ...)`` takes f32[B, H, W, ch] and
      returns logits f32[B, C] (or a tuple whose first element they are).
    features: what the penultimate features are: None (the input of the last ``nn.Dense``
      called), ``"<path>"`` (a submodule's output), ``"<path>:input"`` (its input), or a
      callable ``fn(module, x, train) -> (logits, features)`` (see the module docstring).
    train_arg: the keyword of ``module.__call__`` that takes the mode; "auto" finds ``train``,
      ``training``, ``is_training``, ``deterministic`` or ``use_running_average`` in its
      signature; None passes nothing (BatchNorms then follow ``train`` through the adapter).

  Returns:
    An :class:`Adapted` module (hashable; use it wherever a registered model goes:
    ``init_model``, ``apply_model``, ``compute_class_statistics``, ``recover``,
    ``train_student``).

  Raises:
    ConfigError: ``module`` is not a Flax Linen module, or ``train_arg`` is not a keyword of
      its ``__call__``.
  """
  if not isinstance(module, nn.Module):
    raise ConfigError(f"adapt takes a flax.linen Module, got {type(module).__name__}. Flax NNX "
                      "models are not supported: their BatchNorm inputs cannot be intercepted "
                      "(write the model in Linen, or give it the contract directly).")
  if train_arg == "auto":
    train_arg = _train_arg(module)
  elif train_arg is not None:
    params = inspect.signature(type(module).__call__).parameters
    if train_arg not in params and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
      raise ConfigError(f"{type(module).__name__}.__call__ has no argument {train_arg!r}; "
                        f"it takes {list(params)[1:]}. Pass train_arg=None when it takes none.")
  return Adapted(module=module, features=features, train_arg=train_arg or "")


def module_paths(model: nn.Module, image_shape: tuple[int, int, int]) -> tuple[str, ...]:
  """The submodules one forward pass calls, as ``"path (Type)"`` in call order.

  Paths are relative to the model (for an :class:`Adapted` model, to the wrapped module: what
  ``features=`` takes). Traced abstractly (no compute).

  Args:
    model: an unbound Flax module taking ``(x, train=False)`` (an Adapted or registered model)
      or ``(x)``.
    image_shape: (H, W, ch) of one input image.
  """
  inner = isinstance(model, Adapted)
  seen: list[str] = []

  def record(next_fun, args, kwargs, context):
    if context.method_name == "__call__":
      path = tuple(context.module.path)[1 if inner else 0:]
      if path:
        seen.append(f"{'/'.join(path)} ({type(context.module).__name__})")
    return next_fun(*args, **kwargs)

  def run(x):
    with nn.intercept_methods(record):
      if inner or "train" in inspect.signature(type(model).__call__).parameters:
        return model.init(jax.random.key(0), x, train=False)
      return model.init(jax.random.key(0), x)

  jax.eval_shape(run, jax.ShapeDtypeStruct((1, *image_shape), jnp.float32))
  return tuple(dict.fromkeys(seen))


def running_statistics(model: nn.Module, variables: dict[str, Any],
                       image_shape: tuple[int, ...]
                       ) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
  """The BN running statistics of an adapted (or registered) model, layer by layer in forward
  order, aligned with ``apply_model``'s moments.

  Args:
    model: an :class:`Adapted` or registered model.
    variables: its ``{"params", "batch_stats"}``.
    image_shape: (H, W, ch) of one input image.

  Returns:
    (means, vars): tuples over BN layers of f32[ch_l] (``RecoverTargets.running_mean/var``).
  """
  paths = bn_layer_paths(model, variables, image_shape)
  means, varis = [], []
  for path in paths:
    node = variables["batch_stats"]
    for name in path:
      node = node[name]
    node = node.get("bn", node)  # CapturingBatchNorm keeps its nn.BatchNorm as "bn"
    means.append(jnp.asarray(node["mean"], jnp.float32))
    varis.append(jnp.asarray(node["var"], jnp.float32))
  return tuple(means), tuple(varis)
