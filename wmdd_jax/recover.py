"""Stage 4 (recover): optimise synthetic images towards barycenter features and BN statistics.

Notation: a chunk of n classes optimised together, k = IPC images per class, X_c: f32[k, H, W,
ch] (normalised space), F_c = f_e(aug(X_c)): f32[k, d] penultimate features, B_c: f32[k, d]
barycenter support (image j of class c is tied to point j), mu_l / var_l the biased per-channel
moments of BN layer l's input, m_l the layer multiplier (``first_bn_multiplier`` for the first BN
layer in forward order, 1 for the others). Norms are not squared (as in the paper).

``objective="official"`` (the default) is the loss of the official code's step
(recover/data_synthesis_new.py + recover/utils.py ``BNFeatureHook_new``, run by run.sh with
R_WB=1), over the whole chunk at once::

    L = r_ce * mean_{c, j} CE(f(aug(X_cj)), c)
      + r_feat * || F_chunk - B_chunk ||_F                          (ONE norm over the chunk)
      + r_bn * sum_l m_l * mean_c (||var_l(aug(X_c)) - var[c, l]||_2
                                   + ||mu_l(aug(X_c)) - mu[c, l]||_2)

with n = min(batch_size // k, C) classes per chunk (official ``--batch-size 100``) unless
``class_chunk`` says otherwise; the official r_wb is ``r_ce`` (default 1 under this objective)
and r_feat = 1.

``objective="per_class"`` makes every class an independent problem (summed over the chunk)::

    L_c = r_feat * ||F_c - B_c||_F
        + r_bn * sum_l m_l * (||mu_l(aug(X_c)) - mu[c, l]||_2 + ||var_l(aug(X_c)) - var[c, l]||_2)
        + r_ce * mean_j CE(f(aug(X_cj)), c)

Relation: with a_c = ||F - B||_F / ||F_c - B_c||_F (about sqrt(n) when classes are alike), the
official gradient with respect to class c's images is

    dL / dX_c = (1 / a_c) * d/dX_c [ ||F_c - B_c||_F + (r_bn a_c / n) BN_c + (r_ce a_c / n) CE_c ]

i.e. the per-class form with r_bn_eff = r_bn a_c / n ~ r_bn / sqrt(n) and r_ce_eff = r_ce a_c / n
~ r_ce / sqrt(n), times a per-class step scale 1 / a_c that Adam largely normalises away. The two
agree exactly when a chunk holds one class (n = 1, a_c = 1).

BN statistics (``bn_stats``): "class" (per-class real statistics, PCBN: WMDD), "running" (the
teacher's running statistics matched by the statistics of the whole chunk, as SRe2L and the
official data_synthesis.py ablations do), "global" (all-class statistics computed from the data,
matched by the whole chunk; our variant of "running"), or "none". With "running"/"global" the
chunk-wide term is the same in both objectives.

Layout: "class" optimises whole classes (k images each) per chunk; "slot" is the official
data_synthesis.py loop (SRe2L, and WMDD's Wass+BN / CE+BN rows): IPC separate rounds, round j
optimising image j of every class, ``min(batch_size, C)`` classes (one image each) per batch.

Randomness is a pure function of (key, step, class id): initial noise uses
``fold_in(init_key, class_id)``, augmentation ``fold_in(key, step)`` (shared by every image, the
official default) or ``fold_in(fold_in(key, step), class_id)`` per class when ``per_image``.
Under ``per_class`` results do not depend on how classes are chunked; a resumed run is
bit-identical under both objectives. Chunks whose last part is short are padded by repeating the
last class; the repeats are masked out of every term, so they change nothing.

Several devices (an :class:`~wmdd_jax.distributed.Execution`): on a mesh each chunk's class axis
is split over the devices (images, Adam moments, targets and class ids), the teacher is
replicated, and the chunk-wide sums of the official loss are reduced across devices by XLA;
chunks are padded to a multiple of the device count. Work units run whole chunks on devices
``chunk % D``. Under ``per_class`` the chunk can be chosen from a per-device
memory budget (:func:`choose_class_chunk`), measured on the compiled step rather than guessed.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from wmdd_jax import tracking
from wmdd_jax.data import transforms
from wmdd_jax.distributed import Execution, peak_bytes
from wmdd_jax.errors import ConfigError, NonFiniteError, ShapeError
from wmdd_jax.models.base import apply_model, pool_moments

FEATURE_TARGETS = ("barycenter", "none")
BN_MODES = ("class", "running", "global", "none")
INITS = ("noise", "real")
OBJECTIVES = ("official", "per_class")
LAYOUTS = ("class", "slot")


@dataclasses.dataclass(frozen=True)
class RecoverOptions:
  """Hyperparameters of the recover stage (defaults: docs/method.md, section 3).

  Attributes:
    iterations: optimisation steps per chunk.
    lr: Adam learning rate, cosine-decayed to 0 over ``iterations`` without warm-up.
    beta1, beta2: Adam betas.
    r_feat, r_bn: coefficients of the feature and BN terms.
    r_ce: coefficient of the cross-entropy term (the official r_wb). None: 1.0 under
      ``objective="official"`` (run.sh passes R_WB=1), 0.0 under ``"per_class"``.
    objective: "official" (the official chunk loss, see the module docstring; the default, as
      this library reproduces the method as its authors ran it) or "per_class" (independent
      classes).
    feature_target: "barycenter" (WMDD) or "none" (no feature term).
    bn_stats: "class", "running", "global" or "none" (module docstring).
    first_bn_multiplier: weight of the first BN layer's term (official: 1 in
      data_synthesis_new.py, 10 in data_synthesis.py).
    layout: "class" (whole classes per chunk) or "slot" (the official data_synthesis.py loop:
      one image of every class per batch, IPC rounds).
    batch_size: images per step that set the default chunk (official ``--batch-size 100``):
      n = min(batch_size // ipc, C) classes under "official"/"class", min(batch_size, C) under
      "slot"; ignored by "per_class"/"class" (all classes at once) and when ``class_chunk`` is
      given to :func:`recover`.
    augment: random-resized-crop + flip + jitter each step.
    per_image: one augmentation draw per image instead of one per step for the whole batch.
    crop_scale: random-resized-crop scale range.
    jitter_fraction: maximum circular shift as a fraction of the image side (official: 32 px at
      224, 1/7), drawn in [0, max] as the official code does.
    init: "noise" (N(0, 1) in normalised space) or "real" (images given by the caller).
    steps_per_call: steps run between host syncs (progress, NaN checks, checkpoints).
    scan: fuse each block of steps into one ``lax.scan`` (slower on CPU: bench/recover.py,
      docs/benchmarks.md).
  """

  iterations: int = 2000
  lr: float = 0.25
  beta1: float = 0.5
  beta2: float = 0.9
  r_feat: float = 1.0
  r_bn: float = 10.0
  r_ce: float | None = None
  objective: str = "official"
  feature_target: str = "barycenter"
  bn_stats: str = "class"
  first_bn_multiplier: float = 1.0
  layout: str = "class"
  batch_size: int = 100
  augment: bool = True
  per_image: bool = False
  crop_scale: tuple[float, float] = (0.08, 1.0)
  jitter_fraction: float = 1.0 / 7.0
  init: str = "noise"
  steps_per_call: int = 25
  scan: bool = False

  def __post_init__(self):
    for name, value, allowed in (("feature_target", self.feature_target, FEATURE_TARGETS),
                                 ("bn_stats", self.bn_stats, BN_MODES),
                                 ("init", self.init, INITS),
                                 ("objective", self.objective, OBJECTIVES),
                                 ("layout", self.layout, LAYOUTS)):
      if value not in allowed:
        raise ConfigError(f"recover option {name}={value!r} is not one of {allowed}.")
    if self.r_ce is None:
      object.__setattr__(self, "r_ce", 1.0 if self.objective == "official" else 0.0)
    if self.iterations < 1 or self.steps_per_call < 1 or self.batch_size < 1:
      raise ConfigError("recover iterations, steps_per_call and batch_size must be >= 1; got "
                        f"{self.iterations}, {self.steps_per_call} and {self.batch_size}.")
    if not self.lr > 0:
      raise ConfigError(f"recover lr={self.lr} must be > 0 (the official default is 0.25).")
    for name in ("r_feat", "r_bn", "r_ce", "first_bn_multiplier"):
      if not getattr(self, name) >= 0:
        raise ConfigError(f"recover {name}={getattr(self, name)} must be >= 0 (0 turns the "
                          "term off).")
    lo, hi = (tuple(self.crop_scale) + (None, None))[:2]
    if len(tuple(self.crop_scale)) != 2 or not 0 < lo <= hi <= 1:
      raise ConfigError(f"recover crop_scale={self.crop_scale} must be (lo, hi) with "
                        "0 < lo <= hi <= 1, e.g. (0.08, 1.0).")

  @property
  def couples_classes(self) -> bool:
    """Whether which classes share a chunk is part of the loss (so the chunk is not free)."""
    return (self.objective == "official" or self.layout == "slot"
            or self.bn_stats in ("running", "global"))

  def default_chunk(self, ipc: int, num_classes: int) -> int:
    """Classes per chunk when :func:`recover` is given no ``class_chunk`` (see batch_size)."""
    if self.layout == "slot":
      return min(self.batch_size, num_classes)
    if self.objective == "official":
      # The official code asserts batch_size // ipc >= 1; one class per step is the nearest.
      return max(1, min(self.batch_size // ipc, num_classes))
    return num_classes


class RecoverTargets(NamedTuple):
  """What the synthetic images of each class are pulled towards.

  Attributes:
    features: f32[C, k, d] barycenter support points (ignored when feature_target="none").
    bn_mean: tuple over BN layers of f32[C, ch_l], per-class real statistics.
    bn_var: tuple over BN layers of f32[C, ch_l].
    global_mean: tuple over BN layers of f32[ch_l], all-class statistics from the data.
    global_var: tuple over BN layers of f32[ch_l].
    running_mean: tuple over BN layers of f32[ch_l], the teacher's BN running statistics
      (:func:`wmdd_jax.models.base.running_statistics`); needed by ``bn_stats="running"``.
    running_var: tuple over BN layers of f32[ch_l].
  """

  features: jax.Array
  bn_mean: tuple[jax.Array, ...]
  bn_var: tuple[jax.Array, ...]
  global_mean: tuple[jax.Array, ...]
  global_var: tuple[jax.Array, ...]
  running_mean: tuple[jax.Array, ...] = ()
  running_var: tuple[jax.Array, ...] = ()

  def take(self, class_ids: np.ndarray) -> RecoverTargets:
    """The targets of a chunk of classes."""
    return self._replace(
        features=self.features[class_ids],
        bn_mean=tuple(m[class_ids] for m in self.bn_mean),
        bn_var=tuple(v[class_ids] for v in self.bn_var),
    )


class RecoverState(NamedTuple):
  """The optimiser state of one chunk of classes.

  Attributes:
    images: f32[C, k, H, W, ch] in normalised space.
    opt_state: Adam's state for ``images``.
    step: i32[] steps taken.
  """

  images: jax.Array
  opt_state: Any
  step: jax.Array


def make_optimizer(options: RecoverOptions) -> optax.GradientTransformation:
  schedule = optax.cosine_decay_schedule(options.lr, options.iterations)
  return optax.adam(schedule, b1=options.beta1, b2=options.beta2)


def init_images(key: jax.Array, class_ids: Any, ipc: int, image_shape: Sequence[int]):
  """N(0, 1) noise per class from ``fold_in(key, class_id)``: f32[C, ipc, H, W, ch]."""
  draw = lambda c: jax.random.normal(jax.random.fold_in(key, c), (ipc, *image_shape))
  return jax.vmap(draw)(jnp.asarray(class_ids, jnp.int32))


def init_state(images: jax.Array, options: RecoverOptions) -> RecoverState:
  images = jnp.asarray(images, jnp.float32)
  return RecoverState(images, make_optimizer(options).init(images), jnp.zeros((), jnp.int32))


def _augment(key, images, class_ids, options: RecoverOptions):
  """images: f32[C, k, H, W, ch] -> same shape, augmented (see module docstring for keys)."""
  if not options.augment:
    return images
  c, k, h, w, ch = images.shape
  kwargs = dict(out_hw=(h, w), scale=options.crop_scale,
                max_shift=int(max(h, w) * options.jitter_fraction))
  if not options.per_image:
    flat = transforms.augment_batch(key, images.reshape(c * k, h, w, ch), per_image=False,
                                    **kwargs)
    return flat.reshape(images.shape)
  per_class = lambda cid, x: transforms.augment_batch(jax.random.fold_in(key, cid), x,
                                                      per_image=True, **kwargs)
  return jax.vmap(per_class)(class_ids, images)


def _first_occurrences_host(ids: np.ndarray) -> np.ndarray:
  ids = np.asarray(ids)
  return np.concatenate([[True], ids[1:] != ids[:-1]])


def first_occurrences(class_ids: jax.Array) -> jax.Array:
  """bool[C]: True where a class id is not a padding repeat of the previous one."""
  return jnp.concatenate([jnp.ones((1,), bool), class_ids[1:] != class_ids[:-1]])


def _bn_distance(mean, var, target_mean, target_var, multipliers):
  """sum_l m_l (||mean_l - target_mean_l||_2 + ||var_l - target_var_l||_2)."""
  total = jnp.zeros((), jnp.float32)
  for mu, v, tm, tv, m in zip(mean, var, target_mean, target_var, multipliers):
    total = total + m * (jnp.linalg.norm(mu - tm) + jnp.linalg.norm(v - tv))
  return total


def chunk_loss(
    images: jax.Array,
    variables: dict[str, Any],
    targets: RecoverTargets,
    class_ids: jax.Array,
    key: jax.Array,
    *,
    model: nn.Module,
    options: RecoverOptions,
):
  """Loss of a chunk of classes (``options.objective``, see the module docstring).

  Args:
    images: f32[C, k, H, W, ch] synthetic images (normalised).
    variables: the teacher's variables.
    targets: the chunk's targets (``RecoverTargets.take``).
    class_ids: i32[C] the chunk's class indices (CE labels, per-class keys; a repeat of the
      previous id marks a padding class, masked out of every term).
    key: this step's augmentation key.
    model: the teacher module.
    options: RecoverOptions.

  Returns:
    (total loss f32[], aux) with aux = {"loss": the total, "class_loss": f32[C] the per-class
    form's loss of each class, and the unweighted per-class terms "feature" (||F_c - B_c||_F),
    "bn" and "ce": f32[C]} (a chunk-wide BN term is spread evenly over the chunk's classes;
    padding classes are 0).
  """
  c, k = images.shape[:2]
  x = _augment(key, images, class_ids, options)
  out = apply_model(model, variables, x.reshape(c * k, *x.shape[2:]), train=False)
  split = lambda a: a.reshape(c, k, *a.shape[1:])
  real = first_occurrences(class_ids).astype(jnp.float32)
  num_real = jnp.sum(real)
  layers = len(out.bn_mean)
  multipliers = [options.first_bn_multiplier] + [1.0] * (layers - 1)
  zeros = jnp.zeros((c,), jnp.float32)

  feat_sq = zeros
  if options.feature_target == "barycenter":
    feat_sq = jnp.sum(jnp.square(split(out.features) - targets.features), axis=(1, 2))
  feature = jnp.sqrt(feat_sq)
  ce = zeros
  if options.r_ce:
    logits = split(out.logits)
    labels = jnp.broadcast_to(class_ids[:, None], (c, k))
    ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels), axis=1)

  bn = zeros
  bn_total = jnp.zeros((), jnp.float32)
  if options.bn_stats == "class":
    def per_class(m, v, tm, tv):
      pooled = [pool_moments(a, b, axis=0) for a, b in zip(m, v)]
      return _bn_distance([p[0] for p in pooled], [p[1] for p in pooled], tm, tv, multipliers)
    bn = real * jax.vmap(per_class)(tuple(map(split, out.bn_mean)),
                                    tuple(map(split, out.bn_var)), targets.bn_mean,
                                    targets.bn_var)
    # Official: the mean over the chunk's classes; per-class: their sum.
    bn_total = jnp.sum(bn) / num_real if options.objective == "official" else jnp.sum(bn)
  elif options.bn_stats in ("running", "global"):
    if options.bn_stats == "running":
      if not targets.running_mean:
        raise ConfigError("bn_stats='running' needs RecoverTargets.running_mean/var (the "
                          "teacher's BN running statistics: models.base.running_statistics).")
      tmean, tvar = targets.running_mean, targets.running_var
    else:
      tmean, tvar = targets.global_mean, targets.global_var
    # The moments of every real image of the chunk pooled together (weights drop padding).
    w = jnp.repeat(real, k)[:, None] / (num_real * k)
    mus, vs = [], []
    for m, v in zip(out.bn_mean, out.bn_var):
      mu = jnp.sum(w * m, axis=0)
      mus.append(mu)
      vs.append(jnp.sum(w * (v + jnp.square(m - mu)), axis=0))
    bn_total = _bn_distance(mus, vs, tmean, tvar, multipliers)
    bn = real * bn_total / num_real

  feature = real * feature
  ce = real * ce
  class_loss = options.r_feat * feature + options.r_bn * bn + options.r_ce * ce
  if options.objective == "official":
    total = (options.r_feat * jnp.sqrt(jnp.sum(real * feat_sq)) + options.r_bn * bn_total
             + options.r_ce * jnp.sum(ce) / num_real)
  else:
    total = (jnp.sum(options.r_feat * feature + options.r_ce * ce) + options.r_bn * bn_total)
  return total, {"loss": total, "class_loss": class_loss, "feature": feature, "bn": bn,
                 "ce": ce}


def make_update_fn(model: nn.Module, options: RecoverOptions, mean: Any, std: Any, *,
                   execution: Execution | None = None
                   ) -> Callable[..., tuple[RecoverState, dict[str, jax.Array]]]:
  """Builds ``run(state, variables, targets, class_ids, key, num_steps)``.

  ``run`` performs ``num_steps`` Adam steps (jitted, donating ``state``; one ``lax.scan`` when
  ``options.scan``), and returns the new state and per-step metrics {"loss": f32[n] the chunk's
  official loss (``objective="official"``) or the per-class loss averaged over the chunk's
  classes (``"per_class"``), "class_loss": f32[n, C], "feature": f32[n], "bn": f32[n],
  "ce": f32[n]} (the unweighted terms averaged over the chunk's real classes), plus the
  unweighted terms per class, "class_feature", "class_bn", "class_ce": f32[n, C].
  ``run.step`` is the jitted single step ``(state, variables, targets, class_ids, key) ->
  (state, metrics)``.

  The inputs are laid out as ``execution.chunk_placement`` puts them (on a mesh: split along
  the class axis); the new state keeps that layout (so the donated buffers are reused) and the
  metrics are whole, so every process can read them. The step is compiled by
  ``execution.jit(program="recover_step")``, with that kind of program's compile options
  (:class:`~wmdd_jax.distributed.ExecutionOptions` ``compiler_options``).
  """
  execution = execution or Execution()
  tx = make_optimizer(options)
  grad_fn = jax.grad(chunk_loss, has_aux=True)
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)

  def one_step(carry, _, variables, targets, class_ids, key):
    state = carry
    step_key = jax.random.fold_in(key, state.step)
    grads, aux = grad_fn(state.images, variables, targets, class_ids, step_key, model=model,
                         options=options)
    updates, opt_state = tx.update(grads, state.opt_state, state.images)
    images = transforms.clip_to_valid(optax.apply_updates(state.images, updates), mean, std)
    real = first_occurrences(class_ids).astype(jnp.float32)
    mean_real = lambda a: jnp.sum(a) / jnp.sum(real)  # padding classes are 0 in aux
    # "loss": the official chunk loss, or the per-class form's loss per class (its total / n).
    loss = aux["loss"] if options.objective == "official" else aux["loss"] / jnp.sum(real)
    metrics = {"loss": loss, "class_loss": aux["class_loss"],
               "feature": mean_real(aux["feature"]), "bn": mean_real(aux["bn"]),
               "ce": mean_real(aux["ce"]), "class_feature": aux["feature"],
               "class_bn": aux["bn"], "class_ce": aux["ce"]}
    new = RecoverState(images, opt_state, state.step + 1)
    return (execution.constrain_classes(new, images.shape[0]),
            execution.constrain_whole(metrics))

  # Compiled as the execution compiles a recover step (on CPU: without YNNPACK's convolution
  # fusion, measured faster in bench/official.py).
  step = execution.jit(lambda state, variables, targets, class_ids, key: one_step(
      state, None, variables, targets, class_ids, key), program="recover_step",
      donate_argnums=(0,))

  if options.scan:
    def run(state, variables, targets, class_ids, key, num_steps):
      body = lambda carry, x: one_step(carry, x, variables, targets, class_ids, key)
      return jax.lax.scan(body, state, None, length=num_steps)

    fused = execution.jit(run, program="recover_step", static_argnames=("num_steps",),
                          donate_argnums=(0,))
    fused.step = step
    return fused

  def run_steps(state, variables, targets, class_ids, key, num_steps):
    # No host sync in here: each call is dispatched asynchronously, metrics stay on device.
    history = []
    for _ in range(num_steps):
      state, metrics = step(state, variables, targets, class_ids, key)
      history.append(metrics)
    return state, jax.tree.map(lambda *xs: jnp.stack(xs), *history)

  run_steps.step = step
  return run_steps


@functools.lru_cache(maxsize=16)
def _cached_update_fn(model, options, mean, std, execution):
  return make_update_fn(model, options, mean, std, execution=execution)


def _shared_update_fn(model: nn.Module, options: RecoverOptions, mean: Any, std: Any,
                      execution: Execution):
  """:func:`make_update_fn`, one per distinct (model, options, mean, std, execution).

  Sharing the jitted functions lets later calls reuse their compilations: the chunk size that
  :func:`choose_class_chunk` measured, a resumed or repeated ``recover``.
  """
  try:
    key = tuple(float(x) for x in np.ravel(mean)), tuple(float(x) for x in np.ravel(std))
    return _cached_update_fn(model, options, *key, execution)
  except TypeError:  # an unhashable model: build a fresh one
    return make_update_fn(model, options, mean, std, execution=execution)


def check_finite(metrics: dict[str, np.ndarray], class_ids: np.ndarray, first_step: int):
  """Raises NonFiniteError naming the first class and step whose loss is NaN/Inf.

  A class's own terms name it; a chunk-wide total that is not finite while every class's terms
  are (possible under the official objective) names the chunk's classes.
  """
  losses = np.asarray(metrics["class_loss"])
  totals = np.asarray(metrics["loss"])
  hint = ("Lower recover.lr or the loss coefficients (r_bn), or check the teacher and "
          "statistics for NaN.")
  bad = ~np.isfinite(losses)
  bad_total = ~np.isfinite(totals)
  if bad.any() and (not bad_total.any() or np.argwhere(bad)[0][0] <= np.argmax(bad_total)):
    s, c = np.argwhere(bad)[0]
    raise NonFiniteError(f"recover loss became {losses[s, c]} for class {int(class_ids[c])} at "
                         f"step {first_step + int(s)}. {hint}")
  if bad_total.any():
    s = int(np.argmax(bad_total))
    ids = sorted({int(i) for i in np.asarray(class_ids)})
    raise NonFiniteError(f"recover loss became {totals[s]} for the chunk of classes {ids} at "
                         f"step {first_step + s}. {hint}")


@jax.jit
def _finite_classes(images: jax.Array) -> jax.Array:
  return jnp.all(jnp.isfinite(images), axis=tuple(range(1, images.ndim)))


def check_finite_images(finite: np.ndarray, class_ids: np.ndarray, step: int) -> None:
  """Raises NonFiniteError naming the classes whose images hold NaN/Inf after ``step`` steps.

  Args:
    finite: bool[C_chunk], whether each of the chunk's classes has only finite pixels.
    class_ids: i32[C_chunk] the chunk's classes.
    step: the steps done.
  """
  finite = np.asarray(finite)
  if not finite.all():
    ids = sorted({int(i) for i in np.asarray(class_ids)[~finite]})
    raise NonFiniteError(
        f"recover images of classes {ids} became NaN/Inf by step {step} (the last update of "
        "the block; nothing was checkpointed from it). Lower recover.lr or the loss "
        "coefficients (r_bn), or check the teacher and statistics for NaN.")


def recover(
    model: nn.Module,
    variables: dict[str, Any],
    targets: RecoverTargets,
    *,
    ipc: int,
    image_shape: Sequence[int],
    mean: Any,
    std: Any,
    options: RecoverOptions,
    key: jax.Array,
    class_chunk: int = 0,
    initial_images: np.ndarray | None = None,
    resume: Callable[[int, RecoverState], RecoverState | None] | None = None,
    on_block: Callable[[int, RecoverState, dict[str, np.ndarray]], None] | None = None,
    progress: bool = True,
    execution: Execution | None = None,
    memory_budget_bytes: int | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Runs the recover stage over all classes, ``class_chunk`` classes at a time.

  Args:
    model, variables: the teacher (eval mode).
    targets: RecoverTargets for all C classes.
    ipc: images per class k.
    image_shape: (H, W, ch).
    mean, std: per-channel normalisation constants (pixel scale), for clipping.
    options: RecoverOptions.
    key: the recover stage's key; split into "init" and "augment" by name (fold_in).
    class_chunk: classes optimised together; 0 = ``options.default_chunk(ipc, C)`` (the
      official n = min(batch_size // ipc, C) under "official", all classes under "per_class").
    initial_images: f32[C, k, H, W, ch] normalised, required when options.init == "real".
    resume: ``resume(chunk_index, fresh_state) -> RecoverState | None``: a saved state to
      continue from (``fresh_state`` gives the structure to restore into), or None.
    on_block: called after every ``steps_per_call`` block with (chunk_index, state, metrics of
      the block); use it to checkpoint or log.
    progress: show progress (a bar on a terminal, else a log line now and then;
      :func:`wmdd_jax.tracking.progress`).
    execution: how the chunks run on devices (:mod:`wmdd_jax.distributed`; default: one
      device). On a mesh each chunk's classes are split over the devices (chunks padded to a
      multiple of the device count); with several processes every process runs ``recover`` (on
      the same targets) and gets all the images, and ``resume``/``on_block`` see sharded states
      (use :class:`wmdd_jax.checkpoint.RecoverCheckpointer`). With work units the classes are
      cut into chunks of at most ceil(C / units) classes (when the loss couples classes,
      ``options.couples_classes``, the chunk stays as the objective sets it), each optimised by
      the single-device program on device ``chunk % D``, D chunks at a time: the result is
      bit-identical for any device count.
    memory_budget_bytes: when set, the chunk is the largest (at most ``class_chunk``, or all
      classes) whose compiled step needs at most this many bytes per device
      (:func:`choose_class_chunk`).

  Returns:
    (images f32[C, k, H, W, ch], history) with history {"loss", "feature", "bn", "ce"}: f32[T]
    per step, averaged over classes (NaN for steps a resumed run did not see).

  Raises:
    ShapeError: targets that disagree with ipc or with each other.
    NonFiniteError: a NaN/Inf loss (names the class and step).
  """
  num_classes = int(targets.bn_mean[0].shape[0]) if targets.bn_mean else int(
      targets.features.shape[0])
  if options.feature_target == "barycenter" and tuple(targets.features.shape[:2]) != (
      num_classes, ipc):
    raise ShapeError(f"barycenter targets have shape {tuple(targets.features.shape)}, expected "
                     f"[{num_classes}, {ipc}, d]: compute barycenters with num_support=ipc.")
  if options.init == "real" and initial_images is None:
    raise ConfigError("recover init='real' needs initial_images (random real images per class).")
  execution = execution or Execution()
  if class_chunk < 0:
    raise ConfigError(f"recover class_chunk={class_chunk} must be >= 0 (0: the objective's "
                      "default, see RecoverOptions.batch_size).")
  if memory_budget_bytes and options.couples_classes:
    raise ConfigError(
        "memory_budget_bytes sizes the class chunk, which is part of the loss under the official "
        "objective, the slot layout and chunk-wide BN statistics; set class_chunk / "
        "recover.batch_size instead, or use objective='per_class' with bn_stats='class'.")
  if options.layout == "slot":
    return _recover_slots(model, variables, targets, ipc=ipc, image_shape=image_shape,
                          mean=mean, std=std, options=options, key=key,
                          class_chunk=class_chunk, initial_images=initial_images,
                          resume=resume, on_block=on_block, progress=progress,
                          execution=execution)
  chunk = min(class_chunk or options.default_chunk(ipc, num_classes), num_classes)
  # Which classes share a chunk is part of the loss unless classes are independent.
  coupled = options.couples_classes
  if not coupled:
    # Classes are independent: any chunking gives the same result (the execution may want
    # smaller chunks, e.g. one per work unit).
    chunk = execution.class_chunk(chunk, num_classes)
  init_key = jax.random.fold_in(key, 0)
  aug_key = jax.random.fold_in(key, 1)
  run = _shared_update_fn(model, options, mean, std, execution)
  if memory_budget_bytes:
    chunk = choose_class_chunk(model, variables, targets, ipc=ipc, image_shape=image_shape,
                               mean=mean, std=std, options=options,
                               memory_budget_bytes=memory_budget_bytes, execution=execution,
                               max_chunk=chunk, step=run.step)
  multiple = execution.class_multiple
  width = max(1, -(-chunk // multiple)) * multiple  # classes per compiled chunk (with padding)
  if not coupled:
    chunk = width  # independent classes: fill the padding with real classes instead
  images_out = np.zeros((num_classes, ipc, *image_shape), np.float32)
  # history[name][chunk, step]; NaN where a resumed chunk's earlier steps were not seen.
  names = ("loss", "feature", "bn", "ce")
  chunk_count = -(-num_classes // chunk)
  history = {k: np.full((chunk_count, options.iterations), np.nan, np.float32) for k in names}
  # Chunks of ``chunk`` classes, each padded to ``width`` with repeats of its last class so every
  # chunk has one compiled shape (splitting evenly over the mesh); the loss masks the repeats
  # out and their images are dropped.
  chunks = [np.minimum(np.arange(s, s + width), min(s + chunk, num_classes) - 1)
            for s in range(0, num_classes, chunk)]
  # The teacher and the augmentation key where the chunks read them.
  placed = execution.chunk_constants((variables, aug_key))
  bar = tracking.progress(len(chunks) * options.iterations, desc="recover", unit="step",
                          enabled=progress, leave=False)

  def start(index, class_ids):
    state, chunk_targets, ids = start_chunk(
        execution, index, targets, class_ids, init_key=init_key, ipc=ipc,
        image_shape=image_shape, options=options, initial_images=initial_images)
    if resume is not None:
      state = resume(index, state) or state
    return state, chunk_targets, ids

  # Chunks run in waves of one per device (units), else one at a time: each block is dispatched
  # for every chunk of the wave before any result is read, so the devices work concurrently.
  wave_size = execution.chunk_wave
  for first in range(0, len(chunks), wave_size):
    wave = list(range(first, min(first + wave_size, len(chunks))))
    live = {}
    for index in wave:
      state, chunk_targets, ids = start(index, chunks[index])
      done = int(state.step)
      bar.update(done)
      live[index] = [state, chunk_targets, ids, done]
    while any(entry[3] < options.iterations for entry in live.values()):
      pending = {}
      for index, (state, chunk_targets, ids, done) in live.items():
        if done < options.iterations:
          n = min(options.steps_per_call, options.iterations - done)
          teacher, key_d = placed[index % len(placed)]
          if coupled:
            # Chunks that are separate problems draw separate augmentations (the official
            # code's global RNG moves on from one class batch to the next).
            key_d = jax.random.fold_in(key_d, int(chunks[index][0]))
          live[index][0], pending[index] = run(state, teacher, chunk_targets, ids, key_d,
                                               num_steps=n)
      for index, metrics in pending.items():
        class_ids, done = chunks[index], live[index][3]
        metrics = jax.device_get(metrics)
        n = len(metrics["loss"])
        check_finite(metrics, class_ids, done)
        # The loss is taken before each update, so the block's last update is checked here,
        # before anything (a checkpoint, the result) keeps its images.
        check_finite_images(execution.to_host(_finite_classes(live[index][0].images)),
                            class_ids, done + n)
        for k in names:
          history[k][index, done:done + n] = metrics[k]
        live[index][3] = done + n
        bar.set_postfix(loss=float(metrics["loss"][-1]), chunk=index)
        bar.update(n)
        if on_block is not None:
          on_block(index, live[index][0], metrics)
    for index in wave:
      real = _first_occurrences_host(chunks[index])
      images_out[chunks[index][real]] = np.asarray(execution.to_host(live[index][0].images))[real]
  bar.close()
  return images_out, {k: _nanmean(v) for k, v in history.items()}


def _nanmean(values: np.ndarray) -> np.ndarray:
  """Mean over chunks, per step, of the steps each chunk ran (NaN where no chunk did: steps a
  resumed run did not see), without numpy's empty-slice warning."""
  seen = np.isfinite(values)
  counts = seen.sum(axis=0)
  sums = np.where(seen, values, 0.0).sum(axis=0)
  return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan).astype(values.dtype)


def _recover_slots(model, variables, targets: RecoverTargets, *, ipc, image_shape, mean, std,
                   options: RecoverOptions, key, class_chunk, initial_images, resume, on_block,
                   progress, execution):
  """The official data_synthesis.py loop (``layout="slot"``): IPC rounds of one image per class.

  Round j optimises image j of every class (barycenter point j), ``class_chunk`` (default
  ``min(batch_size, C)``) classes per batch, from a fresh Adam state and its own key
  ``fold_in(fold_in(key, 2), j)``. Chunk indices seen by ``resume``/``on_block`` are
  ``j * C + chunk``, so each round checkpoints separately.
  """
  num_classes = int(np.shape(targets.bn_mean[0])[0]) if targets.bn_mean else int(
      np.shape(targets.features)[0])
  inner = dataclasses.replace(options, layout="class")
  chunk = class_chunk or options.default_chunk(ipc, num_classes)
  features = np.asarray(targets.features)
  slot_key = jax.random.fold_in(key, 2)
  images = np.zeros((num_classes, ipc, *image_shape), np.float32)
  histories = []
  for j in range(ipc):
    offset = j * num_classes
    slot_targets = targets._replace(features=features[:, j:j + 1])
    initial = None if initial_images is None else np.asarray(initial_images)[:, j:j + 1]
    out, history = recover(
        model, variables, slot_targets, ipc=1, image_shape=image_shape, mean=mean, std=std,
        options=inner, key=jax.random.fold_in(slot_key, j), class_chunk=chunk,
        initial_images=initial,
        resume=None if resume is None else (lambda i, st, o=offset: resume(o + i, st)),
        on_block=None if on_block is None else (lambda i, st, m, o=offset: on_block(o + i, st, m)),
        progress=progress, execution=execution)
    images[:, j] = out[:, 0]
    histories.append(history)
  return images, {k: _nanmean(np.stack([h[k] for h in histories])) for k in histories[0]}


# ---------------------------------------------------------------------------------------------
# Several devices.


def start_chunk(
    execution: Execution,
    index: int,
    targets: RecoverTargets,
    class_ids: np.ndarray,
    *,
    init_key: jax.Array,
    ipc: int,
    image_shape: Sequence[int],
    options: RecoverOptions,
    initial_images: np.ndarray | None = None,
) -> tuple[RecoverState, RecoverTargets, jax.Array]:
  """The fresh state, targets and ids of chunk ``index``, where ``execution`` places it.

  On a mesh the initial noise is drawn on the devices that own each class (the same values as
  :func:`init_images`: random bits do not depend on the layout), so no device ever holds the
  whole chunk.

  Args:
    execution: how the chunk runs on devices.
    index: the chunk's index (work units place chunk ``index`` on device ``index % D``).
    targets: RecoverTargets of all classes (host or device arrays, the same on every process).
    class_ids: i32[C_chunk], a multiple of ``execution.class_multiple``.
    init_key: the key of the initial noise.
    ipc: k.
    image_shape: (H, W, ch).
    options: RecoverOptions.
    initial_images: f32[C, k, H, W, ch] for ``options.init == "real"``.

  Returns:
    (RecoverState, RecoverTargets, class ids i32[C_chunk]) laid out for the chunk's step.
  """
  class_ids = np.asarray(class_ids, np.int32)
  c = class_ids.size
  if c % execution.class_multiple:
    raise ShapeError(f"a chunk of {c} classes does not split over "
                     f"{execution.class_multiple} devices; pad it to a multiple.")
  place = execution.chunk_placement(index)
  ids = place.split(class_ids)
  if options.init == "real":
    begin = place.split(np.asarray(initial_images[class_ids], np.float32))
  else:
    begin = place.jit(init_images, c, static_argnums=(2, 3))(init_key, ids, ipc,
                                                             tuple(image_shape))
  state = place.jit(init_state, c, static_argnums=(1,))(begin, options)
  host = jax.tree.map(np.asarray, targets)
  chunk_targets = RecoverTargets(
      features=place.split(host.features[class_ids]),
      bn_mean=place.split(tuple(m[class_ids] for m in host.bn_mean)),
      bn_var=place.split(tuple(v[class_ids] for v in host.bn_var)),
      global_mean=place.whole(host.global_mean), global_var=place.whole(host.global_var),
      running_mean=place.whole(host.running_mean), running_var=place.whole(host.running_var))
  return state, chunk_targets, ids


def choose_class_chunk(
    model: nn.Module,
    variables: dict[str, Any],
    targets: RecoverTargets,
    *,
    ipc: int,
    image_shape: Sequence[int],
    mean: Any,
    std: Any,
    options: RecoverOptions,
    memory_budget_bytes: int,
    execution: Execution | None = None,
    max_chunk: int | None = None,
    step: Callable[..., Any] | None = None,
) -> int:
  """The largest chunk of classes whose recover step fits ``memory_budget_bytes`` per device.

  The step is compiled ahead of time on abstract inputs (no data, no device memory) and sized by
  XLA's memory analysis (:func:`wmdd_jax.distributed.peak_bytes`): at one and two classes per
  device, from which a straight-line fit predicts the largest chunk that fits; that prediction
  is compiled and checked, and shrunk until it fits. Typically three compilations.

  Args:
    model, variables: the teacher.
    targets: RecoverTargets of all classes (for the shapes).
    ipc: k.
    image_shape: (H, W, ch).
    mean, std: normalisation constants.
    options: RecoverOptions.
    memory_budget_bytes: bytes per device the step may use (leave room for the framework).
    execution: how the chunk runs on devices (default: one device).
    max_chunk: upper bound (default: all classes); rounded up to a multiple of the device count.
    step: the jitted step to measure, ``make_update_fn(...).step`` for the same options and
      execution; measuring it fills its compilation cache, so the chosen size is not compiled twice.
      Default: the one :func:`recover` uses for these arguments.

  Returns:
    The chunk size, a multiple of ``execution.class_multiple``.

  Raises:
    ConfigError: even one class per device does not fit, or the backend reports no memory
      analysis.
  """
  execution = execution or Execution()
  devices = execution.class_multiple
  num_classes = int(targets.bn_mean[0].shape[0]) if targets.bn_mean else int(
      targets.features.shape[0])
  limit = max(1, -(-(max_chunk or num_classes) // devices)) * devices
  step = step or _shared_update_fn(model, options, mean, std, execution).step
  measured: dict[int, int] = {}

  def measure(c: int) -> int:
    if c not in measured:
      peak = recover_step_bytes(model, variables, targets, c, ipc=ipc, image_shape=image_shape,
                                mean=mean, std=std, options=options, execution=execution,
                                step=step)
      if peak is None:
        raise ConfigError(f"the {jax.default_backend()} backend reports no memory analysis, so "
                          "memory_budget_bytes cannot size the chunk; set recover class_chunk "
                          "instead.")
      measured[c] = peak
    return measured[c]

  smallest = measure(devices)
  if smallest > memory_budget_bytes:
    raise ConfigError(
        f"one class per device needs {smallest / 2**20:.0f} MiB for the recover step, over the "
        f"memory budget of {memory_budget_bytes / 2**20:.0f} MiB per device; raise "
        "memory_budget_bytes, lower ipc, or use more devices.")
  if limit == devices:
    return devices
  slope = max(measure(2 * devices) - smallest, 1)  # bytes per extra class per device
  per_device = 1 + (memory_budget_bytes - smallest) // slope
  chunk = int(min(limit, max(devices, per_device * devices)))
  while chunk > devices and measure(chunk) > memory_budget_bytes:
    # Shrink in proportion to the overshoot (at least one class per device).
    shrink = int(chunk * memory_budget_bytes / measure(chunk)) // devices * devices
    chunk = max(devices, min(chunk - devices, shrink))
  return chunk


def lower_recover_step(
    model: nn.Module,
    variables: Any,
    targets: RecoverTargets,
    chunk: int,
    *,
    ipc: int,
    image_shape: Sequence[int],
    mean: Any,
    std: Any,
    options: RecoverOptions,
    execution: Execution | None = None,
    step: Callable[..., Any] | None = None,
) -> Any:
  """One recover step on ``chunk`` classes, lowered ahead of time on abstract inputs.

  Nothing is allocated: the step is lowered on ``jax.ShapeDtypeStruct`` inputs with the shardings
  :func:`recover` uses (``execution.abstract``: on a mesh the class axis split, the rest
  replicated). Compile the result
  for its memory analysis (:func:`recover_step_bytes`).

  Args:
    model: the teacher module.
    variables: its variables, arrays or ``jax.ShapeDtypeStruct`` (only shapes are used).
    targets: RecoverTargets of any number of classes, arrays or ShapeDtypeStructs (shapes only).
    chunk: classes in the chunk (a multiple of ``execution.class_multiple``).
    ipc: k.
    image_shape: (H, W, ch).
    mean, std: normalisation constants.
    options: RecoverOptions.
    execution: how the chunk runs on devices (default: one device).
    step: the jitted step (``make_update_fn(...).step``); default: the one :func:`recover` uses
      for these arguments.

  Returns:
    A ``jax.stages.Lowered``.
  """
  execution = execution or Execution()
  step = step or _shared_update_fn(model, options, mean, std, execution).step
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  images = f32(chunk, ipc, *image_shape)
  state = jax.eval_shape(lambda x: init_state(x, options), images)
  per_class = lambda xs: tuple(f32(chunk, *np.shape(x)[1:]) for x in xs)
  whole = lambda xs: tuple(f32(*np.shape(x)) for x in xs)
  chunk_targets = execution.abstract(RecoverTargets(
      features=f32(chunk, *np.shape(targets.features)[1:]),
      bn_mean=per_class(targets.bn_mean), bn_var=per_class(targets.bn_var),
      global_mean=whole(targets.global_mean), global_var=whole(targets.global_var),
      running_mean=whole(targets.running_mean), running_var=whole(targets.running_var)),
      size=chunk)
  ids = execution.abstract(jax.ShapeDtypeStruct((chunk,), jnp.int32), size=chunk)
  key = execution.abstract(jax.ShapeDtypeStruct((), jax.random.key(0).dtype))
  return step.lower(execution.abstract(state, size=chunk), execution.abstract(variables),
                    chunk_targets, ids, key)


def recover_step_bytes(model: nn.Module, variables: Any, targets: RecoverTargets, chunk: int,
                       **kwargs: Any) -> int | None:
  """Peak bytes per device of one recover step on ``chunk`` classes (compiled ahead of time).

  Takes the arguments of :func:`lower_recover_step`; returns None when the backend reports no
  memory analysis.
  """
  compiled = lower_recover_step(model, variables, targets, chunk, **kwargs).compile()
  return peak_bytes(compiled)
