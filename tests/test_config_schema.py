"""The config schema (wmdd_jax/config.py), the method registry (wmdd_jax/methods.py) and the
run's files (wmdd_jax/artefacts.py): every stage option is reachable from the command line, a
misspelt field fails with the valid names, a new method is one entry, and every artefact
round-trips in its on-disk format."""

import dataclasses
import json
import os

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from wmdd_jax import ConfigError, artefacts, methods, pipeline
from wmdd_jax import config as config_lib
from wmdd_jax.barycenter import Barycenter, BarycenterOptions
from wmdd_jax.data import open_dataset
from wmdd_jax.distributed.options import ExecutionOptions
from wmdd_jax.evaluate import EvaluateOptions
from wmdd_jax.recover import RecoverOptions
from wmdd_jax.statistics import ClassStatistics, StatisticsOptions
from wmdd_jax.teacher import TeacherOptions

# Config section -> the stage options it holds (the section names are the CLI contract).
OPTION_SECTIONS = {
    "teacher": TeacherOptions,
    "stats": StatisticsOptions,
    "barycenter": BarycenterOptions,
    "recover": RecoverOptions,
    "eval": EvaluateOptions,
    "parallel": ExecutionOptions,
}


def _parse(argv, config=None):
  """``argv`` parsed the way experiments/*.py parse theirs (config_flags, locked config)."""
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_dict(
      "config", config or config_lib.default_config(), flag_values=values, lock_config=True,
      sys_argv=["prog", *argv])
  values(["prog", *argv])
  return holder.value


def _flag_value(value):
  """A command-line spelling of ``value`` and the value config_flags should parse it into."""
  if isinstance(value, tuple):
    value = value or (0.5, 0.25)
    return f"({', '.join(repr(v) for v in value)},)", tuple(value)
  return str(value), value


def _sample(field_type):
  return {int: 3, float: 0.5, str: "some_value", bool: True}[field_type]


# ------------------------------------------------------------------------- (a) every option


def test_every_option_section_is_in_the_schema():
  assert config_lib.SECTIONS == OPTION_SECTIONS
  config = config_lib.default_config()
  for section in (*OPTION_SECTIONS, "dataset"):
    assert section in config, section


@pytest.mark.parametrize("section", sorted(OPTION_SECTIONS))
def test_every_option_field_is_a_config_field(section):
  config = config_lib.default_config()
  derived = config_lib.DERIVED.get(section, {})
  for field in dataclasses.fields(OPTION_SECTIONS[section]):
    if field.name in derived:  # the stage's seed is config.seed
      assert derived[field.name] in config, field.name
      assert field.name not in config[section], field.name
      continue
    assert field.name in config[section], f"--config.{section}.{field.name} does not exist"


@pytest.mark.parametrize("section", sorted(OPTION_SECTIONS))
def test_every_option_field_is_settable_from_the_command_line(section):
  config = config_lib.default_config()
  argv, expected = [], {}
  for field in dataclasses.fields(OPTION_SECTIONS[section]):
    if field.name not in config[section]:
      continue
    value = config[section][field.name]
    if value is None:  # a placeholder: set it to a value of its type
      value = _sample(config[section].get_type(field.name))
    elif isinstance(value, bool):
      value = not value
    text, expected[field.name] = _flag_value(value)
    argv.append(f"--config.{section}.{field.name}={text}")
  parsed = _parse(argv)
  for name, value in expected.items():
    got = parsed[section][name]
    assert got == value and type(got) is type(value), (name, got, value)


