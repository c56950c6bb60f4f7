"""Runs the whole pipeline at every point of a grid of config values and tabulates the results.

    python -m bench.sweep --config experiments/configs/fashion_mnist.py \\
        --sweep ipc=1,10,50 --sweep method=wmdd,sre2l,random
    python -m bench.sweep --config experiments/configs/fashion_mnist.py --val_fraction=0.1 \\
        --config.teacher.epochs=3 --sweep recover.r_bn=1,3,10 \\
        --sweep 'recover.crop_scale=(0.08,1.0),(0.5,1.0)' --sweep ipc=1 --seeds 0,1,2
    python -m bench.sweep --config experiments/configs/digits.py --sweep ipc=1,2 \\
        --config.debug=True                    # a seconds-long smoke run

The config file and its ``--config.<field>=value`` overrides work exactly as in
experiments/distill.py (ml_collections config_flags). Each ``--sweep <field>=v1,v2,...`` is an
axis over one config field, named by its dotted path (``ipc``, ``method``, ``recover.r_bn``);
the points are every combination of the axes, and each point runs once per seed of ``--seeds``
(which sets ``config.seed``). A value is read as its field's type: a string as written, a
boolean from true/false/1/0, anything else as a Python literal (``ast.literal_eval``), so
``1,3,10`` is three numbers and ``(0.08,1.0),(0.5,1.0)`` two tuples (commas inside brackets or
quotes do not split values).

Every (point, seed) is a full :func:`wmdd_jax.pipeline.run` in its own workdir
``<out>/<field>=<value>__...__seed<s>``: an interrupted sweep resumes (finished stages are
loaded) and a finished run's ``metrics.json`` is read, not recomputed. Runs share one teacher:
``config.teacher.checkpoint`` when given, else ``<out>/teacher``, trained by the first run that
needs it (with that run's seed); an axis over ``teacher.*``, ``dataset.*`` or ``parallel.*``
gives each distinct teacher setting its own ``<out>/teacher_<hash>``. ``--val_fraction=f`` holds
out a stratified, seeded fraction f of the train split and reports accuracy on it instead of the
test split: tune there, never on test. Runs with one teacher, the same data and ``stats.*``
compute the statistics pass once and read it from then on (checked by their fingerprints like
their own results; ``--noshare_statistics`` turns this off).

After every run it writes one JSON (``--results``, default ``<out>/sweep.json``: the axes, every
run's metrics, each point's mean and sample std over seeds, the script, command and machine) and
a markdown table beside it (``.md``). To keep a sweep, pass ``--results
bench/results/<name>.json`` and re-render docs/benchmarks.md (``python -m bench.render_docs``).
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import json
import os
import re
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from bench.common import ROOT, command_line, machine, peak_rss_mib, write_result
from wmdd_jax import fingerprints, pipeline
from wmdd_jax.errors import ConfigError

RUNS_DIR = os.path.join(ROOT, "bench", "runs", "sweep")
# Config sections whose values change the teacher (a teacher is shared only within one setting).
TEACHER_SECTIONS = ("teacher", "dataset", "parallel")


def with_validation_split(config: Any, val_fraction: float) -> Any:
  """A copy of ``config`` that holds out a stratified ``val_fraction`` of the train split and
  scores on it (``test_split="val"``); an unchanged copy when ``val_fraction`` is 0.

  Raises:
    ConfigError: ``val_fraction`` outside [0, 1).
  """
  base = config.copy_and_resolve_references()
  if val_fraction:
    if not 0.0 < val_fraction < 1.0:
      raise ConfigError(f"--val_fraction={val_fraction} must be in (0, 1), e.g. 0.1.")
    with base.unlocked():  # dataset.options may not have the key yet
      base.dataset.options.val_fraction = float(val_fraction)
      base.dataset.test_split = "val"
  return base


def split_values(text: str) -> list[str]:
  """Splits ``"1,(2,3),'a,b'"`` at the commas outside brackets and quotes."""
  items, current, depth, quote = [], [], 0, ""
  for ch in text:
    if quote:
      quote = "" if ch == quote else quote
    elif ch in "\"'":
      quote = ch
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == "," and depth == 0:
      items.append("".join(current).strip())
      current = []
      continue
    current.append(ch)
  items.append("".join(current).strip())
  if depth or quote or not all(items):
    raise ConfigError(f"cannot split {text!r} into values: unbalanced brackets or quotes, or an "
                      "empty value; write e.g. 1,3,10 or '(0.08,1.0),(0.5,1.0)'.")
  return items


def _section(config: Any, field: str) -> tuple[Any, str]:
  """The ConfigDict holding ``field`` (a dotted path) and the field's last name."""
  *parents, name = field.split(".")
  node = config
  for i, part in enumerate(parents):
    if part not in node or not hasattr(node[part], "get_type"):
      raise ConfigError(f"--sweep {field}: the config has no section "
                        f"{'.'.join(parents[:i + 1])!r}.")
    node = node[part]
  if name not in node:
    raise ConfigError(f"--sweep {field}: the config has no field {field!r}; fields there: "
                      f"{', '.join(sorted(node.keys()))}.")
  return node, name


