"""bench/accuracy.py: the grid's parsing, summary and table (the runs themselves are pipeline
runs, tested in test_pipeline.py)."""

import os

import pytest

from bench import accuracy
from wmdd_jax.errors import ConfigError

KNOWN = ("wmdd", "sre2l", "random", "ce_pcbn", "wass_bn")


def test_parse_methods_splits_objectives_and_drops_repeats():
  got = accuracy.parse_methods(["wmdd:official", "wmdd:per_class", "random", "wmdd:official"],
                               KNOWN)
  assert got == [("wmdd", "official"), ("wmdd", "per_class"), ("random", None)]


@pytest.mark.parametrize("bad, fragment", [
    (["wmd"], "not a method"), (["wmdd:perclass"], "not one of"), ([], "at least one")])
def test_parse_methods_errors_name_the_valid_values(bad, fragment):
  with pytest.raises(ConfigError, match=fragment):
    accuracy.parse_methods(bad, KNOWN)


def test_cell_names_keep_objectives_apart():
  assert accuracy.cell_name("wmdd", "per_class", 10, 2) == "wmdd_per_class_ipc10_seed2"
  assert accuracy.cell_name("random", None, 1, 0) == "random_ipc1_seed0"


def test_cell_time_falls_back_to_the_stage_seconds_of_older_cells():
  assert accuracy._cell_seconds({"wall_s": 12.5, "seconds": {"recover": 3.0}}) == 12.5
  # A cell finished before wall_s was recorded reads back wall_s None: its stages still count.
  assert accuracy._cell_seconds({"wall_s": None,
                                 "seconds": {"recover": 3.0, "evaluate": 4.5}}) == 7.5
  assert accuracy._cell_seconds({}) == 0.0


def test_summary_and_markdown_report_mean_and_sample_std():
  rows = [{"method": "wmdd", "objective": "official", "ipc": 10, "seed": s, "test_top1": v}
          for s, v in enumerate((50.0, 52.0, 57.0))]
  rows.append({"method": "random", "objective": None, "ipc": 10, "seed": 0, "test_top1": 40.0})
  summary = accuracy.summarize(rows)
  assert summary[0]["n"] == 3 and summary[0]["mean"] == pytest.approx(53.0)
  assert summary[0]["std"] == pytest.approx(3.605551, rel=1e-6)  # sample std, numpy ddof=1
  assert summary[1]["std"] is None
  table = accuracy.markdown({
      "config": "c", "dataset": "d", "student": "convnet_d3", "split": "test", "debug": False,
      "summary": summary, "teacher": "t", "teacher_top1": 70.04, "total_cell_s": 5.0,
      "machine": {"device_kind": "cpu"}})
  assert "| wmdd | official | 53.0 +- 3.6 (3) |" in table
  assert "| random | - | 40.0 (1) |" in table
  assert "top-1 70.0%" in table


def test_validation_split_works_on_a_locked_config_without_the_option():
  """The CLI locks the config; Fashion-MNIST's dataset.options has no val_fraction key yet."""
  from bench.sweep import with_validation_split
  from wmdd_jax.config import default_config
  config = default_config()
  config.lock()
  held = with_validation_split(config, 0.1)
  assert held.dataset.options.val_fraction == 0.1 and held.dataset.test_split == "val"
  assert "val_fraction" not in config.dataset.options  # the caller's config is left alone
  assert with_validation_split(config, 0.0).dataset.test_split == "test"
  with pytest.raises(ConfigError, match="must be in"):
    with_validation_split(config, 1.5)


def test_each_cell_records_the_switches_its_recover_ran_with():
  """A config's method_switches reach its method's cells only; the objective axis is per cell."""
  from wmdd_jax.config import default_config
  base = default_config()
  base.method_switches = {"wmdd": {"r_ce": 10.0}}
  wmdd = accuracy.recover_switches(accuracy._cell_config(base, "wmdd", "per_class", 10, 1))
  sre2l = accuracy.recover_switches(accuracy._cell_config(base, "sre2l", None, 10, 1))
  assert wmdd["r_ce"] == 10.0 and wmdd["bn_stats"] == "class"
  assert sre2l["r_ce"] == 1.0 and sre2l["first_bn_multiplier"] == 10.0
  assert accuracy.recover_switches(accuracy._cell_config(base, "random", None, 1, 0)) is None
  cell = accuracy._cell_config(base, "wmdd", "per_class", 10, 1)
  assert (cell.recover.objective, cell.ipc, cell.seed) == ("per_class", 10, 1)
  assert base.recover.objective == "official"  # the base config is left alone


