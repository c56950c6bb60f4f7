"""The accuracy grid: methods x objectives x IPCs x seeds on one dataset, one teacher, one JSON.

    python -m bench.accuracy --config experiments/configs/cifar10_dev.py           # the table
    python -m bench.accuracy --config experiments/configs/fashion_mnist.py --workers 6 \\
        --config.teacher.checkpoint=runs/fmnist_teacher           # on a GPU: cells in parallel
    python -m bench.accuracy --config experiments/configs/digits.py --ipcs 1 --seeds 0 \\
        --config.debug=True                                        # a seconds-long smoke run

Cells are ``--methods`` (``method`` or ``method:objective``; default :data:`DEFAULT_METHODS`:
WMDD under both recover objectives, SRe2L, random real images, CE+PCBN, Wass+BN) x ``--ipcs``
(default 1,10,50) x ``--seeds`` (default 0,1,2). Every cell is a full
:func:`wmdd_jax.pipeline.run` with the config (plus ``--config.<field>=...`` overrides) in its own
workdir ``<out>/<method>[_<objective>]_ipc<k>_seed<s>``; a finished cell's ``metrics.json`` is
read, not recomputed, so a killed grid resumes; ``--tabulate_only`` runs nothing and writes the
results of the cells finished so far (a partial grid's table); ``--merge A.json,B.json
--results C.json`` joins grids of one config that ran in parts into one table
(:func:`merge_results`; ``--merge_allow a.b,c.d`` names config values that may differ between
the parts, recorded in ``merge_differences``). One teacher serves every cell:
``config.teacher.checkpoint`` when given, else ``<out>/teacher``, trained first (seed of the
first ``--seeds`` value).

The statistics pass (per-class BN moments and features of the train split; it depends on the
teacher, the data and ``stats.*`` only) runs once, in the first cell that needs it, and the other
cells read it (hard links, checked by their fingerprints like their own results; each row's
``statistics`` says "computed" or "shared"); ``--noshare_statistics`` computes it in every cell.

``--workers N`` runs N cells at once, each in its own process (spawned, so no JAX state is
shared). On one accelerator this fills it with small 32 px runs that would each leave it mostly
idle; the script then caps each process's share of device memory
(``XLA_PYTHON_CLIENT_MEM_FRACTION`` = 0.9 / N, no preallocation). On a 2-core CPU keep 1.

After every cell it writes ``--results`` (default ``bench/results/accuracy_<config name>.json``;
``_debug`` added for debug runs): ``{"rows": [{"method", "objective", "ipc", "seed",
"test_top1", ...}, ...], "summary": [mean +- sample std per (method, objective, ipc)], ...}``
plus the config values, command and machine, and a markdown table beside it (``.md``).
``objective`` is the recover objective ("official" | "per_class") of methods that run recover
and None for random real images. ``test_top1`` is on ``config.dataset.test_split``: the real test
split for final tables; ``--val_fraction=f`` (as in bench/sweep.py) holds out a stratified part
of the train split and evaluates there instead, for tuning.
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from bench.common import RESULTS_DIR, ROOT, machine, needs_statistics, write_result
from bench.sweep import with_validation_split
from wmdd_jax.errors import ConfigError

RUNS_DIR = os.path.join(ROOT, "bench", "runs", "accuracy")
DEFAULT_METHODS = ("wmdd:official", "wmdd:per_class", "sre2l", "random", "ce_pcbn", "wass_bn")
DEFAULT_IPCS = (1, 10, 50)
DEFAULT_SEEDS = (0, 1, 2)
OBJECTIVES = ("official", "per_class")
_CELL_METRICS = ("test_top1", "test_top5", "best_top1", "best_top5", "teacher_top1", "seconds",
                 "wall_s", "backend", "devices")


def parse_methods(values: Sequence[str], known: Sequence[str]) -> list[tuple[str, str | None]]:
  """``["wmdd:official", "random"]`` -> ``[("wmdd", "official"), ("random", None)]``.

  A method without ``:objective`` keeps the config's ``recover.objective``; random real images
  never have one. Unknown methods or objectives raise ConfigError naming the valid ones.
  """
  out = []
  for value in values:
    method, _, objective = str(value).partition(":")
    if method not in known:
      raise ConfigError(f"--methods: {method!r} is not a method; known: {', '.join(known)}.")
    if objective and objective not in OBJECTIVES:
      raise ConfigError(f"--methods: objective {objective!r} of {value!r} is not one of "
                        f"{OBJECTIVES}.")
    out.append((method, objective or None))
  if not out:
    raise ConfigError("--methods needs at least one method, e.g. wmdd:official,random.")
  return list(dict.fromkeys(out))


def cell_name(method: str, objective: str | None, ipc: int, seed: int) -> str:
  """The workdir name of a cell: ``wmdd_official_ipc10_seed0``, ``random_ipc10_seed0``."""
  return f"{method}{'_' + objective if objective else ''}_ipc{ipc}_seed{seed}"


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Mean and sample std of test top-1 per (method, objective, IPC), in the rows' order."""
  groups: dict[tuple[Any, Any, int], list[float]] = {}
  for r in rows:
    groups.setdefault((r["method"], r["objective"], r["ipc"]), []).append(float(r["test_top1"]))
  return [{"method": m, "objective": o, "ipc": k, "n": len(v), "mean": statistics.mean(v),
           "std": statistics.stdev(v) if len(v) > 1 else None}
          for (m, o, k), v in groups.items()]