def parse_value(config: Any, field: str, text: str) -> Any:
  """``text`` read as the type of ``config``'s ``field`` (no ``eval``)."""
  node, name = _section(config, field)
  kind = node.get_type(name)

  def literal():
    try:
      return ast.literal_eval(text)
    except (ValueError, SyntaxError):
      raise ConfigError(f"--sweep {field}: {text!r} is not a {kind.__name__} literal.") from None

  if kind is bool:
    lowered = text.strip().lower()
    if lowered not in ("true", "false", "1", "0"):
      raise ConfigError(f"--sweep {field}: {text!r} is not a boolean; write true or false.")
    return lowered in ("true", "1")
  if kind is str:
    quoted = len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'"
    return ast.literal_eval(text) if quoted else text
  if kind is int:
    value = literal()
    if isinstance(value, bool) or not isinstance(value, int):
      raise ConfigError(f"--sweep {field}: {text!r} is not an integer.")
    return value
  if kind is float:
    value = literal()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"--sweep {field}: {text!r} is not a number.")
    return float(value)
  if kind in (tuple, list):
    value = literal()
    if not isinstance(value, (tuple, list)):
      raise ConfigError(f"--sweep {field}: {text!r} is not a {kind.__name__}, e.g. (0.5,1.0).")
    return kind(value)
  try:  # dicts, and fields whose type the config does not fix
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_axes(config: Any, specs: Sequence[str]) -> dict[str, list[tuple[str, Any]]]:
  """``["recover.r_bn=1,3"]`` -> ``{"recover.r_bn": [("1", 1.0), ("3", 3.0)]}`` (text, value)."""
  axes: dict[str, list[tuple[str, Any]]] = {}
  for spec in specs:
    field, sep, values = spec.partition("=")
    field = field.strip()
    if not sep or not field or not values.strip():
      raise ConfigError(f"--sweep {spec!r} is not <field>=<v1>,<v2>,...; e.g. "
                        "--sweep recover.r_bn=1,3,10.")
    if field == "seed":
      raise ConfigError("--sweep seed=...: pass the seeds with --seeds instead.")
    if field in axes:
      raise ConfigError(f"--sweep {field} is given twice; list all its values in one flag.")
    texts = split_values(values)
    axes[field] = [(t, parse_value(config, field, t)) for t in dict.fromkeys(texts)]
  return axes


def _set(config: Any, field: str, value: Any) -> None:
  node, name = _section(config, field)
  node[name] = value


def _jsonable(value: Any) -> Any:
  return json.loads(json.dumps(value, default=lambda v: list(v) if isinstance(v, tuple) else
                               v.to_dict() if hasattr(v, "to_dict") else str(v)))


def run_dir(out: str, point: dict[str, str], seed: int) -> str:
  """``<out>/<field>=<value>__...__seed<s>`` (characters other than ``[A-Za-z0-9._=+-]`` -> _)."""
  parts = [f"{field}={text}" for field, text in point.items()] + [f"seed{seed}"]
  return os.path.join(out, re.sub(r"[^A-Za-z0-9._=+-]", "_", "__".join(parts)))


def _teacher_key(config: Any) -> str:
  sections = {s: config.get(s) for s in TEACHER_SECTIONS}
  sections["teacher"] = {k: v for k, v in sections["teacher"].items() if k != "checkpoint"}
  sections["debug"] = bool(config.get("debug", False))
  return hashlib.sha1(json.dumps(_jsonable(sections), sort_keys=True).encode()).hexdigest()[:8]