def test_grid_runs_the_statistics_pass_once_and_shares_it(tmp_path):
  """The first cell that needs the statistics computes them, alone; the others read them
  (rows say which); random real images read none. A second call reads every cell back."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "digits_cfg", os.path.join(accuracy.ROOT, "experiments", "configs", "digits.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.debug = True
  lines = []
  kwargs = dict(config_name="digits", methods=["ce_pcbn", "wass_bn", "random"], ipcs=[1],
                seeds=[0], out=str(tmp_path / "out"), results=str(tmp_path / "acc.json"),
                log=lines.append)
  result = accuracy.run_grid(config, **kwargs)
  got = {r["method"]: r["statistics"] for r in result["rows"]}
  assert got == {"ce_pcbn": "computed", "wass_bn": "shared", "random": None}
  assert any("statistics: computed once in ce_pcbn_ipc1_seed0" in line for line in lines)
  first = {r["method"]: r["test_top1"] for r in result["rows"]}
  again = accuracy.run_grid(config, **kwargs)
  assert {r["method"]: r["test_top1"] for r in again["rows"]} == first
  # tabulate_only over a larger grid: the finished cells' rows, nothing run for the others.
  kwargs.update(seeds=[0, 1], results=str(tmp_path / "partial.json"))
  partial = accuracy.run_grid(config, tabulate_only=True, **kwargs)
  assert {(r["method"], r["seed"]): r["test_top1"] for r in partial["rows"]} == {
      (m, 0): v for m, v in first.items()}
  assert not any("seed1" in name for name in os.listdir(tmp_path / "out"))
  assert os.path.exists(tmp_path / "partial.json") and os.path.exists(tmp_path / "partial.md")


_ORPHAN = """
import multiprocessing, os, sys, time
sys.path.insert(0, {root!r})

def worker(path):
  from bench.accuracy import exit_with_parent
  exit_with_parent(0.1)
  with open(path, "w") as f:
    f.write(str(os.getpid()))
  time.sleep(60)

if __name__ == "__main__":
  multiprocessing.get_context("spawn").Process(target=worker, args=({path!r},)).start()
  time.sleep(60)