def test_defaults_come_from_the_dataclasses():
  """One place per default: the dataclass, except the declared pipeline overrides."""
  config = config_lib.default_config()
  for section, cls in OPTION_SECTIONS.items():
    overrides = config_lib.PIPELINE_DEFAULTS.get(section, {})
    for field in dataclasses.fields(cls):
      if field.name not in config[section]:
        continue
      default = field.default if field.default is not dataclasses.MISSING \
          else field.default_factory()
      value = config[section][field.name]
      if field.name in overrides:
        assert value == overrides[field.name] != default, (section, field.name)
      elif value is not None:
        assert value == default, (section, field.name)
  # The pipeline's defaults build the same options as the dataclasses (but for the overrides
  # and what the method fills).
  assert config_lib.options(config, "stats") == StatisticsOptions()
  assert config_lib.options(config, "barycenter") == BarycenterOptions()
  assert config_lib.options(config, "parallel") == ExecutionOptions()
  assert config_lib.options(config, "eval") == EvaluateOptions(eval_every=25)
  assert config_lib.options(config, "teacher") == TeacherOptions(eval_every=5)
  assert pipeline.recover_options(config) == RecoverOptions()


def test_method_switches_are_placeholders_of_their_type():
  config = config_lib.default_config()
  for name in methods.SWITCHES:
    assert config.recover[name] is None, name
  assert config.recover.get_type("r_ce") is float
  assert config.recover.get_type("first_bn_multiplier") is float
  assert config.recover.get_type("bn_stats") is str
  assert config.teacher.get_type("max_steps_per_epoch") is int


def test_section_options_take_the_seed_from_the_top_level():
  config = config_lib.default_config()
  config.seed = 7
  assert config_lib.options(config, "teacher").seed == 7
  assert config_lib.options(config, "eval", progress=False).seed == 7


def test_complete_fills_an_older_config():
  old = {"method": "sre2l", "ipc": 2, "recover": {"iterations": 5, "crop_scale": [0.5, 1.0]},
         "teacher": {"model_options": {"width": 8}}}
  full = config_lib.complete(old)
  assert full.method == "sre2l" and full.recover.iterations == 5
  assert full.recover.crop_scale == (0.5, 1.0) and full.teacher.model_options.width == 8
  assert full.recover.lr == RecoverOptions.lr and full.eval.eval_every == 25
  with pytest.raises(ConfigError, match="config.recover.iterations"):
    config_lib.complete({"recover": {"iterations": "many"}})


# ------------------------------------------------------------------------- (b) misspelt fields


def test_a_misspelt_field_in_a_config_names_the_valid_fields(tmp_path):
  config = config_lib.default_config()
  config.recover.iteratons = 5  # a config file writing a field the schema does not have
  for check in (lambda: config_lib.options(config, "recover"),
                lambda: config_lib.check_fields(config),
                lambda: pipeline.recover_options(config),
                lambda: pipeline.run(config, str(tmp_path), log=lambda *_: None)):
    with pytest.raises(ConfigError, match="config.recover has no field 'iteratons'") as e:
      check()
    assert "did you mean 'iterations'" in str(e.value)
    for name in ("iterations", "r_bn", "scan", "store", "class_chunk"):
      assert name in str(e.value)
  assert not os.listdir(tmp_path)  # before anything was written


def test_a_misspelt_field_on_the_command_line_names_the_valid_fields():
  with pytest.raises(ConfigError, match=r"config.recover has no field 'iteratons'.*Valid "
                     r"fields: .*iterations"):
    _parse(["--config.recover.iteratons=5"])
  with pytest.raises(ConfigError, match="config has no field 'recovr'.*recover"):
    _parse(["--config.recovr.iterations=5"])
  with pytest.raises(ConfigError, match="config.eval has no field 'cutmix_alfa'"):
    _parse(["--config.eval.cutmix_alfa=0.5"])


def test_a_misspelt_field_of_an_experiment_config_file_fails(tmp_path):
  path = tmp_path / "typo.py"
  path.write_text("from wmdd_jax.config import default_config\n\n\ndef get_config():\n"
                  "  c = default_config()\n  c.teacher.learning_rte = 0.01\n  return c\n")
  with pytest.raises(ConfigError, match="config.teacher has no field 'learning_rte'"):
    config_lib.check_fields(_load_file(path))


def test_a_section_field_the_pipeline_derives_says_where_it_comes_from():
  with pytest.raises(ConfigError, match=r"config.teacher.seed is config.seed"):
    config_lib.options({"teacher": {"seed": 3}}, "teacher")