def _statistics_key(config: Any) -> str:
  """Runs with equal keys compute the same statistics pass: one teacher (its settings or
  checkpoint), the same data and ``stats.*``."""
  sections = {s: config.get(s) for s in ("teacher", "dataset", "stats")}
  sections["debug"] = bool(config.get("debug", False))
  return hashlib.sha1(json.dumps(_jsonable(sections), sort_keys=True).encode()).hexdigest()[:8]


def _fmt(value: float | None, digits: int = 2) -> str:
  return "-" if value is None else f"{value:.{digits}f}"


def summarize(axes: dict[str, list[tuple[str, Any]]], seeds: Sequence[int],
              runs: dict[tuple[tuple[str, ...], int], dict[str, Any]]) -> list[dict[str, Any]]:
  """One row per point: its axis values, the finished seeds' final top-1, mean and sample std."""
  rows = []
  for combo in itertools.product(*axes.values()):
    texts = tuple(text for text, _ in combo)
    done = [s for s in seeds if (texts, s) in runs]
    top1 = [float(runs[(texts, s)]["test_top1"]) for s in done]
    pick = lambda name, done=done, texts=texts: [
        runs[(texts, s)].get(name) for s in done if runs[(texts, s)].get(name) is not None]
    teacher = pick("teacher_top1")
    rows.append({
        **{field: value for field, (_, value) in zip(axes, combo)},
        "seeds": done, "top1": top1,
        "mean": statistics.mean(top1) if top1 else None,
        "std": statistics.stdev(top1) if len(top1) > 1 else None,
        "best_top1_mean": statistics.mean(pick("best_top1")) if pick("best_top1") else None,
        "teacher_top1": teacher[0] if teacher else None,
        "wall_s_mean": statistics.mean(pick("wall_s")) if pick("wall_s") else None,
        "complete": len(done) == len(seeds),
    })
  return rows


def markdown(result: dict[str, Any]) -> str:
  """The summary as a markdown table: one line per point."""
  axes = list(result["axes"])
  title = (f"Sweep of config {result['config']} ({result['dataset']}, split "
           f"{result['split']}{', DEBUG run: not meaningful' if result['debug'] else ''})")
  lines = [f"{title}: student final {result['split']} top-1 (%), mean +- sample std over seeds",
           "", "| " + " | ".join(axes + ["top-1", "seeds", "best top-1", "teacher top-1",
                                         "wall s / run"]) + " |",
           "|" + "---|" * len(axes) + "---:|---:|---:|---:|---:|"]
  for row in result["summary"]:
    ours = "-" if row["mean"] is None else _fmt(row["mean"]) + (
        "" if row["std"] is None else f" +- {_fmt(row['std'])}")
    seeds = f"{len(row['seeds'])}" + ("" if row["complete"] else f" of {len(result['seeds'])}")
    values = [json.dumps(row[a]) if not isinstance(row[a], str) else row[a] for a in axes]
    lines.append("| " + " | ".join(values + [
        ours, seeds, _fmt(row["best_top1_mean"]), _fmt(row["teacher_top1"]),
        _fmt(row["wall_s_mean"], 0)]) + " |")
  lines += ["", f"{result['total_wall_s']:.0f} s of runs this session on "
            f"{result['machine']['device_count']} x {result['machine']['device_kind']} "
            f"({result['machine']['backend']})."]
  return "\n".join(lines) + "\n"