def _pct(value: Any) -> str:
  return "-" if value is None else f"{float(value):.1f}"


def markdown(result: dict[str, Any]) -> str:
  """Methods as rows, IPCs as columns: mean +- sample std of test top-1 (%) over seeds."""
  ipcs = sorted({s["ipc"] for s in result["summary"]})
  by = {(s["method"], s["objective"], s["ipc"]): s for s in result["summary"]}
  labels = list(dict.fromkeys((s["method"], s["objective"]) for s in result["summary"]))
  split = result["split"]
  lines = [f"{result['config']} ({result['dataset']}): student {result['student']}, top-1 (%) on "
           f"split {split!r}, mean +- sample std over seeds (n)"
           + (" — DEBUG run, not meaningful" if result["debug"] else ""), "",
           "| method | objective | " + " | ".join(f"IPC {k}" for k in ipcs) + " |",
           "|---|---|" + "---:|" * len(ipcs)]
  for m, o in labels:
    cells = []
    for k in ipcs:
      s = by.get((m, o, k))
      if s is None:
        cells.append("-")
      elif s["std"] is None:
        cells.append(f"{s['mean']:.1f} (1)")
      else:
        cells.append(f"{s['mean']:.1f} +- {s['std']:.1f} ({s['n']})")
    lines.append(f"| {m} | {o or '-'} | " + " | ".join(cells) + " |")
  lines += ["", f"Teacher: {result['teacher']} (top-1 {_pct(result['teacher_top1'])}%). "
            f"{result['total_cell_s']:.0f} s of cell runs on {result['machine']['device_kind']}."]
  return "\n".join(lines) + "\n"


def _cell_config(base: Any, method: str, objective: str | None, ipc: int, seed: int) -> Any:
  """The config of one cell: ``base`` with its method, IPC, seed and recover objective."""
  cfg = base.copy_and_resolve_references()
  cfg.method, cfg.ipc, cfg.seed = method, ipc, seed
  if objective:
    cfg.recover.objective = objective
  return cfg


def recover_switches(config: Any) -> dict[str, Any] | None:
  """The method switches a cell's recover ran with (the config's ``recover`` section, its
  ``method_switches`` and the method's own values resolved), None for methods without recover."""
  from wmdd_jax import methods, pipeline  # noqa: PLC0415
  if not methods.get_method(config.method).runs_recover:
    return None
  options = pipeline.recover_options(config)
  return {name: getattr(options, name) for name in methods.SWITCHES}