def test_unknown_reads_keep_mapping_semantics():
  config = config_lib.default_config()
  assert config.recover.get("iteratons", "absent") == "absent"
  assert not hasattr(config.recover, "iteratons")
  with pytest.raises(AttributeError):
    _ = config.recover.iteratons
  with pytest.raises(KeyError):
    _ = config["recovr"]
  copy = config.copy_and_resolve_references()
  with pytest.raises(ConfigError, match="config.eval has no field"):
    _ = copy.eval.temprature


def _load_file(path):
  import importlib.util

  spec = importlib.util.spec_from_file_location("typo_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


# ------------------------------------------------------------------------- (c) the methods


def test_each_method_is_one_registry_entry():
  assert pipeline.METHODS == methods.names()
  assert set(pipeline.TABLE3_METHODS) <= set(pipeline.METHODS) and "random" in pipeline.METHODS
  assert pipeline.METHOD_SETTINGS == methods.settings()
  config = config_lib.default_config()
  for name in methods.names():
    method = methods.get_method(name)
    if not method.runs_recover:
      assert name == "random" and not method.recover and method.student_weights == "uniform"
      assert not method.needs_statistics(None) and not method.needs_barycenters(None)
      continue
    config.method = name
    options = pipeline.recover_options(config)
    for switch, value in method.recover.items():
      assert getattr(options, switch) == value, (name, switch)
    barycentric = options.feature_target == "barycenter"
    assert method.needs_barycenters(options) == barycentric
    assert method.uses_barycenter_weights(options) == barycentric
    assert method.needs_statistics(options) == (barycentric or options.bn_stats == "class")


def test_an_explicit_recover_field_wins_over_the_method():
  config = config_lib.default_config()
  config.method = "sre2l"
  config.recover.bn_stats = "global"
  options = pipeline.recover_options(config)
  assert (options.bn_stats, options.layout) == ("global", "slot")
  assert methods.get_method("sre2l").needs_statistics(options)  # global statistics: from data


def test_method_switches_change_one_method_and_yield_to_an_explicit_recover_field():
  config = config_lib.default_config()
  config.method_switches = {"wmdd": {"r_ce": 10.0}, "sre2l": {"first_bn_multiplier": 3.0}}
  resolved = {}
  for name in ("wmdd", "ce_pcbn", "sre2l", "wass_bn"):
    config.method = name
    resolved[name] = pipeline.recover_options(config)
  assert resolved["wmdd"].r_ce == 10.0 and resolved["wmdd"].bn_stats == "class"
  assert resolved["ce_pcbn"].r_ce == 1.0 and resolved["wass_bn"].r_ce == 0.0  # untouched
  assert (resolved["sre2l"].first_bn_multiplier, resolved["sre2l"].r_ce) == (3.0, 1.0)
  config.method = "wmdd"
  config.recover.r_ce = 3.0  # the section sets it for every method: it wins
  assert pipeline.recover_options(config).r_ce == 3.0
  # From the command line, on a config file that has the entry (config_flags locks the config).
  base = config_lib.default_config()
  base.method_switches = {"wmdd": {"r_ce": 10.0}}
  parsed = _parse(["--config.method_switches.wmdd.r_ce=4.0"], base)
  assert pipeline.recover_options(parsed).r_ce == 4.0
  assert pipeline.recover_options(config_lib.complete(parsed.to_dict())).r_ce == 4.0


def test_a_method_switches_entry_can_name_the_objective():
  config = config_lib.default_config()
  config.method = "wmdd"
  config.method_switches = {"wmdd": {"r_ce": 10.0, "first_bn_multiplier": 2.0},
                            "wmdd:per_class": {"r_ce": 3.0}}
  official = pipeline.recover_options(config)
  config.recover.objective = "per_class"
  per_class = pipeline.recover_options(config)
  assert (official.r_ce, official.first_bn_multiplier) == (10.0, 2.0)
  assert (per_class.r_ce, per_class.first_bn_multiplier) == (3.0, 2.0)  # the method-wide rest


@pytest.mark.parametrize("entry, match", [
    ({"wmdx": {"r_ce": 1.0}}, "method_switches has an entry for 'wmdx'"),
    ({"random": {"r_ce": 1.0}}, "runs no recover"),
    ({"wmdd": {"r_bn": 3.0}}, r"method_switches.wmdd has no field 'r_bn'.*config.recover"),
    ({"wmdd": {"r_ce": -1.0}}, r"method_switches\['wmdd'\]: .*r_ce=-1.0 must be >= 0"),
    ({"sre2l": {"layout": "grid"}}, r"method_switches\['sre2l'\]: .*layout='grid'"),
    ({"wmdd:perclass": {"r_ce": 1.0}}, r"'perclass' is not a recover objective"),
    ({"wmdd:per_class": {"r_ce": -2.0}}, r"method_switches\['wmdd:per_class'\]: .*r_ce=-2.0"),
    ({"wmdd": 3.0}, "must be a dict switch"),
])
def test_a_bad_method_switches_entry_fails_before_any_stage(entry, match, tmp_path):
  config = config_lib.default_config()
  config.method = "wmdd"
  config.method_switches = entry
  with pytest.raises(ConfigError, match=match):  # even when the run's method is another one
    pipeline.run(config, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "teacher").exists()


def test_a_registered_method_is_picked_up():
  toy = methods.Method("toy_gbn", dict(feature_target="barycenter", bn_stats="global",
                                       layout="class", first_bn_multiplier=2.0, r_ce=0.0))
  methods.register(toy)
  try:
    assert "toy_gbn" in pipeline.METHODS and pipeline.METHOD_SETTINGS["toy_gbn"]["r_ce"] == 0.0
    config = config_lib.default_config()
    config.method = "toy_gbn"
    options = pipeline.recover_options(config)
    assert (options.feature_target, options.bn_stats, options.first_bn_multiplier,
            options.r_ce) == ("barycenter", "global", 2.0, 0.0)
    assert toy.needs_statistics(options) and toy.uses_barycenter_weights(options)
    pipeline.validate(config, open_dataset("digits"))  # the pipeline accepts it
    with pytest.raises(ConfigError, match="already registered"):
      methods.register(toy)
  finally:
    methods.unregister("toy_gbn")
  assert "toy_gbn" not in pipeline.METHODS
  with pytest.raises(ConfigError, match=r"config.method='toy_gbn' is not one of"):
    methods.get_method("toy_gbn")


def test_a_method_sets_switches_only():
  with pytest.raises(ConfigError, match="not method switches"):
    methods.Method("bad", dict(iterations=10))
  with pytest.raises(ConfigError, match="student_weights"):
    methods.Method("bad", student_weights="learned")
  with pytest.raises(ConfigError, match="runs no recover"):
    methods.Method("bad", dict(r_ce=1.0), runs_recover=False)


# ------------------------------------------------------------------------- (d) the artefacts


def test_statistics_round_trip(tmp_path):
  files = artefacts.RunFiles(str(tmp_path))
  rng = np.random.default_rng(0)
  layers = [3, 5]
  st = ClassStatistics(
      tuple(rng.normal(size=(4, ch)).astype(np.float32) for ch in layers),
      tuple(rng.random((4, ch)).astype(np.float32) for ch in layers),
      tuple(rng.normal(size=(ch,)).astype(np.float32) for ch in layers),
      tuple(rng.random((ch,)).astype(np.float32) for ch in layers),
      np.array([3, 2, 4, 1]))
  feats = rng.normal(size=(10, 6)).astype(np.float32)
  labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3], np.int32)
  artefacts.save_features(files.features, feats)
  artefacts.save_statistics(files.stats, st, labels)
  # The on-disk format existing workdirs have.
  with np.load(files.stats) as data:
    assert sorted(data.files) == sorted(
        ["num_layers", "counts", "labels"]
        + [f"{n}_{i}" for n in ("mean", "var", "global_mean", "global_var") for i in range(2)])
  loaded, features = artefacts.load_statistics(files)
  for name in ("mean", "var", "global_mean", "global_var"):
    for a, b in zip(getattr(loaded, name), getattr(st, name), strict=True):
      np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(loaded.counts, st.counts)
  np.testing.assert_array_equal(features.features, feats)
  np.testing.assert_array_equal(features.labels, labels)
  assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def test_barycenter_round_trip(tmp_path):
  files = artefacts.RunFiles(str(tmp_path))
  bary = Barycenter(np.arange(24, dtype=np.float32).reshape(2, 3, 4),
                    np.full((2, 3), 1 / 3, np.float32))
  artefacts.save_barycenter(files.barycenter, bary)
  with np.load(files.barycenter) as data:
    assert sorted(data.files) == ["support", "weights"]
  loaded = artefacts.load_barycenter(files.barycenter)
  np.testing.assert_array_equal(loaded.support, bary.support)
  np.testing.assert_array_equal(loaded.weights, bary.weights)


