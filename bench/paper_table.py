"""Reproduces the paper's Table 1 (WMDD at IPC 1/10/50/100) or Table 3 (loss ablations, IPC 10).

    python -m bench.paper_table --table 1 --config experiments/configs/imagenette.py
    python -m bench.paper_table --table 3 --config experiments/configs/tiny_imagenet.py \\
        --config.dataset.spec=folder:data/tiny-imagenet-200 --seeds 0
    python -m bench.paper_table --table 1 --config experiments/configs/imagenet.py \\
        --config.teacher.checkpoint=runs/imagenet_teacher --ipcs 1,10
    python -m bench.paper_table --table 1 --config experiments/configs/digits.py \\
        --ipcs 1,2 --seeds 0 --config.debug=True          # a seconds-long smoke run

One teacher per table: ``--config.teacher.checkpoint`` when given (it must exist), else
``<out>/teacher``, trained by the first cell's run (with the first seed) and loaded by all
others. Every cell (method, IPC, seed) is a full :func:`wmdd_jax.pipeline.run` in its own
workdir ``<out>/<method>_ipc<k>_seed<s>``: an interrupted table resumes (finished stages are
loaded) and a finished cell's ``metrics.json`` is read, not recomputed. ``--config.<field>=...``
overrides any config field (ml_collections config_flags); ``--config.debug=True`` shrinks every
stage to seconds (then ``<out>`` and the results carry a ``_debug`` suffix, so a smoke run never
mixes with real cells or results).

Table 1: method ``wmdd`` at each IPC (default 1,10,50,100). Table 3: the four loss ablations
(:data:`wmdd_jax.pipeline.TABLE3_METHODS`: Wass+PCBN = wmdd, CE+PCBN, Wass+BN, CE+BN = SRe2L) at
IPC 10. After every cell it writes ``<results>/paper_table<table>_<config name>.json`` (rows:
method, IPC, seeds, final test top-1 per seed, mean, sample std, the paper's value; per-cell
metrics; the machine) and a markdown table ``.md`` beside it, printed at the end. The paper's
numbers (ResNet-18 student) exist for ImageNette, Tiny-ImageNet and ImageNet-1K; other datasets
show "-".
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

from bench.common import RESULTS_DIR, ROOT, machine, write_result
from wmdd_jax import pipeline
from wmdd_jax.data import open_dataset
from wmdd_jax.errors import ConfigError

RUNS_DIR = os.path.join(ROOT, "bench", "runs", "paper_table")

TABLES = (1, 3)
DEFAULT_IPCS = {1: (1, 10, 50, 100), 3: (10,)}
DEFAULT_SEEDS = (0, 1, 2)
# Until the pipeline names them itself (wmdd_jax.pipeline.TABLE3_METHODS).
_TABLE3_METHODS = ("wmdd", "ce_pcbn", "wass_bn", "sre2l")

PAPER_DATASETS = {"imagenette": "ImageNette", "tiny_imagenet": "Tiny-ImageNet",
                  "imagenet": "ImageNet-1K"}
# arXiv 2311.18531, Table 1: WMDD with a ResNet-18 student, test top-1 (%) per IPC.
PAPER_TABLE1 = {
    "imagenette": {1: 40.2, 10: 64.8, 50: 83.5, 100: 87.1},
    "tiny_imagenet": {1: 7.6, 10: 41.8, 50: 59.4, 100: 61.0},
    "imagenet": {1: 3.2, 10: 38.2, 50: 57.6, 100: 60.7},
}
# arXiv 2311.18531, Table 3: loss ablations at IPC 10, ResNet-18 student, test top-1 (%).
PAPER_TABLE3_IPC = 10
PAPER_TABLE3 = {
    "imagenette": {"wmdd": 64.7, "ce_pcbn": 63.8, "wass_bn": 60.7, "sre2l": 54.2},
    "tiny_imagenet": {"wmdd": 41.8, "ce_pcbn": 41.0, "wass_bn": 36.6, "sre2l": 38.0},
    "imagenet": {"wmdd": 38.1, "ce_pcbn": 37.3, "wass_bn": 26.8, "sre2l": 35.9},
}
METHOD_LABELS = {"wmdd": "Wass+PCBN (WMDD)", "ce_pcbn": "CE+PCBN", "wass_bn": "Wass+BN",
                 "sre2l": "CE+BN (SRe2L)", "random": "random real"}


def table_methods(table: int) -> tuple[str, ...]:
  """The methods (rows) of a table: ``("wmdd",)`` for Table 1, the four ablations for Table 3."""
  _check_table(table)
  if table == 1:
    return ("wmdd",)
  return tuple(getattr(pipeline, "TABLE3_METHODS", _TABLE3_METHODS))


def paper_key(config_name: str, spec: str = "") -> str | None:
  """Which paper dataset a config reproduces (a key of PAPER_DATASETS), or None.

  The config file's name decides (``imagenette``, ``tiny_imagenet``, ``imagenet``); a config of
  another name falls back on its dataset spec (``tfds:imagenette/...``, ``folder:.../tiny-
  imagenet-200``, ``tfds:imagenet2012``).
  """
  if config_name in PAPER_DATASETS:
    return config_name
  name = "".join(ch for ch in spec.lower().partition(":")[2] if ch.isalnum())
  if "imagenette" in name:
    return "imagenette"
  if "tinyimagenet" in name:
    return "tiny_imagenet"
  if "imagenet2012" in name or name.endswith("imagenet"):
    return "imagenet"
  return None


def paper_value(table: int, key: str | None, method: str, ipc: int) -> float | None:
  """The paper's top-1 (%) for one row, or None where the paper has no such cell."""
  if key is None:
    return None
  if table == 1:
    return PAPER_TABLE1[key].get(ipc) if method == "wmdd" else None
  return PAPER_TABLE3[key].get(method) if ipc == PAPER_TABLE3_IPC else None