def run_sweep(config: Any, *, config_name: str, sweeps: Sequence[str] = (),
              seeds: Sequence[int] = (0,), out: str | None = None, results: str | None = None,
              val_fraction: float = 0.0, tag: str = "", share_statistics: bool = True,
              command: str = "", log: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs (or reads) every point of the grid and writes the JSON and markdown results.

  Args:
    config: the experiment config (a config file with its overrides).
    config_name: the config file's name without ``.py`` (names the default ``out``).
    sweeps: the axes, ``"<field>=<v1>,<v2>,..."`` each.
    seeds: seeds, one run per point each.
    out: the directory of the runs' workdirs and the shared teacher (default
      ``bench/runs/sweep/<config name>[_<tag>][_debug]``).
    results: the JSON path (default ``<out>/sweep.json``); the markdown goes beside it.
    val_fraction: > 0: hold out this fraction of the train split and evaluate on it.
    tag: suffix of the default ``out``, to keep variants apart.
    share_statistics: a run reads the statistics pass of an earlier run with the same teacher,
      data and ``stats.*`` (:func:`wmdd_jax.fingerprints.share_statistics`, checked like its
      own results) instead of computing it again; False: every run computes its own.
    command: the command line to record (default: this process's).
    log: progress printer.

  Returns:
    The result written to the JSON.

  Raises:
    ConfigError: a bad axis, value or seed, a method the pipeline lacks, or a workdir holding
      another run; all before any compute.
  """
  import jax  # noqa: PLC0415

  base = with_validation_split(config, val_fraction)
  axes = parse_axes(base, sweeps)
  try:
    seeds = tuple(dict.fromkeys(int(s) for s in seeds))
  except (TypeError, ValueError):
    raise ConfigError(f"--seeds={','.join(map(str, seeds))} is not a list of integers.") from None
  if not seeds or min(seeds) < 0:
    raise ConfigError(f"--seeds needs at least one seed >= 0; got {seeds!r}.")
  user_teacher = base.teacher.get("checkpoint") or ""
  changes_teacher = [f for f in axes if f.split(".")[0] in TEACHER_SECTIONS
                     and f != "teacher.checkpoint"]
  if user_teacher and changes_teacher:
    raise ConfigError(f"config.teacher.checkpoint={user_teacher!r} is one teacher, but the axes "
                      f"{changes_teacher} change it; drop the checkpoint or those axes.")
  debug = bool(base.get("debug", False))
  name = "_".join(filter(None, [config_name, tag, "debug" if debug else ""]))
  out = os.path.abspath(out or os.path.join(RUNS_DIR, name))
  results = os.path.abspath(results or os.path.join(out, "sweep.json"))

  # Every run's config, checked before anything runs.
  plan = []
  for combo in itertools.product(*axes.values()):
    cfg = base.copy_and_resolve_references()
    for field, (_, value) in zip(axes, combo):
      _set(cfg, field, value)
    if cfg.method not in pipeline.METHODS:
      raise ConfigError(f"method {cfg.method!r} is not one of {pipeline.METHODS}.")
    if cfg.method != "random":
      pipeline.recover_options(cfg)
    point = {field: text for field, (text, _) in zip(axes, combo)}
    plan += [(point, cfg, s) for s in seeds]
  keys = {_teacher_key(cfg) for _, cfg, _ in plan}
  runs: dict[tuple[tuple[str, ...], int], dict[str, Any]] = {}
  for point, _, s in plan:
    workdir = run_dir(out, point, s)
    marker = os.path.join(workdir, "sweep_point.json")
    if os.path.exists(marker):
      with open(marker) as f:
        found = json.load(f)
      if found != {"axes": point, "seed": s}:
        raise ConfigError(f"{workdir} holds the run {found}, not {point} seed {s}; pass another "
                          "--out or remove it.")
      if os.path.exists(os.path.join(workdir, "metrics.json")):
        with open(os.path.join(workdir, "metrics.json")) as f:
          runs[(tuple(point.values()), s)] = {**json.load(f), "reused": True}
    elif os.path.exists(workdir) and os.listdir(workdir):
      raise ConfigError(f"{workdir} is not empty and holds no sweep_point.json; pass another "
                        "--out or remove it.")

  log(f"sweep of {config_name} ({base.dataset.spec}): {len(plan)} runs ({len(runs)} finished), "
      f"workdirs under {out}")
  primary = jax.process_index() == 0
  stats_sources: dict[str, str] = {}  # statistics key -> a workdir that holds that pass
  start = time.perf_counter()
  result: dict[str, Any] = {}
  for i, (point, cfg, s) in enumerate(plan, 1):
    label = f"[{i}/{len(plan)}] {' '.join(f'{k}={v}' for k, v in point.items())} seed {s}"
    workdir = run_dir(out, point, s)
    texts = tuple(point.values())
    cfg = cfg.copy_and_resolve_references()
    cfg.seed = s
    if not cfg.teacher.get("checkpoint"):
      key = _teacher_key(cfg)
      cfg.teacher.checkpoint = os.path.join(out, "teacher" if len(keys) == 1
                                            else f"teacher_{key}")
    stats_key = _statistics_key(cfg)
    if (texts, s) in runs:
      log(f"{label}: finished, read {os.path.join(workdir, 'metrics.json')}")
    else:
      log(f"{label}: running in {workdir}")
      if primary:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "sweep_point.json"), "w") as f:
          json.dump({"axes": point, "seed": s}, f)
      if share_statistics and stats_key in stats_sources and jax.process_count() == 1:
        fingerprints.share_statistics(stats_sources[stats_key], workdir)
      t0 = time.perf_counter()
      metrics = pipeline.run(cfg, workdir, log=lambda msg: log(f"    {msg}"))
      runs[(texts, s)] = {**metrics, "wall_s": round(time.perf_counter() - t0, 3),
                          "reused": False}
      log(f"{label}: {cfg.dataset.test_split} top-1 {metrics['test_top1']:.2f}%")
    if share_statistics and stats_key not in stats_sources \
        and fingerprints.has_statistics(workdir):
      stats_sources[stats_key] = workdir
    result = {
        "benchmark": "sweep", "config": config_name, "dataset": base.dataset.spec,
        "split": base.dataset.test_split, "debug": debug,
        "axes": {field: [value for _, value in values] for field, values in axes.items()},
        "seeds": list(seeds),
        "metric": f"final-epoch {base.dataset.test_split} top-1 (%) of metrics.json",
        "summary": summarize(axes, seeds, runs),
        "runs": [{"point": p, "seed": sd, "workdir": os.path.relpath(run_dir(out, p, sd), ROOT),
                  **runs[(tuple(p.values()), sd)]}
                 for p, _, sd in plan if (tuple(p.values()), sd) in runs],
        "script": "bench/sweep.py", "command": command or command_line(),
        "config_values": _jsonable(base.to_dict()),
        "total_wall_s": round(time.perf_counter() - start, 3), "peak_rss_mib": peak_rss_mib(),
        "machine": machine(),
    }
    result = _jsonable(result)
    result["markdown"] = markdown(result)
    if primary:
      write_result(results, result)
      with open(os.path.splitext(results)[0] + ".md", "w") as f:
        f.write(result["markdown"])
  log(result.get("markdown", "nothing to run"))
  return result


def main() -> None:  # pragma: no cover - the CLI
  """Parses the flags (absl + ml_collections config_flags) and runs :func:`run_sweep`."""
  from absl import app, flags, logging  # noqa: PLC0415 - flags are defined by the CLI only
  from ml_collections import config_flags  # noqa: PLC0415

  config = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                           lock_config=True)
  sweep = flags.DEFINE_multi_string("sweep", [], "An axis, <field>=<v1>,<v2>,... (repeatable).")
  seeds = flags.DEFINE_list("seeds", ["0"], "Seeds, one run per point each.")
  out = flags.DEFINE_string("out", None, "Directory of the runs' workdirs and the teacher "
                            "(default bench/runs/sweep/<config name>[_<tag>][_debug]).")
  results = flags.DEFINE_string("results", None, "The JSON results file (default "
                                "<out>/sweep.json); the markdown table goes beside it.")
  val_fraction = flags.DEFINE_float("val_fraction", 0.0, "Hold out this fraction of the train "
                                    "split and report accuracy on it instead of test.")
  tag = flags.DEFINE_string("tag", "", "Suffix of the default --out (variants).")
  share = flags.DEFINE_bool("share_statistics", True, "Runs with one teacher, the same data "
                            "and stats.* read one statistics pass.")
  flags.mark_flags_as_required(["config"])

  def run(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments {argv[1:]}; see --help.")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
    filename = config_flags.get_config_filename(flags.FLAGS["config"])
    run_sweep(config.value, config_name=os.path.splitext(os.path.basename(filename))[0],
              sweeps=sweep.value, seeds=seeds.value, out=out.value, results=results.value,
              val_fraction=val_fraction.value, tag=tag.value,
              share_statistics=share.value)

  app.run(run)


if __name__ == "__main__":
  main()
