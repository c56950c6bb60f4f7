"""The distillation methods a run can use (``config.method``), one registry entry each.

A :class:`Method` says what a method changes in the pipeline, and nothing else does:

- ``recover``: the recover switches (:data:`SWITCHES`, fields of
  :class:`wmdd_jax.recover.RecoverOptions`) it sets where the config leaves them unset (None);
  an explicit ``config.recover.<switch>`` always wins;
- ``runs_recover``: whether it synthesises images at all (False: IPC random real images per
  class, no teacher inversion);
- ``student_weights``: which per-image weights the student's KD loss uses, ``"barycenter"`` (the
  barycenter weights, when the run computed barycenters) or ``"uniform"``.

Whether a run needs the barycenters, and the statistics pass, follows from its resolved
:class:`~wmdd_jax.recover.RecoverOptions` (:meth:`Method.needs_barycenters`,
:meth:`Method.needs_statistics`), so ``--config.recover.feature_target=...`` changes it too.

A new method is one call::

    methods.register(methods.Method("wass_gbn", recover=dict(
        feature_target="barycenter", bn_stats="global", layout="class",
        first_bn_multiplier=1.0)))

after which ``--config.method=wass_gbn`` runs it.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from typing import Any

from wmdd_jax.errors import ConfigError
from wmdd_jax.recover import RecoverOptions

# The RecoverOptions fields a method may set. The config schema leaves them unset (ml_collections
# placeholders, wmdd_jax/config.py) so that the method's value applies.
SWITCHES = ("feature_target", "bn_stats", "layout", "first_bn_multiplier", "r_ce")
STUDENT_WEIGHTS = ("barycenter", "uniform")


@dataclasses.dataclass(frozen=True)
class Method:
  """One distillation method (see the module docstring).

  Attributes:
    name: the value of ``config.method``.
    recover: switch -> value (keys from :data:`SWITCHES`), applied where the config leaves the
      switch unset; switches neither sets take RecoverOptions' defaults (``r_ce``: 1 under the
      "official" objective, 0 under "per_class").
    runs_recover: False: the synthetic set is IPC seeded random real images per class.
    student_weights: "barycenter": the student weights each image by its barycenter weight when
      the run computed barycenters (uniform otherwise); "uniform": always uniform.
    description: one line for listings (where the official code runs it, for the paper's).
  """

  name: str
  recover: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  runs_recover: bool = True
  student_weights: str = "barycenter"
  description: str = ""

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name:
      raise ConfigError(f"Method name {self.name!r} must be a non-empty string.")
    unknown = sorted(set(self.recover) - set(SWITCHES))
    if unknown:
      raise ConfigError(
          f"Method {self.name!r} sets {unknown}, which are not method switches; a method may set "
          f"only {SWITCHES} (add a field to wmdd_jax.methods.SWITCHES and leave it unset in "
          "wmdd_jax/config.py to make it one).")
    if self.student_weights not in STUDENT_WEIGHTS:
      raise ConfigError(f"Method {self.name!r}: student_weights={self.student_weights!r} is not "
                        f"one of {STUDENT_WEIGHTS}.")
    if not self.runs_recover and self.recover:
      raise ConfigError(f"Method {self.name!r} runs no recover, so it cannot set recover "
                        f"switches {sorted(self.recover)}; drop them or set runs_recover=True.")
    # Read-only, so a registered method cannot change behind the registry's back.
    object.__setattr__(self, "recover", types.MappingProxyType(dict(self.recover)))

  def recover_options(self, values: Mapping[str, Any]) -> RecoverOptions:
    """RecoverOptions from a config's ``recover`` values (RecoverOptions fields; None = unset):
    this method's switches fill the unset ones, then RecoverOptions' defaults.

    Raises:
      ConfigError: this method runs no recover, or a value fails RecoverOptions' checks.
    """
    if not self.runs_recover:
      raise ConfigError(f"Method {self.name!r} runs no recover, so it has no RecoverOptions.")
    kwargs = {k: v for k, v in values.items() if v is not None}
    for name, value in self.recover.items():
      kwargs.setdefault(name, value)
    return RecoverOptions(**kwargs)

  def needs_barycenters(self, options: RecoverOptions | None) -> bool:
    """Whether the run computes class barycenters (recover pulls features towards them)."""
    return self.runs_recover and options is not None and options.feature_target == "barycenter"

  def needs_statistics(self, options: RecoverOptions | None) -> bool:
    """Whether the run needs the statistics pass (features, per-class or global BN statistics);
    the teacher's running statistics (SRe2L) come from the teacher itself."""
    return self.needs_barycenters(options) or (
        self.runs_recover and options is not None and options.bn_stats in ("class", "global"))

  def uses_barycenter_weights(self, options: RecoverOptions | None) -> bool:
    """Whether the student weights images by their barycenter weights (else uniformly)."""
    return self.student_weights == "barycenter" and self.needs_barycenters(options)


_REGISTRY: dict[str, Method] = {}


def register(method: Method, *, replace: bool = False) -> Method:
  """Adds ``method`` to the registry (``config.method=method.name`` then runs it); returns it.

  Raises:
    ConfigError: a method of that name exists and ``replace`` is False.
  """
  if not isinstance(method, Method):
    raise ConfigError(f"register() takes a wmdd_jax.methods.Method, got {type(method).__name__}.")
  if method.name in _REGISTRY and not replace:
    raise ConfigError(f"A method named {method.name!r} is already registered; pick another name "
                      "or pass replace=True.")
  _REGISTRY[method.name] = method
  return method


def unregister(name: str) -> None:
  """Removes a method (tests; no-op when absent)."""
  _REGISTRY.pop(name, None)


def names() -> tuple[str, ...]:
  """The registered method names, in registration order."""
  return tuple(_REGISTRY)


def get_method(name: str) -> Method:
  """The registered method ``name``.

  Raises:
    ConfigError: no method of that name (the message lists the registered ones).
  """
  try:
    return _REGISTRY[name]
  except (KeyError, TypeError):
    raise ConfigError(f"config.method={name!r} is not one of {names()}; pick one of them or "
                      "register a new one with wmdd_jax.methods.register.") from None


def settings() -> dict[str, dict[str, Any]]:
  """name -> the recover switches it sets (the former ``pipeline.METHOD_SETTINGS``)."""
  return {name: dict(m.recover) for name, m in _REGISTRY.items()}


# The four rows of the paper's Table 3, as the official code (github.com/Liu-Hy/WMDD) runs them,
# and the random-real baseline.
register(Method(
    "wmdd", dict(feature_target="barycenter", bn_stats="class", layout="class",
                 first_bn_multiplier=1.0),
    description="Wass+PCBN: recover/data_synthesis_new.py --wb true --per-class-bn true; r_wb "
                "is r_ce (RecoverOptions' default, 1 under 'official' as run.sh's R_WB=1)"))
register(Method(
    "ce_pcbn", dict(feature_target="none", bn_stats="class", layout="class",
                    first_bn_multiplier=1.0, r_ce=1.0),
    description="CE+PCBN: data_synthesis_new.py --wb false: loss_main = CE (weight 1, r_wb "
                "unused)"))
register(Method(
    "wass_bn", dict(feature_target="barycenter", bn_stats="running", layout="slot",
                    first_bn_multiplier=10.0, r_ce=0.0),
    description="Wass+BN: recover/data_synthesis.py --wb true: ||F - B_j|| over one image of "
                "every class per batch, the teacher's running BN statistics, first-BN "
                "multiplier 10 (its default), no CE"))
register(Method(
    "sre2l", dict(feature_target="none", bn_stats="running", layout="slot",
                  first_bn_multiplier=10.0, r_ce=1.0),
    description="CE+BN = SRe2L: data_synthesis.py --wb false: CE + running BN statistics, one "
                "image of every class per batch, first-BN multiplier 10"))
register(Method("random", runs_recover=False, student_weights="uniform",
                description="IPC seeded random real images per class (no recover)"))

# The rows of the paper's Table 3 (bench/paper_table.py).
TABLE3_METHODS = ("wmdd", "ce_pcbn", "wass_bn", "sre2l")

__all__ = ["STUDENT_WEIGHTS", "SWITCHES", "TABLE3_METHODS", "Method", "get_method", "names",
           "register", "settings", "unregister"]