def _check_table(table: int) -> None:
  if table not in TABLES:
    raise ConfigError(f"--table={table!r} is not one of {TABLES}: pass --table 1 (WMDD per IPC) "
                      "or --table 3 (loss ablations at IPC 10).")


def _positive_ints(values: Sequence[Any], what: str) -> tuple[int, ...]:
  try:
    out = tuple(int(v) for v in values)
  except (TypeError, ValueError):
    raise ConfigError(f"--{what}={','.join(map(str, values))} is not a list of integers; pass "
                      f"e.g. --{what} 1,10.") from None
  if not out or (what == "ipcs" and min(out) < 1) or (what == "seeds" and min(out) < 0):
    raise ConfigError(f"--{what} needs at least one value, each >= {int(what == 'ipcs')}; "
                      f"got {values!r}.")
  return tuple(dict.fromkeys(out))  # drop repeats, keep the order


def cell_dir(out: str, method: str, ipc: int, seed: int) -> str:
  """The workdir of one cell."""
  return os.path.join(out, f"{method}_ipc{ipc}_seed{seed}")


def default_out(config_name: str, debug: bool) -> str:
  """``bench/runs/paper_table/<config name>`` (``_debug`` appended for debug runs)."""
  return os.path.join(RUNS_DIR, config_name + ("_debug" if debug else ""))


def results_path(results_dir: str, table: int, config_name: str, debug: bool) -> str:
  """``<results_dir>/paper_table<table>_<config name>[_debug].json``."""
  name = f"paper_table{table}_{config_name}" + ("_debug" if debug else "")
  return os.path.join(results_dir, name + ".json")


def _read_metrics(path: str, method: str, ipc: int, seed: int) -> dict[str, Any]:
  with open(path) as f:
    metrics = json.load(f)
  found = (metrics.get("method"), metrics.get("ipc"), metrics.get("seed"))
  if found != (method, ipc, seed):
    raise ConfigError(f"{path} is a run of method/ipc/seed {found}, not {(method, ipc, seed)}; "
                      "the cell's workdir holds another run: pass another --out or remove it.")
  return metrics