def test_recover_history_keeps_the_steps_a_resumed_run_did_not_see(tmp_path):
  path = artefacts.RunFiles(str(tmp_path)).recover_history
  assert artefacts.load_recover_history(path) is None
  first = {"loss": np.array([4.0, 3.0, np.nan, np.nan]), "bn": np.array([2.0, 1.0, 0.0, 0.0])}
  artefacts.save_recover_history(path, first)
  resumed = {"loss": np.array([np.nan, np.nan, 2.0, 1.0]), "bn": np.array([9.0, 9.0, 0.5, 0.2])}
  merged = artefacts.save_recover_history(path, resumed)
  np.testing.assert_array_equal(merged["loss"], [4.0, 3.0, 2.0, 1.0])
  np.testing.assert_array_equal(merged["bn"], resumed["bn"])  # no NaN: the new record wins
  loaded = artefacts.load_recover_history(path)
  assert sorted(loaded) == ["bn", "loss"]
  np.testing.assert_array_equal(loaded["loss"], merged["loss"])


def test_json_artefacts_round_trip(tmp_path):
  files = artefacts.RunFiles(str(tmp_path))
  assert artefacts.load_eval(files.eval) is None and artefacts.read_timings(files.timings) == {}
  result = {"test_top1": 50.0, "test_top5": 90.0, "best_top1": 55.0, "best_top5": 91.0,
            "student": "convnet", "history": [{"epoch": 1, "top1": 50.0, "top5": 90.0,
                                               "train_loss": np.float32(0.5)}]}
  artefacts.save_eval(files.eval, result)
  loaded = artefacts.load_eval(files.eval)
  assert loaded["history"][0]["train_loss"] == 0.5 and loaded["test_top1"] == 50.0
  artefacts.write_timings(files.timings, {"teacher": 1.5})
  assert artefacts.read_timings(files.timings) == {"teacher": 1.5}
  artefacts.write_metrics(files.metrics, {"test_top1": np.float64(50.0), "ipc": 2})
  with open(files.metrics) as f:
    assert json.load(f) == {"ipc": 2, "test_top1": 50.0}
  artefacts.write_config(files.config, config_lib.default_config())
  with open(files.config) as f:
    assert json.load(f)["recover"]["iterations"] == RecoverOptions.iterations
  assert config_lib.complete(json.load(open(files.config))).eval.eval_every == 25
  for name in ("eval.json", "timings.json", "metrics.json", "config.json"):
    assert os.path.exists(os.path.join(str(tmp_path), name)), name


def test_configs_share_no_placeholder():
  """A placeholder set in one config (classes_per_batch) stays out of every other config."""
  a, b = config_lib.default_config(), config_lib.default_config()
  a.barycenter.classes_per_batch = 3
  assert b.barycenter.classes_per_batch is None
  assert config_lib.default_config().barycenter.classes_per_batch is None