def exit_with_parent(period_s: float = 1.0) -> threading.Thread:
  """Ends this process (exit status 1) once its parent is gone: a killed grid must not leave
  workers computing into the cells' workdirs, which a restarted grid would find locked. The
  pipeline writes every result atomically, so an exit at any point leaves a resumable workdir
  (its lock is taken over by the next run, its owner being dead)."""
  parent = os.getppid()

  def watch():
    while os.getppid() == parent:
      time.sleep(period_s)
    os._exit(1)

  thread = threading.Thread(target=watch, name="exit_with_parent", daemon=True)
  thread.start()
  return thread


def _run_cell(config: Any, workdir: str, stop_after: str = "evaluate") -> dict[str, Any]:
  """One pipeline run in this process (the worker side of --workers); returns its metrics."""
  from absl import logging  # noqa: PLC0415 - spawned workers import JAX only here
  exit_with_parent()

  from wmdd_jax import pipeline  # noqa: PLC0415
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  t0 = time.perf_counter()
  metrics = pipeline.run(config, workdir, stop_after=stop_after,
                         log=lambda msg: print(f"    [{os.path.basename(workdir)}] {msg}",
                                               flush=True))
  metrics["wall_s"] = round(time.perf_counter() - t0, 3)
  return metrics


def run_grid(config: Any, *, config_name: str, methods: Sequence[str] = DEFAULT_METHODS,
             ipcs: Sequence[int] = DEFAULT_IPCS, seeds: Sequence[int] = DEFAULT_SEEDS,
             out: str | None = None, results: str | None = None, workers: int = 1,
             val_fraction: float = 0.0, share_statistics: bool = True,
             tabulate_only: bool = False, command: str = "",
             log: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs (or reads) every cell and writes the results JSON and markdown after each.

  Args:
    config: the experiment config (a ConfigDict from ``experiments/configs/<name>.py``).
    config_name: the config file's name without ``.py`` (names the default out/results).
    methods: ``method`` or ``method:objective`` strings (see :func:`parse_methods`).
    ipcs, seeds: the grid's IPCs and seeds.
    out: directory of the teacher and cell workdirs (default ``bench/runs/accuracy/<name>``).
    results: the JSON path (default ``bench/results/accuracy_<name>[_debug].json``).
    workers: cells run at once, each in a spawned process (1: one after another, still in a
      worker process so that every cell starts from the same state).
    val_fraction: > 0 holds out this stratified fraction of the train split and scores there.
    share_statistics: the statistics pass (which depends on the teacher, data and ``stats.*``
      only) runs in the first cell that needs it, alone, and the other cells read it
      (:func:`wmdd_jax.fingerprints.share_statistics`, checked like their own results); False:
      every cell computes its own.
    tabulate_only: run nothing (no teacher, no cell): write the JSON and markdown from the
      cells already finished under ``out``, e.g. a partial grid's table while the rest waits
      for compute (each summary entry's n says how many seeds its mean holds).
    command: the command line, recorded in the JSON.
    log: progress printer.

  Returns:
    The result written to the JSON.

  Raises:
    ConfigError: bad methods, IPCs, seeds, workers or val_fraction, or a workdir holding another
      run, before any compute.
  """
  from wmdd_jax import fingerprints, pipeline  # noqa: PLC0415

  cells_spec = parse_methods(methods, pipeline.METHODS)
  ipcs = [int(k) for k in ipcs]
  seeds = [int(s) for s in seeds]
  if not ipcs or min(ipcs) < 1 or not seeds or min(seeds) < 0:
    raise ConfigError(f"--ipcs needs values >= 1 and --seeds values >= 0; got {ipcs}, {seeds}.")
  if int(workers) < 1:
    raise ConfigError(f"--workers={workers} must be >= 1.")
  base = with_validation_split(config, val_fraction)
  debug = bool(base.get("debug", False))
  name = config_name + ("_debug" if debug else "")
  out = os.path.abspath(out or os.path.join(RUNS_DIR, name + ("_val" if val_fraction else "")))
  results = results or os.path.join(RESULTS_DIR, f"accuracy_{name}.json")
  teacher = os.path.abspath(base.teacher.checkpoint or os.path.join(out, "teacher"))
  if base.teacher.checkpoint and not os.path.exists(teacher):
    raise ConfigError(f"config.teacher.checkpoint={base.teacher.checkpoint!r} does not exist; "
                      "pass an existing teacher or leave it empty to train one under --out.")
  base.teacher.checkpoint = teacher
  plan = [(m, o, k, s) for k in ipcs for s in seeds for (m, o) in cells_spec]
  done: dict[tuple, dict[str, Any]] = {}
  for m, o, k, s in plan:
    path = os.path.join(out, cell_name(m, o, k, s), "metrics.json")
    if os.path.exists(path):
      with open(path) as f:
        metrics = json.load(f)
      if (metrics.get("method"), metrics.get("ipc"), metrics.get("seed")) != (m, k, s):
        raise ConfigError(f"{path} holds another run ({metrics.get('method')}, IPC "
                          f"{metrics.get('ipc')}, seed {metrics.get('seed')}); pass another --out.")
      done[(m, o, k, s)] = metrics
  log(f"accuracy grid on {config_name}: {len(plan)} cells ({len(done)} finished), "
      f"{workers} worker(s), workdirs under {out}")

  def cell_config(m, o, k, s):
    return _cell_config(base, m, o, k, s)

  mp = multiprocessing.get_context("spawn")
  if workers > 1:  # each process takes its share of one accelerator's memory
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / workers:.3f}")
  start = time.perf_counter()
  result: dict[str, Any] = {}

  def write():
    nonlocal result
    result = _result(base, config_name, plan, done, out, teacher, debug, command,
                     time.perf_counter() - start)
    _write(results, result)

  if tabulate_only:
    write()
    log(result["markdown"])
    return result

  with concurrent.futures.ProcessPoolExecutor(max_workers=int(workers), mp_context=mp) as pool:
    if not os.path.exists(teacher):
      log(f"teacher: training into {teacher} (seed {seeds[0]})")
      cfg = base.copy_and_resolve_references()
      cfg.seed = seeds[0]
      pool.submit(_run_cell, cfg,
                  os.path.join(out, "teacher_run"), "teacher").result()
    pending = [c for c in plan if c not in done]
    if share_statistics:
      stats_cells = [c for c in plan if needs_statistics(cell_config(*c))]
      source = next((c for c in stats_cells
                     if fingerprints.has_statistics(os.path.join(out, cell_name(*c)))), None)
      if source is None and any(c in pending for c in stats_cells):
        source = next(c for c in stats_cells if c in pending)  # computes the pass, alone
        log(f"statistics: computed once in {cell_name(*source)}, then shared")
        done[source] = pool.submit(_run_cell, cell_config(*source),
                                   os.path.join(out, cell_name(*source))).result()
        log(f"[{len(done)}/{len(plan)}] {cell_name(*source)}: top-1 "
            f"{done[source]['test_top1']:.2f}% ({done[source]['wall_s']:.0f} s)")
        pending.remove(source)
        write()
      if source is not None:
        for c in stats_cells:
          if c in pending:
            fingerprints.share_statistics(os.path.join(out, cell_name(*source)),
                                          os.path.join(out, cell_name(*c)))
    todo = {pool.submit(_run_cell, cell_config(*c), os.path.join(out, cell_name(*c))): c
            for c in pending}
    for future in concurrent.futures.as_completed(todo):
      c = todo[future]
      done[c] = future.result()
      log(f"[{len(done)}/{len(plan)}] {cell_name(*c)}: top-1 {done[c]['test_top1']:.2f}% "
          f"({done[c]['wall_s']:.0f} s)")
      write()
  write()
  log(result["markdown"])
  return result


def _statistics_source(config: Any, cell: tuple, metrics: dict[str, Any]) -> str | None:
  """"computed" (the cell ran the statistics pass), "shared" (it read another cell's), None
  (its method reads none)."""
  if not needs_statistics(_cell_config(config, *cell)):
    return None
  return "computed" if "statistics" in (metrics.get("seconds") or {}) else "shared"


def _cell_seconds(row):
  """A finished cell's run time: its wall_s, else (cells that ran before wall_s was written,
  read back from their metrics.json) the sum of its stages' seconds."""
  if row.get("wall_s") is not None:
    return float(row["wall_s"])
  return float(sum((row.get("seconds") or {}).values()))


def _write(results: str, result: dict[str, Any]) -> None:
  """The results JSON and its markdown table beside it (``.md``)."""
  write_result(results, result)
  with open(results[: -len(".json")] + ".md", "w") as f:
    f.write(result["markdown"])


def _result(config, config_name, plan, done, out, teacher, debug, command, wall_s):
  rows = []
  for c in plan:
    if c not in done:
      continue
    m, o, k, s = c
    metrics = done[c]
    rows.append({"method": m, "objective": None if m == "random" else (
        o or config.recover.objective), "ipc": k, "seed": s,
                 "workdir": os.path.join(out, cell_name(*c)),
                 "recover_switches": recover_switches(_cell_config(config, *c)),
                 "statistics": _statistics_source(config, c, metrics),
                 **{f: metrics.get(f) for f in _CELL_METRICS}})
  teacher_top1 = next((r["teacher_top1"] for r in rows if r.get("teacher_top1") is not None),
                      None)
  result = {
      "benchmark": "accuracy", "config": config_name, "dataset": config.dataset.spec,
      "split": config.dataset.get("test_split", "test"), "debug": debug,
      "student": config.eval.get("model") or config.teacher.model, "teacher": teacher,
      "teacher_top1": teacher_top1, "cells_planned": len(plan), "cells_done": len(rows),
      "metric": "final-epoch top-1 (%) of metrics.json on the split above",
      "rows": rows, "summary": summarize(rows),
      "total_cell_s": round(sum(_cell_seconds(r) for r in rows), 1),
      "wall_s": round(wall_s, 1), "script": "bench/accuracy.py", "command": command,
      "config_values": json.loads(config.to_json_best_effort()), "machine": machine(),
  }
  result["markdown"] = markdown(result)
  return result


_MERGE_SAME = ("config", "dataset", "split", "debug", "student", "teacher_top1")
_MERGE_FREE = ("teacher.checkpoint",)  # one path per grid run; the teachers' scores must agree


def _flat(values: Any, prefix: str = "") -> dict[str, Any]:
  if not isinstance(values, dict):
    return {prefix: values}
  out: dict[str, Any] = {}
  for k, v in values.items():
    out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
  return out


def merge_results(paths: Sequence[str], results: str, *, note: str = "",
                  allow: Sequence[str] = (), command: str = "") -> dict[str, Any]:
  """Merges the results JSONs of several grid runs of one config into one table.

  A grid that ran in parts (IPC 1 this week, IPC 50 on seeds 1 and 2 later, each its own
  ``bench.accuracy`` command) becomes one file with one summary. Runs merge only when they
  measured the same thing: the same config name, dataset, split, debug flag, student and
  teacher top-1 (each run may have its own teacher directory, e.g. a retrained deterministic
  teacher), and the same config values except ``teacher.checkpoint`` and those named in
  ``allow`` (a deliberate choice, e.g. a solver option added between the runs; every such
  difference is kept in the JSON's ``merge_differences``). A cell that two inputs both hold must
  be the same run (same workdir and test top-1), and is kept once.

  Args:
    paths: results JSONs written by :func:`run_grid` (or by this function).
    results: the merged JSON's path (its markdown goes beside it, ``.md``).
    note: free text kept in the JSON (default: the inputs' notes, joined).
    allow: config value names (``barycenter.start_epsilon``) that may differ between inputs.
    command: the merge command line, recorded in the JSON.

  Returns:
    The merged result: rows ordered by IPC, then the inputs' method order, then seed;
    ``commands``: every input's grid command(s); ``merged_from``: the input paths;
    ``merge_differences``: {name: [each input's value]} for the allowed names that differed;
    ``wall_s`` None (no single run; ``total_cell_s`` sums the cells' times, each once).

  Raises:
    ConfigError: fewer than two inputs, an input that is not an accuracy grid, inputs that
      differ in what they measured (the error names the fields), or a cell with two results.
  """
  if len(paths) < 2:
    raise ConfigError(f"--merge needs at least two results JSONs; got {list(paths)}.")
  inputs = []
  for path in paths:
    with open(path) as f:
      data = json.load(f)
    if data.get("benchmark") != "accuracy" or "rows" not in data:
      raise ConfigError(f"{path} is not a bench.accuracy results JSON (benchmark "
                        f"{data.get('benchmark')!r}).")
    inputs.append((path, data))
  # Each input's header fields and flattened config values ("recover.iterations": 500).
  measured = [{**{k: d.get(k) for k in _MERGE_SAME}, **_flat(d.get("config_values", {}))}
              for _, d in inputs]
  free = set(_MERGE_FREE) | set(allow)
  first_path, first = paths[0], measured[0]
  for path, values in zip(paths[1:], measured[1:], strict=True):
    differ = sorted(k for k in set(values) | set(first)
                    if k not in free and values.get(k) != first.get(k))
    if differ:
      shown = ", ".join(f"{k}: {first.get(k)!r} vs {values.get(k)!r}" for k in differ[:6])
      raise ConfigError(f"{path} and {first_path} measured different things ({shown}"
                        f"{', ...' if len(differ) > 6 else ''}); merge only runs of one config "
                        "(or name a deliberate difference in --merge_allow).")
  differences = {k: [v.get(k) for v in measured] for k in allow
                 if len({json.dumps(v.get(k)) for v in measured}) > 1}
  rows: dict[tuple, dict[str, Any]] = {}
  for path, data in inputs:
    for r in data["rows"]:
      key = (r["method"], r["objective"], r["ipc"], r["seed"])
      old = rows.get(key)
      if old is not None and (old.get("workdir"), old["test_top1"]) != (
          r.get("workdir"), r["test_top1"]):
        raise ConfigError(f"cell {key} has two results ({old['test_top1']} in "
                          f"{old.get('workdir')}, {r['test_top1']} in {r.get('workdir')} from "
                          f"{path}); drop one input.")
      rows.setdefault(key, r)
  labels = list(dict.fromkeys((m, o) for m, o, _, _ in rows))
  ordered = sorted(rows.values(), key=lambda r: (r["ipc"], labels.index(
      (r["method"], r["objective"])), r["seed"]))
  commands: list[str] = []
  for _, data in inputs:
    for c in data.get("commands") or [data.get("command", "")]:
      if c and c not in commands:
        commands.append(c)
  # A merged input already lists its teachers: split them so that a path is listed once.
  teachers = list(dict.fromkeys(t for _, d in inputs for t in str(d.get("teacher")).split(", ")))
  result = {
      **{k: v for k, v in inputs[0][1].items()
         if k not in ("rows", "summary", "markdown", "note")},
      "command": command or "python -m bench.accuracy --merge " + ",".join(paths),
      "teacher": ", ".join(teachers),
      "cells_planned": len(ordered), "cells_done": len(ordered),
      "rows": ordered, "summary": summarize(ordered),
      "total_cell_s": round(sum(_cell_seconds(r) for r in ordered), 1),
      "wall_s": None,  # no single run: total_cell_s sums the cells, each counted once
      "commands": commands, "merge_differences": differences,
      "merged_from": [os.path.relpath(p, ROOT) if os.path.isabs(p) else p for p in paths],
  }
  joined = note or " ".join(dict.fromkeys(d["note"] for _, d in inputs if d.get("note")))
  if joined:
    result["note"] = joined
  result["markdown"] = markdown(result)
  _write(results, result)
  return result


def main() -> None:  # pragma: no cover - the CLI; tests run it as a subprocess
  """Parses the flags (absl + ml_collections config_flags) and runs :func:`run_grid`."""
  from absl import app, flags, logging  # noqa: PLC0415
  from ml_collections import config_flags  # noqa: PLC0415

  config = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                           lock_config=True)
  methods = flags.DEFINE_list("methods", list(DEFAULT_METHODS),
                              "Methods, each `method` or `method:objective`.")
  ipcs = flags.DEFINE_list("ipcs", [str(k) for k in DEFAULT_IPCS], "IPCs.")
  seeds = flags.DEFINE_list("seeds", [str(s) for s in DEFAULT_SEEDS], "Seeds.")
  out = flags.DEFINE_string("out", None, "Directory of the teacher and the cells' workdirs.")
  results = flags.DEFINE_string("results", None, "The results JSON path.")
  workers = flags.DEFINE_integer("workers", 1, "Cells run at once (processes).")
  val_fraction = flags.DEFINE_float("val_fraction", 0.0, "Score on a held-out part of train.")
  share = flags.DEFINE_bool("share_statistics", True,
                            "Run the statistics pass once and share it with every cell.")
  tabulate = flags.DEFINE_bool("tabulate_only", False,
                               "Run nothing: write the results from the finished cells.")
  merge = flags.DEFINE_list("merge", [], "Merge these results JSONs (runs of one config) into "
                            "--results; runs nothing.")
  note = flags.DEFINE_string("note", "", "With --merge: a note kept in the merged JSON.")
  allow = flags.DEFINE_list("merge_allow", [], "With --merge: config values that may differ "
                            "between the parts (kept in merge_differences).")

  def run(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments {argv[1:]}; see --help.")
    logging.set_verbosity(logging.WARNING)
    if (note.value or allow.value) and not merge.value:
      raise app.UsageError("--note and --merge_allow only go with --merge A.json,B.json.")
    if merge.value:
      if not results.value:
        raise app.UsageError("--merge needs --results (the merged JSON's path).")
      if config.value is not None:
        raise app.UsageError("--merge runs nothing and reads no config: drop --config.")
      # The note is kept in the JSON itself; the command names what was merged.
      command = (f"python -m bench.accuracy --merge {','.join(merge.value)} "
                 f"--results {results.value}"
                 + (f" --merge_allow {','.join(allow.value)}" if allow.value else ""))
      merged = merge_results(merge.value, results.value, note=note.value, allow=allow.value,
                             command=command)
      print(merged["markdown"])
      return
    if config.value is None:
      raise app.UsageError("--config is required (or --merge A.json,B.json --results C.json).")
    filename = config_flags.get_config_filename(flags.FLAGS["config"])
    run_grid(config.value, config_name=os.path.splitext(os.path.basename(filename))[0],
             methods=methods.value, ipcs=ipcs.value, seeds=seeds.value, out=out.value,
             results=results.value, workers=workers.value, val_fraction=val_fraction.value,
             share_statistics=share.value, tabulate_only=tabulate.value,
             command=" ".join(["python -m bench.accuracy", *sys.argv[1:]]))

  app.run(run)


if __name__ == "__main__":
  main()