def _check_ipcs(config: Any, ipcs: Sequence[int]) -> None:
  """Fails before any compute when a class has fewer train images than the largest IPC."""
  options = config.dataset.get("options") or {}
  options = options.to_dict() if hasattr(options, "to_dict") else dict(options)
  dataset = open_dataset(config.dataset.spec, **options)
  split = config.dataset.get("train_split", "train")
  counts = dataset.class_counts(split)
  smallest = min(range(len(counts)), key=counts.__getitem__)
  if max(ipcs) > counts[smallest]:
    raise ConfigError(
        f"IPC {max(ipcs)} exceeds the train images of class {smallest} "
        f"({dataset.class_names[smallest]}: {counts[smallest]} in split {split!r} of "
        f"{config.dataset.spec}); pass --ipcs with values <= {counts[smallest]}.")


def summarize(table: int, key: str | None, methods: Sequence[str], ipcs: Sequence[int],
              seeds: Sequence[int], cells: dict[tuple[str, int, int], dict[str, Any]]
              ) -> list[dict[str, Any]]:
  """One row per (method, IPC): the finished seeds' final top-1, mean, sample std, paper value."""
  rows = []
  for ipc in ipcs:
    for method in methods:
      done = [s for s in seeds if (method, ipc, s) in cells]
      top1 = [float(cells[(method, ipc, s)]["test_top1"]) for s in done]
      rows.append({
          "method": method, "label": METHOD_LABELS.get(method, method), "ipc": ipc,
          "seeds": done, "top1": top1,
          "best_top1": [float(cells[(method, ipc, s)]["best_top1"]) for s in done],
          "mean": statistics.mean(top1) if top1 else None,
          "std": statistics.stdev(top1) if len(top1) > 1 else None,
          "paper": paper_value(table, key, method, ipc),
          "complete": len(done) == len(seeds),
      })
  return rows


def _percent(value: float | None) -> str:
  return "-" if value is None else f"{value:.1f}"


def markdown(result: dict[str, Any]) -> str:
  """The table as markdown: ours (mean +- std over seeds) beside the paper's numbers."""
  dataset = result["paper_dataset"] or result["dataset"]
  title = (f"Table {result['table']} ({dataset}, config {result['config']}"
           + (", DEBUG run: not meaningful" if result["debug"] else "") + ")")
  lines = [f"{title}: student {result['student']} final test top-1 (%), mean +- sample std "
           "over seeds", "",
           "| method | IPC | ours | seeds | paper |", "|---|---:|---:|---:|---:|"]
  for row in result["rows"]:
    if row["mean"] is None:
      ours = "-"
    elif row["std"] is None:
      ours = f"{row['mean']:.2f}"
    else:
      ours = f"{row['mean']:.2f} +- {row['std']:.2f}"
    seeds = f"{len(row['seeds'])}" + ("" if row["complete"] else f" of {result['num_seeds']}")
    lines.append(f"| {row['label']} | {row['ipc']} | {ours} | {seeds} | "
                 f"{_percent(row['paper'])} |")
  m = result["machine"]
  lines += ["", f"Teacher: {result['teacher']} (test top-1 {_percent(result['teacher_top1'])}%)."
            f" Measured on {m['device_count']} x {m['device_kind']} ({m['backend']}), "
            f"{result['total_wall_s']:.0f} s of cell runs this session."]
  return "\n".join(lines) + "\n"