"""


def test_a_worker_ends_when_its_grid_is_killed(tmp_path):
  """A grid killed with SIGKILL leaves no worker computing on (the child sees its parent gone)."""
  import signal
  import subprocess
  import sys
  import time
  path = str(tmp_path / "pid")
  script = tmp_path / "grid.py"
  script.write_text(_ORPHAN.format(root=accuracy.ROOT, path=path))
  grid = subprocess.Popen([sys.executable, str(script)])
  deadline = time.time() + 60
  while not os.path.exists(path) or not open(path).read():
    assert time.time() < deadline and grid.poll() is None
    time.sleep(0.1)
  child = int(open(path).read())
  os.kill(grid.pid, signal.SIGKILL)
  grid.wait()
  deadline = time.time() + 10
  while time.time() < deadline:
    try:
      with open(f"/proc/{child}/stat") as f:
        if f.read().rsplit(")", 1)[1].split()[0] == "Z":  # exited, not reaped yet
          return
    except FileNotFoundError:
      return
    time.sleep(0.1)
  os.kill(child, signal.SIGKILL)
  raise AssertionError("the worker outlived its killed grid by 10 s")


def _grid_json(path, cells, *, iterations=500, checkpoint="/runs/a/teacher", command="grid"):
  """A results JSON as run_grid writes it: ``cells`` = [(method, objective, ipc, seed, top1)]."""
  import json
  rows = [{"method": m, "objective": o, "ipc": k, "seed": s, "test_top1": t,
           "workdir": f"{os.path.dirname(checkpoint)}/{accuracy.cell_name(m, o, k, s)}",
           "wall_s": 10.0} for m, o, k, s, t in cells]
  data = {"benchmark": "accuracy", "config": "digits", "dataset": "sklearn:digits",
          "split": "test", "debug": False, "student": "convnet_d3",
          "teacher": os.path.dirname(checkpoint) + "/teacher", "teacher_top1": 90.0,
          "rows": rows, "summary": accuracy.summarize(rows), "total_cell_s": 10.0 * len(rows),
          "wall_s": 99.0, "command": command,
          "config_values": {"recover": {"iterations": iterations},
                            "teacher": {"checkpoint": checkpoint}},
          "machine": {"device_kind": "cpu"}}
  with open(path, "w") as f:
    json.dump(data, f)
  return str(path)


def test_merge_joins_grids_that_ran_in_parts(tmp_path):
  """Two parts of one grid (different teacher dirs, same teacher score) become one table; a
  cell both hold is kept once; the summary is recomputed over the union."""
  import json
  import statistics
  a = _grid_json(tmp_path / "a.json", [("wmdd", "official", 1, 0, 70.0),
                                       ("random", None, 1, 0, 60.0),
                                       ("wmdd", "official", 50, 0, 85.0)], command="part a")
  b = _grid_json(tmp_path / "b.json", [("wmdd", "official", 50, 1, 86.0),
                                       ("wmdd", "official", 50, 2, 88.0)],
                 checkpoint="/runs/b/teacher", command="part b")
  # b again, holding a's IPC-50 seed-0 cell too (the same run): kept once.
  c = _grid_json(tmp_path / "c.json", [("wmdd", "official", 50, 0, 85.0)], command="part c")
  out = str(tmp_path / "merged.json")
  got = accuracy.merge_results([a, b, c], out)
  assert [(r["method"], r["ipc"], r["seed"]) for r in got["rows"]] == [
      ("wmdd", 1, 0), ("random", 1, 0), ("wmdd", 50, 0), ("wmdd", 50, 1), ("wmdd", 50, 2)]
  by = {(s["method"], s["ipc"]): s for s in got["summary"]}
  assert by[("wmdd", 50)]["n"] == 3
  assert by[("wmdd", 50)]["mean"] == pytest.approx(statistics.mean([85.0, 86.0, 88.0]))
  assert by[("wmdd", 50)]["std"] == pytest.approx(statistics.stdev([85.0, 86.0, 88.0]))
  assert got["commands"] == ["part a", "part b", "part c"]
  assert got["total_cell_s"] == 50.0 and got["wall_s"] is None
  assert got["teacher"] == "/runs/a/teacher, /runs/b/teacher"
  # Merging the merged result with one more part lists each teacher once.
  d = _grid_json(tmp_path / "d.json", [("random", None, 50, 0, 84.0)], command="part d")
  again = accuracy.merge_results([out, d], str(tmp_path / "again.json"))
  assert again["teacher"] == "/runs/a/teacher, /runs/b/teacher"
  assert len(again["rows"]) == 6
  with open(out) as f:
    assert json.load(f)["summary"] == got["summary"]
  assert "85.0" not in open(out[:-5] + ".md").read()  # the table shows the mean
  assert "86.3 +- 1.5 (3)" in open(out[:-5] + ".md").read()


def test_merge_refuses_runs_that_measured_different_things(tmp_path):
  import json
  a = _grid_json(tmp_path / "a.json", [("random", None, 1, 0, 60.0)])
  b = _grid_json(tmp_path / "b.json", [("random", None, 1, 1, 61.0)], iterations=2000)
  with pytest.raises(ConfigError, match="recover.iterations: 500 vs 2000"):
    accuracy.merge_results([a, b], str(tmp_path / "m.json"))
  # A deliberate difference is allowed by name and recorded.
  allowed = accuracy.merge_results([a, b], str(tmp_path / "ok.json"),
                                   allow=["recover.iterations"])
  assert allowed["merge_differences"] == {"recover.iterations": [500, 2000]}
  assert len(allowed["rows"]) == 2
  other_teacher = _grid_json(tmp_path / "t.json", [("random", None, 1, 1, 61.0)])
  data = json.load(open(other_teacher))
  data["teacher_top1"] = 88.0
  json.dump(data, open(other_teacher, "w"))
  with pytest.raises(ConfigError, match="teacher_top1: 90.0 vs 88.0"):
    accuracy.merge_results([a, other_teacher], str(tmp_path / "m.json"))
  conflict = _grid_json(tmp_path / "c.json", [("random", None, 1, 0, 62.0)])
  with pytest.raises(ConfigError, match="two results"):
    accuracy.merge_results([a, conflict], str(tmp_path / "m.json"))
  with pytest.raises(ConfigError, match="at least two"):
    accuracy.merge_results([a], str(tmp_path / "m.json"))
  assert not os.path.exists(tmp_path / "m.json")  # nothing written on an error


def test_merge_cli_writes_the_merged_table(tmp_path):
  import subprocess
  import sys
  a = _grid_json(tmp_path / "a.json", [("random", None, 1, 0, 60.0)])
  b = _grid_json(tmp_path / "b.json", [("random", None, 1, 1, 62.0)])
  out = tmp_path / "m.json"
  done = subprocess.run([sys.executable, "-m", "bench.accuracy", f"--merge={a},{b}",
                         f"--results={out}", "--note=two parts"], cwd=accuracy.ROOT,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  assert "61.0 +- 1.4 (2)" in done.stdout and out.exists()
  missing = subprocess.run([sys.executable, "-m", "bench.accuracy", f"--merge={a},{b}"],
                           cwd=accuracy.ROOT, capture_output=True, text=True, timeout=300)
  assert missing.returncode != 0 and "--merge needs --results" in missing.stderr
  stray = subprocess.run([sys.executable, "-m", "bench.accuracy", "--note=x",
                          "--config=experiments/configs/digits.py"],
                         cwd=accuracy.ROOT, capture_output=True, text=True, timeout=300)
  assert stray.returncode != 0 and "only go with --merge" in stray.stderr
