"""The config schema of a run, generated from the stages' option dataclasses.

``default_config()`` is the ml_collections ConfigDict every experiment config starts from. Each
stage section holds every field of its option dataclass, with the dataclass's default (the one
place that default lives), so every option is settable as ``--config.<section>.<field>``:

    section     options                                         pipeline-level fields
    teacher     wmdd_jax.teacher.TeacherOptions                 model, model_options, checkpoint
    stats       wmdd_jax.statistics.StatisticsOptions
    barycenter  wmdd_jax.barycenter.BarycenterOptions           learn_weights, classes_per_batch
    recover     wmdd_jax.recover.RecoverOptions                 class_chunk, checkpoint_every,
                                                                store, jpeg_quality
    eval        wmdd_jax.evaluate.EvaluateOptions               model, model_options
    parallel    wmdd_jax.distributed.ExecutionOptions

plus the top level (method, ipc, seed, debug, method_switches) and ``dataset`` (spec, options,
train_split, test_split). Pipeline-level fields (options of the run, not of a stage function)
are declared once, below. Exceptions to "the dataclass's default":

- :data:`PIPELINE_DEFAULTS`: where the pipeline has always used another value (each with why);
- :data:`DERIVED`: fields the pipeline sets from the top level (the stages' ``seed``);
- the method switches (:data:`wmdd_jax.methods.SWITCHES`) and fields whose dataclass default is
  None are ml_collections placeholders of the field's type: None until set, so that the
  method's value (or the dataclass's None behaviour) applies.

Fields that do not change any result (:data:`RESULT_NEUTRAL`: progress bars, checkpoint
intervals, evaluation batch sizes, ``parallel.*``, ...) are left out of the stage fingerprints
the pipeline keeps in ``<workdir>/fingerprints.json``, so a finished or interrupted stage can be
resumed with other values; changing any other field a saved stage depends on is refused (see
wmdd_jax/pipeline.py).

The top level and the sections are :class:`ConfigSection`: reading a field that does not exist,
or adding one to a locked config (as ``--config.recover.iteratons=5`` does: config_flags looks
the field up first), raises :class:`UnknownFieldError`, a ConfigError naming the valid fields.
A field added in a config file (``config.recover.iteratons = 5``) is refused by
:func:`check_fields` / :func:`options` / :func:`complete`, which the pipeline runs before any
stage, whatever built the config.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

import ml_collections
from ml_collections import config_dict

from wmdd_jax import methods
from wmdd_jax.barycenter import BarycenterOptions
from wmdd_jax.distributed.options import ExecutionOptions
from wmdd_jax.errors import ConfigError
from wmdd_jax.evaluate import EvaluateOptions
from wmdd_jax.recover import OBJECTIVES, RecoverOptions
from wmdd_jax.statistics import StatisticsOptions
from wmdd_jax.teacher import TeacherOptions

# Config section -> the option dataclass of the stage it configures (section names are the CLI
# contract: --config.<section>.<field>).
SECTIONS: dict[str, type] = {
    "teacher": TeacherOptions,
    "stats": StatisticsOptions,
    "barycenter": BarycenterOptions,
    "recover": RecoverOptions,
    "eval": EvaluateOptions,
    "parallel": ExecutionOptions,
}

# Option fields the pipeline sets itself, from the named top-level field.
DERIVED: dict[str, dict[str, str]] = {
    "teacher": {"seed": "seed"},
    "eval": {"seed": "seed"},
}

# Where the pipeline's default differs from the dataclass's. Kept so that runs (and `make demo`)
# do not change; each is the single source of that default for config-driven runs.
PIPELINE_DEFAULTS: dict[str, dict[str, Any]] = {
    "teacher": {
        # TeacherOptions evaluates every epoch (1); the pipeline has always evaluated the
        # teacher every 5 epochs (and after the last one) to keep short CPU runs short.
        "eval_every": 5,
    },
    "eval": {
        # EvaluateOptions follows train_FKD.py (every 10 epochs); the pipeline has always
        # evaluated the student every 25 epochs (and after the last one): 12 evaluations in a
        # 300-epoch run. The paper presets set 10.
        "eval_every": 25,
    },
}

# Fields that do not change a stage's results, so the stage fingerprints leave them out and a
# saved stage is reused whatever their value (wmdd_jax/pipeline.py). ``parallel`` entirely: mesh,
# units and memory_budget_bytes lay the same computation out on devices (the figures agree to
# float round-off, as across device counts, which no config field records either); they are
# kept in config.json. recover.class_chunk is not here: under coupling objectives it is part of
# the loss, and a resumed recover_ckpt/ is saved per chunk.
RESULT_NEUTRAL: dict[str, tuple[str, ...]] = {
    # Evaluations of the teacher during training (and its checkpoint interval) leave the weights
    # as they are; teacher.checkpoint is where the teacher lives: its weights identify it.
    "teacher": ("eval_every", "eval_batch_size", "max_eval_batches", "checkpoint_every",
                "checkpoint"),
    # Each class uses fold_in(key, c): the batching changes round-off only.
    "barycenter": ("classes_per_batch",),
    # Host syncs, the scan fusion and the checkpoint interval: the same steps.
    "recover": ("steps_per_call", "scan", "checkpoint_every"),
    # The test accuracy is a count: the evaluation batch size does not change it.
    "eval": ("eval_batch_size", "progress"),
    # Compile options reorder float sums like the device count does (round-off only).
    "parallel": ("mesh", "memory_budget_bytes", "units", "compiler_options"),
    # open_dataset options that change how, not what, is read.
    "dataset.options": ("num_workers", "verify", "stats_cache", "load_split_max_bytes",
                        "download", "loader", "worker_count", "read_threads", "prefetch"),
}

# Fields of the run that are not options of a stage function, declared once here. A value that
# is a ``placeholder`` is None until set.
_placeholder = config_dict.placeholder
PIPELINE_FIELDS: dict[str, dict[str, Any]] = {
    "teacher": {
        "model": "convnet_d3",   # a registered model (wmdd_jax.models.list_models)
        "model_options": {},     # its keyword options, e.g. {"stem": "cifar"}
        # Where the teacher is loaded from, or saved to when it is not there yet ("": the
        # workdir's teacher/).
        "checkpoint": "",
    },
    "barycenter": {
        # Learn the support weights too (free_support_barycenter's learn_weights).
        "learn_weights": False,
        # Classes solved per vmapped call (class_barycenters' classes_per_batch); None: its
        # default. With parallel.units the pipeline uses 1; with a mesh all classes at once.
        "classes_per_batch": _placeholder(int),
    },
    "recover": {
        "class_chunk": 0,          # classes per recover chunk (0: RecoverOptions.default_chunk)
        "checkpoint_every": 100,   # steps between resumable Orbax checkpoints
        # "jpeg": the set is stored as the official code hands it to the student (uint8 JPEG,
        # decoded back; wmdd_jax/store.py) and exported to DIR/syn_data; "float": as optimised.
        "store": "float",
        "jpeg_quality": 75,
    },
    "eval": {
        "model": "",               # the student ("" : the teacher's model and model_options)
        "model_options": {},
    },
}

TOP_LEVEL: dict[str, Any] = {
    "method": "wmdd",  # a registered method (wmdd_jax.methods.names())
    "ipc": 10,         # synthetic images per class
    "seed": 0,         # the root key of every stage (pipeline.stage_key)
    "debug": False,    # shrink every stage to seconds (pipeline.debug_config)
    # Per-method values of the method switches (wmdd_jax.methods.SWITCHES) in this config:
    # {"wmdd": {"r_ce": 10.0}} changes wmdd alone; config.recover.<switch> still wins (it sets
    # the switch for every method). See method_switches() below.
    "method_switches": {},
}

DATASET: dict[str, Any] = {
    "spec": "digits",        # wmdd_jax.data.open_dataset spec: tfds:, folder:, idx:, npz:, digits
    "options": {},           # open_dataset options (resize, normalization, ...)
    "train_split": "train",  # the split playing "train" (statistics, recover, teacher)
    "test_split": "test",    # the split playing "test" ("val" for tuning runs)
}


class UnknownFieldError(ConfigError, AttributeError, KeyError):
  """A config field that does not exist (a ConfigError; also an AttributeError and a KeyError,
  what ConfigDict raises for a missing field, so ``hasattr`` and ``.get`` keep working)."""

  def __str__(self) -> str:  # KeyError would quote the message
    return str(self.args[0]) if self.args else ""


def unknown_field_message(path: str, name: Any, valid: Iterable[str]) -> str:
  """The message of :class:`UnknownFieldError`: the field, a close match, every valid name."""
  valid = sorted(str(v) for v in valid)
  close = difflib.get_close_matches(str(name), valid, 1, 0.6)
  hint = f" (did you mean {close[0]!r}?)" if close else ""
  return (f"{path} has no field {name!r}{hint}. Valid fields: {', '.join(valid)}. Fix the name "
          "in the config file or the --config flag (the schema is wmdd_jax/config.py).")


class ConfigSection(ml_collections.ConfigDict):
  """A ConfigDict that names its valid fields when asked for, or given, one it does not have.

  Reading a missing field raises :class:`UnknownFieldError`; so does adding one while locked
  (config_flags locks the config it loads). Unlocked (config files, ``with
  config.unlocked():``) a new field is accepted here and refused by :func:`check_fields`.
  """

  def __init__(self, *args: Any, path: str = "config", **kwargs: Any):
    super().__init__(*args, **kwargs)
    object.__setattr__(self, "_path", path)

  def _unknown(self, name: Any) -> UnknownFieldError:
    path = self.__dict__.get("_path", "config")
    return UnknownFieldError(unknown_field_message(path, name, self._fields))

  def __getitem__(self, key):
    try:
      return super().__getitem__(key)
    except UnknownFieldError:
      raise
    except KeyError:
      head = key.split(".", 1)[0] if isinstance(key, str) else key
      if head in self._fields:
        raise
      raise self._unknown(head) from None

  def __getattr__(self, name):
    if name.startswith("__") or "_fields" not in self.__dict__:
      raise AttributeError(name)
    return self[name]

  def __setitem__(self, key, value):
    if self.is_locked and isinstance(key, str) and key.split(".", 1)[0] not in self._fields:
      raise self._unknown(key.split(".", 1)[0])
    if isinstance(value, dict):
      # Free-form values (model_options, dataset.options) stay plain ConfigDicts: their keys
      # are the model's or the data source's to check.
      value = ml_collections.ConfigDict(value, type_safe=self.is_type_safe)
    super().__setitem__(key, value)

  def __setattr__(self, name, value):
    if self.is_locked and name not in self._fields:
      raise self._unknown(name)
    super().__setattr__(name, value)

  def copy_and_resolve_references(self, visit_map=None):
    copy = super().copy_and_resolve_references(visit_map)
    object.__setattr__(copy, "_path", self.__dict__.get("_path", "config"))
    return copy


def _field_default(cls: type, field: dataclasses.Field) -> Any:
  if field.default is not dataclasses.MISSING:
    return field.default
  if field.default_factory is not dataclasses.MISSING:
    return field.default_factory()
  raise ConfigError(f"{cls.__name__}.{field.name} has no default; give it one (every stage "
                    "option needs a default for the config schema).")


def _value_type(hint: Any) -> type:
  """The type of a placeholder for a field annotated ``hint`` (``int | None`` -> int)."""
  if typing.get_origin(hint) in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    hint = args[0] if len(args) == 1 else object
  return typing.get_origin(hint) or hint


def section_defaults(section: str) -> dict[str, Any]:
  """``section``'s fields and defaults, in the config's form (placeholders for unset fields).

  Args:
    section: a key of :data:`SECTIONS`.

  Returns:
    field -> default: the option dataclass's fields (less :data:`DERIVED`; with
    :data:`PIPELINE_DEFAULTS`), then the section's :data:`PIPELINE_FIELDS`.
  """
  cls = SECTIONS[section]
  hints = typing.get_type_hints(cls)
  switches = methods.SWITCHES if cls is RecoverOptions else ()
  out: dict[str, Any] = {}
  for field in dataclasses.fields(cls):
    if field.name in DERIVED.get(section, {}):
      continue
    default = PIPELINE_DEFAULTS.get(section, {}).get(field.name, _field_default(cls, field))
    if field.name in switches or default is None:
      out[field.name] = _placeholder(_value_type(hints[field.name]))
    else:
      out[field.name] = default
  for name, value in PIPELINE_FIELDS.get(section, {}).items():
    # A fresh placeholder per config: a shared FieldReference would carry a value set in one
    # config into every other config of the process.
    out[name] = (_placeholder(value.get_type()) if isinstance(value, config_dict.FieldReference)
                 else value)
  return out


def _section(fields: Mapping[str, Any], path: str) -> ConfigSection:
  section = ConfigSection(path=path)
  for name, value in fields.items():
    section[name] = value
  return section


def default_config() -> ConfigSection:
  """Every field of a run, with its default.

  Experiment configs start from this and override what their dataset needs::

      config = pipeline.default_config()
      config.dataset.spec = "digits"
  """
  c = _section(TOP_LEVEL, "config")
  c.dataset = _section(DATASET, "config.dataset")
  for name in SECTIONS:
    c[name] = _section(section_defaults(name), f"config.{name}")
  return c


def _plain(value: Any) -> Any:
  if hasattr(value, "to_dict"):
    return value.to_dict()
  if isinstance(value, Mapping):
    return dict(value)
  return value


def _valid_fields(section: str) -> dict[str, Any]:
  return section_defaults(section) if section in SECTIONS else (
      dict(DATASET) if section == "dataset" else None)


def check_fields(config: Any) -> None:
  """Refuses a field the schema does not have, anywhere in ``config`` (any mapping).

  Raises:
    UnknownFieldError: naming the field, a close match and every valid field there.
  """
  top = {**TOP_LEVEL, "dataset": None, **{name: None for name in SECTIONS}}
  for key in _keys(config):
    if key not in top:
      raise UnknownFieldError(unknown_field_message("config", key, top))
    valid = _valid_fields(key)
    if valid is not None:
      _check_section(config[key], f"config.{key}", valid, DERIVED.get(key, {}))


def _keys(mapping: Any) -> list[Any]:
  return list(mapping.keys()) if mapping is not None else []


def _check_section(values: Any, path: str, valid: Mapping[str, Any],
                   derived: Mapping[str, str] | None = None) -> None:
  for key in _keys(values):
    if key not in valid:
      message = unknown_field_message(path, key, valid)
      if derived and key in derived:
        message += f" ({path}.{key} is config.{derived[key]}: set that instead.)"
      raise UnknownFieldError(message)


def section_values(config: Any, section: str) -> dict[str, Any]:
  """``config.<section>`` as a plain dict with every schema field: its values over the defaults.

  Placeholders that are still unset are None; lists become tuples.

  Raises:
    UnknownFieldError: a field the section does not have.
  """
  valid = _valid_fields(section)
  if valid is None:
    raise ConfigError(f"{section!r} is not a config section; sections: "
                      f"{('dataset', *SECTIONS)}.")
  values = _plain(config.get(section) if hasattr(config, "get") else config[section]) or {}
  _check_section(values, f"config.{section}", valid, DERIVED.get(section, {}))
  out = {}
  for name, default in valid.items():
    value = values[name] if name in values else default
    if isinstance(value, config_dict.FieldReference):
      value = value.get()
    out[name] = tuple(value) if isinstance(value, list) else _plain(value)
  return out


def options_kwargs(config: Any, section: str) -> dict[str, Any]:
  """The option-dataclass fields ``config.<section>`` sets (not None; lists as tuples).

  Raises:
    UnknownFieldError: a field the section does not have.
  """
  names = {f.name for f in dataclasses.fields(SECTIONS[section])}
  return {k: v for k, v in section_values(config, section).items()
          if k in names and v is not None}


def options(config: Any, section: str, **overrides: Any) -> Any:
  """``config.<section>`` as its typed options (e.g. ``options(config, "eval", seed=0)``).

  Args:
    config: a run config (ConfigDict or nested mapping).
    section: a key of :data:`SECTIONS`.
    **overrides: fields the caller sets itself (e.g. ``progress``); the :data:`DERIVED` fields
      default to their top-level value (``seed=config.seed``).

  Returns:
    An instance of ``SECTIONS[section]``; fields left None take the dataclass's default.

  Raises:
    UnknownFieldError: a field the section does not have (the message lists the valid ones).
    ConfigError: a value the dataclass's checks refuse.
  """
  for name, top in DERIVED.get(section, {}).items():
    overrides.setdefault(name, config[top] if top in _keys(config) else TOP_LEVEL[top])
  return SECTIONS[section](**{**options_kwargs(config, section), **overrides})


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


# Pipeline-level fields and what each must be: (test, what it must be).
_FIELD_CHECKS: dict[str, tuple[Any, str]] = {
    "seed": (_is_int, "an int"),
    "debug": (lambda v: isinstance(v, bool), "True or False"),
    "dataset.spec": (lambda v: isinstance(v, str) and v, "a data spec string (e.g. 'digits')"),
    "dataset.train_split": (lambda v: isinstance(v, str) and v, "a split name"),
    "dataset.test_split": (lambda v: isinstance(v, str) and v, "a split name"),
    "teacher.model": (lambda v: isinstance(v, str) and v, "a registered model name"),
    "teacher.checkpoint": (lambda v: isinstance(v, str), "a path ('' : <workdir>/teacher)"),
    "barycenter.learn_weights": (lambda v: isinstance(v, bool), "True or False"),
    "barycenter.classes_per_batch": (lambda v: v is None or (_is_int(v) and v >= 1),
                                     "None or an int >= 1"),
    "recover.class_chunk": (lambda v: _is_int(v) and v >= 0, "an int >= 0 (0: the default)"),
    "recover.checkpoint_every": (lambda v: _is_int(v) and v >= 1, "an int >= 1 (steps)"),
    "recover.jpeg_quality": (lambda v: _is_int(v) and 1 <= v <= 100, "an int in [1, 100]"),
    "eval.model": (lambda v: isinstance(v, str), "a registered model name ('' : the teacher's)"),
}


def check_pipeline_fields(config: Any) -> None:
  """Refuses a bad value of a field no option dataclass checks (the pipeline-level fields).

  Raises:
    ConfigError: naming the field, its value and what it must be.
  """
  for path, (test, want) in _FIELD_CHECKS.items():
    section, _, name = path.rpartition(".")
    holder = config[section] if section else config
    if name not in _keys(holder):
      continue
    value = holder[name]
    if isinstance(value, config_dict.FieldReference):
      value = value.get()
    if not test(value):
      raise ConfigError(f"config.{path}={value!r} must be {want}; fix it in the config file or "
                        f"with --config.{path}=...")


def complete(config: Any) -> ConfigSection:
  """``config`` over :func:`default_config`: every field present, an unknown one refused.

  Lets the pipeline read any config (a ConfigDict built without ``default_config``, an older
  config missing newer fields, a nested dict) with attribute access and no defaults of its own.

  Raises:
    UnknownFieldError: a field the schema does not have.
    ConfigError: a value of the wrong type for its field.
  """
  check_fields(config)
  full = default_config()
  for key in _keys(config):
    value = config[key]
    if isinstance(full[key], ConfigSection):
      for name in _keys(value):
        _assign(full[key], name, value[name], f"config.{key}.{name}")
    else:
      _assign(full, key, value, f"config.{key}")
  return full


def _assign(target: ConfigSection, name: str, value: Any, path: str) -> None:
  if isinstance(value, config_dict.FieldReference):
    value = value.get()
  if isinstance(value, list) and isinstance(target[name], tuple):
    value = tuple(value)
  try:
    target[name] = _plain(value) if isinstance(value, ml_collections.ConfigDict) else value
  except TypeError as e:
    raise ConfigError(f"{path}={value!r}: {e}; give a value of the field's type.") from None


__all__ = ["DATASET", "DERIVED", "PIPELINE_DEFAULTS", "PIPELINE_FIELDS", "RESULT_NEUTRAL",
           "SECTIONS", "TOP_LEVEL", "ConfigSection", "UnknownFieldError", "check_fields",
           "check_method_switches", "check_pipeline_fields", "complete", "default_config",
           "method_switches", "options", "options_kwargs", "section_defaults", "section_values",
           "unknown_field_message"]


# ------------------------------------------------------------------ reading a run's config


def plain(value: Any) -> dict[str, Any]:
  """A config sub-dict (or None) as a plain dict."""
  if value is None:
    return {}
  return value.to_dict() if hasattr(value, "to_dict") else dict(value)


def split(config, which: str) -> str:
  """The dataset split playing the role ``which`` ("train"/"test"; "val" for tuning runs)."""
  return config.dataset[f"{which}_split"]


def student(config) -> tuple[str, dict[str, Any]]:
  """The student's model name and options (``eval.model``, else the teacher's)."""
  if config.eval.model:
    return config.eval.model, plain(config.eval.model_options)
  return config.teacher.model, plain(config.teacher.model_options)


def method_switches(config: Any) -> dict[str, dict[str, Any]]:
  """``config.method_switches`` as plain dicts, checked: key -> {switch: value}.

  A key is a method (``"wmdd"``) or a method under one recover objective (``"wmdd:per_class"``,
  as bench/accuracy.py names cells). A config sets a switch for one method this way, e.g. a CE
  weight tuned for WMDD that should not change the sre2l / ce_pcbn / wass_bn baselines run from
  the same config. Precedence for each switch of a run: ``config.recover.<switch>`` (every
  method) > ``method_switches["<method>:<objective>"]`` > ``method_switches["<method>"]`` > the
  method's registry value > RecoverOptions' default.

  Raises:
    ConfigError: not a mapping, an unregistered method or objective, a method that runs no
      recover, or a key that is not a method switch.
  """
  raw = config["method_switches"] if "method_switches" in _keys(config) else {}
  if isinstance(raw, config_dict.FieldReference):
    raw = raw.get()
  if raw is None:
    return {}
  if not isinstance(raw, Mapping) and not hasattr(raw, "to_dict"):
    raise ConfigError(f"config.method_switches={raw!r} must be a dict method -> {{switch: "
                      "value}}, e.g. {'wmdd': {'r_ce': 10.0}}.")
  out: dict[str, dict[str, Any]] = {}
  for key, switches in _plain(raw).items():
    name, _, objective = str(key).partition(":")
    if name not in methods.names():
      raise ConfigError(f"config.method_switches has an entry for {name!r}, which is not a "
                        f"registered method; methods: {methods.names()}.")
    if objective and objective not in OBJECTIVES:
      raise ConfigError(f"config.method_switches[{key!r}]: {objective!r} is not a recover "
                        f"objective; objectives: {OBJECTIVES} (or key the method alone).")
    if not methods.get_method(name).runs_recover:
      raise ConfigError(f"config.method_switches.{name}: method {name!r} runs no recover, so "
                        "it has no switches; remove the entry.")
    switches = _plain(switches) or {}
    if not isinstance(switches, Mapping):
      raise ConfigError(f"config.method_switches.{key}={switches!r} must be a dict switch -> "
                        f"value with switches from {methods.SWITCHES}.")
    for field in switches:
      if field not in methods.SWITCHES:
        raise UnknownFieldError(
            unknown_field_message(f"config.method_switches.{key}", field, methods.SWITCHES)
            + " (Only method switches vary per method; other recover fields apply to every "
            "method: set config.recover.<field>.)")
    out[str(key)] = {k: v for k, v in switches.items() if v is not None}
  return out


def _switches_for(table: Mapping[str, Mapping[str, Any]], method: str,
                  objective: str) -> dict[str, Any]:
  """The entries of :func:`method_switches` that apply to ``method`` under ``objective``."""
  return {**table.get(method, {}), **table.get(f"{method}:{objective}", {})}


def recover_options(config: Any) -> RecoverOptions:
  """RecoverOptions for ``config.method``: ``config.recover``'s set fields, then this config's
  :func:`method_switches` for the method (and its objective), then the method's own switches,
  then the defaults.

  Raises:
    ConfigError: an unknown method or recover field, a bad ``method_switches`` entry, or a value
      RecoverOptions refuses.
  """
  method = methods.get_method(config.method)
  values = options_kwargs(config, "recover")
  objective = values.get("objective", RecoverOptions.objective)
  for name, value in _switches_for(method_switches(config), config.method, objective).items():
    values.setdefault(name, value)
  return method.recover_options(values)


def check_method_switches(config: Any) -> None:
  """Resolves every ``config.method_switches`` entry for its method, so that a bad value is an
  error before any stage runs whichever method the config runs (the bench grids run several).

  Raises:
    ConfigError: as :func:`method_switches`, or a value RecoverOptions refuses for its method.
  """
  values = options_kwargs(config, "recover")
  table = method_switches(config)
  for key in table:
    name, _, objective = key.partition(":")
    objective = objective or values.get("objective", RecoverOptions.objective)
    switches = _switches_for(table, name, objective)
    try:
      methods.get_method(name).recover_options({**switches, **values, "objective": objective})
    except ConfigError as e:
      raise ConfigError(f"config.method_switches[{key!r}]: {e}") from None