def run_table(config: Any, *, table: int, config_name: str, ipcs: Sequence[int] | None = None,
              seeds: Sequence[int] = DEFAULT_SEEDS, out: str | None = None,
              results_dir: str = RESULTS_DIR, command: str = "", tag: str = "",
              log: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs (or reads) every cell of a table and writes its JSON and markdown results.

  Args:
    config: the experiment config (``experiments/configs/<name>.py``, with any overrides).
    table: 1 or 3.
    config_name: the config file's name without ``.py`` (names the results and picks the paper's
      dataset).
    ipcs: IPCs (default 1,10,50,100 for Table 1, 10 for Table 3).
    seeds: seeds, one cell each (and the first one's run trains the teacher when needed).
    out: the directory of the cells' workdirs and the teacher (default :func:`default_out`).
    results_dir: where ``paper_table<table>_<config name>[_debug].json`` and ``.md`` go.
    command: the command line, recorded in the JSON.
    tag: appended to the config name in the default ``out`` and the results' file names, so
      variants of one table (e.g. ``--config.recover.objective=per_class``) keep apart.
    log: progress printer.

  Returns:
    The result written to the JSON (``rows``, ``cells``, ``markdown``, ...).

  Raises:
    ConfigError: a bad table, IPC or seed list, a method this pipeline lacks, an IPC above a
      class's train count, a missing ``teacher.checkpoint``, or a workdir holding another run;
      all before any compute.
  """
  _check_table(table)
  methods = table_methods(table)
  missing = [m for m in methods if m not in pipeline.METHODS]
  if missing:
    raise ConfigError(f"Table {table} needs method(s) {missing}, which this pipeline does not "
                      f"implement (pipeline.METHODS = {pipeline.METHODS}); update wmdd_jax or "
                      "run --table 1.")
  ipcs = _positive_ints(DEFAULT_IPCS[table] if ipcs is None else ipcs, "ipcs")
  seeds = _positive_ints(seeds, "seeds")
  debug = bool(config.get("debug", False))
  run_name = f"{config_name}_{tag}" if tag else config_name
  out = os.path.abspath(out or default_out(run_name, debug))
  json_path = results_path(results_dir, table, run_name, debug)
  user_teacher = config.teacher.get("checkpoint") or ""
  if user_teacher and not os.path.exists(user_teacher):
    raise ConfigError(f"config.teacher.checkpoint={user_teacher!r} does not exist; pass an "
                      "existing teacher (e.g. from experiments/import_teacher.py) or leave it "
                      f"empty to train one in {os.path.join(out, 'teacher')}.")
  teacher = os.path.abspath(user_teacher) if user_teacher else os.path.join(out, "teacher")
  _check_ipcs(config, ipcs)
  plan = [(m, k, s) for s in seeds for k in ipcs for m in methods]
  cells: dict[tuple[str, int, int], dict[str, Any]] = {}
  for m, k, s in plan:  # every finished cell is checked before anything runs
    path = os.path.join(cell_dir(out, m, k, s), "metrics.json")
    if os.path.exists(path):
      cells[(m, k, s)] = _read_metrics(path, m, k, s)
  key = paper_key(config_name, config.dataset.spec)
  student = config.eval.get("model") or config.teacher.model
  log(f"Table {table} on {config_name} ({config.dataset.spec}): {len(plan)} cells "
      f"({len(cells)} finished), workdirs under {out}")
  if not os.path.exists(teacher):
    log(f"teacher: none at {teacher}; the first cell trains it (seed {plan[0][2]})")
  start = time.perf_counter()
  result: dict[str, Any] = {}
  for i, (m, k, s) in enumerate(plan, 1):
    tag = f"[{i}/{len(plan)}] {m} IPC {k} seed {s}"
    workdir = cell_dir(out, m, k, s)
    if (m, k, s) in cells:
      log(f"{tag}: finished, read {os.path.join(workdir, 'metrics.json')}")
    else:
      log(f"{tag}: running in {workdir}")
      cfg = config.copy_and_resolve_references()
      cfg.method, cfg.ipc, cfg.seed = m, k, s
      cfg.teacher.checkpoint = teacher
      t0 = time.perf_counter()
      metrics = pipeline.run(cfg, workdir, log=lambda msg: log(f"    {msg}"))
      metrics["wall_s"] = round(time.perf_counter() - t0, 3)
      cells[(m, k, s)] = metrics
      log(f"{tag}: test top-1 {metrics['test_top1']:.2f}% (best {metrics['best_top1']:.2f}%), "
          f"{metrics['wall_s']:.0f} s")
    result = _result(table, config, config_name, key, methods, ipcs, seeds, cells, out,
                     teacher, student, debug, command, time.perf_counter() - start)
    if jax.process_index() == 0:
      write_result(json_path, result)
      with open(json_path[: -len(".json")] + ".md", "w") as f:
        f.write(result["markdown"])
  log(result["markdown"])
  return result


def _result(table, config, config_name, key, methods, ipcs, seeds, cells, out, teacher, student,
            debug, command, wall_s):
  teacher_top1 = next((c.get("teacher_top1") for c in cells.values()
                       if c.get("teacher_top1") is not None), None)
  result = {
      "benchmark": f"paper_table{table}", "table": table, "config": config_name,
      "dataset": config.dataset.spec, "paper_dataset": PAPER_DATASETS.get(key),
      "debug": debug, "student": student, "teacher": teacher, "teacher_top1": teacher_top1,
      "methods": list(methods), "ipcs": list(ipcs), "seeds": list(seeds),
      "num_seeds": len(seeds), "metric": "final-epoch test top-1 (%) of metrics.json",
      "rows": summarize(table, key, methods, ipcs, seeds, cells),
      "cells": [{"method": m, "ipc": k, "seed": s, "workdir": cell_dir(out, m, k, s),
                 **{f: cells[(m, k, s)].get(f) for f in (
                     "test_top1", "test_top5", "best_top1", "best_top5", "teacher_top1",
                     "seconds", "wall_s", "backend", "devices")}}
                for (m, k, s) in sorted(cells, key=lambda c: (c[1], methods.index(c[0]), c[2]))],
      "script": "bench/paper_table.py", "command": command,
      "config_values": json.loads(config.to_json_best_effort()),
      "total_wall_s": round(wall_s, 3), "machine": machine(),
  }
  result["markdown"] = markdown(result)
  return result


def main() -> None:  # pragma: no cover - the CLI; tests run it as a subprocess
  """Parses the flags (absl + ml_collections config_flags) and runs :func:`run_table`."""
  from absl import app, flags, logging  # noqa: PLC0415 - flags are defined by the CLI only
  from ml_collections import config_flags  # noqa: PLC0415

  config = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                           lock_config=True)
  table = flags.DEFINE_enum("table", None, ["1", "3"],
                            "Which table: 1 (WMDD per IPC) or 3 (loss ablations at IPC 10).")
  ipcs = flags.DEFINE_list("ipcs", None, "IPCs (default: 1,10,50,100 for table 1; 10 for 3).")
  seeds = flags.DEFINE_list("seeds", [str(s) for s in DEFAULT_SEEDS], "Seeds, one cell each.")
  out = flags.DEFINE_string("out", None, "Directory of the teacher and the cells' workdirs "
                            "(default bench/runs/paper_table/<config name>[_debug]).")
  tag = flags.DEFINE_string("tag", "", "Suffix of the runs folder and results name (variants).")
  results = flags.DEFINE_string("results", RESULTS_DIR,
                                "Directory of the JSON and markdown results.")
  flags.mark_flags_as_required(["config", "table"])

  def run(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments {argv[1:]}; see --help.")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
    filename = config_flags.get_config_filename(flags.FLAGS["config"])
    run_table(config.value, table=int(table.value),
              config_name=os.path.splitext(os.path.basename(filename))[0], ipcs=ipcs.value,
              seeds=seeds.value, out=out.value, results_dir=results.value, tag=tag.value,
              command=" ".join(["python -m bench.paper_table", *sys.argv[1:]]))

  app.run(run)


if __name__ == "__main__":
  main()
