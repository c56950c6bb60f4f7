"""bench/paper_table.py: the paper's numbers, the checks before compute, and debug smoke runs."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from bench import paper_table
from wmdd_jax import pipeline
from wmdd_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "experiments", "configs", "digits.py")


def digits_config(**overrides):
  spec = importlib.util.spec_from_file_location("digits_config", DIGITS)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.debug = True
  for key, value in overrides.items():
    section, _, field = key.rpartition(".")
    (config[section] if section else config)[field] = value
  return config


def test_paper_values():
  assert paper_table.paper_value(1, "imagenette", "wmdd", 10) == 64.8
  assert paper_table.paper_value(1, "tiny_imagenet", "wmdd", 1) == 7.6
  assert paper_table.paper_value(1, "imagenet", "wmdd", 100) == 60.7
  assert paper_table.paper_value(1, "imagenet", "wmdd", 20) is None  # no such column
  assert paper_table.paper_value(3, "imagenette", "sre2l", 10) == 54.2
  assert paper_table.paper_value(3, "imagenet", "wass_bn", 10) == 26.8
  assert paper_table.paper_value(3, "imagenet", "wass_bn", 50) is None  # Table 3 is IPC 10
  assert paper_table.paper_value(1, None, "wmdd", 10) is None
  assert paper_table.paper_key("imagenette") == "imagenette"
  assert paper_table.paper_key("my_tiny", "folder:/data/tiny-imagenet-200") == "tiny_imagenet"
  assert paper_table.paper_key("in1k_folder", "tfds:imagenet2012") == "imagenet"
  assert paper_table.paper_key("digits", "digits") is None
  assert paper_table.paper_key("fashion_mnist", "idx:../shared/datasets/fashion-mnist") is None
  assert paper_table.table_methods(1) == ("wmdd",)
  assert paper_table.table_methods(3) == ("wmdd", "ce_pcbn", "wass_bn", "sre2l")
  with pytest.raises(ConfigError, match="--table"):
    paper_table.table_methods(2)


def test_bad_ipc_fails_before_any_compute(tmp_path):
  out, results = tmp_path / "runs", tmp_path / "results"
  # The digits train split has 130-137 images per class.
  with pytest.raises(ConfigError, match=r"IPC 500 exceeds the train images of class \d"):
    paper_table.run_table(digits_config(), table=1, config_name="digits", ipcs=[1, 500],
                          seeds=[0], out=str(out), results_dir=str(results), log=lambda _: None)
  with pytest.raises(ConfigError, match="--ipcs"):
    paper_table.run_table(digits_config(), table=1, config_name="digits", ipcs=["x"],
                          seeds=[0], out=str(out), results_dir=str(results), log=lambda _: None)
  with pytest.raises(ConfigError, match="does not exist"):
    paper_table.run_table(digits_config(**{"teacher.checkpoint": str(tmp_path / "none")}),
                          table=1, config_name="digits", ipcs=[1], seeds=[0], out=str(out),
                          results_dir=str(results), log=lambda _: None)
  assert not out.exists() and not results.exists()


@pytest.fixture(scope="module")
def table1(tmp_path_factory):
  """The CLI's debug smoke run of Table 1 on digits (IPC 1 and 2, one seed)."""
  tmp = tmp_path_factory.mktemp("paper_table1")
  cmd = [sys.executable, "-m", "bench.paper_table", "--table", "1", "--config", DIGITS,
         "--ipcs", "1,2", "--seeds", "0", "--out", str(tmp / "runs"),
         "--results", str(tmp / "results"), "--config.debug=True"]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return tmp, cmd, proc.stdout


@pytest.mark.slow
def test_table1_debug_smoke_run_and_resume(table1):
  tmp, cmd, stdout = table1
  assert "[1/2] wmdd IPC 1 seed 0: running" in stdout
  json_path = tmp / "results" / "paper_table1_digits_debug.json"
  with open(json_path) as f:
    result = json.load(f)
  assert result["table"] == 1 and result["debug"] and result["paper_dataset"] is None
  assert [(r["method"], r["ipc"], r["seeds"]) for r in result["rows"]] == [
      ("wmdd", 1, [0]), ("wmdd", 2, [0])]
  for row in result["rows"]:
    assert len(row["top1"]) == 1 and row["mean"] == row["top1"][0]
    assert row["std"] is None and row["paper"] is None and row["complete"]
  assert os.path.exists(tmp / "runs" / "teacher")
  for ipc in (1, 2):
    assert os.path.exists(tmp / "runs" / f"wmdd_ipc{ipc}_seed0" / "metrics.json")
  md = (tmp / "results" / "paper_table1_digits_debug.md").read_text()
  assert "| Wass+PCBN (WMDD) | 2 |" in md and md in stdout
  # A second run reads the finished cells instead of computing them again.
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "[2/2] wmdd IPC 2 seed 0: finished, read" in proc.stdout
  assert "running" not in proc.stdout


@pytest.mark.slow
def test_table3_debug_smoke_run(table1, tmp_path):
  """The four loss ablations (at IPC 2 to keep the slot layout's IPC rounds short)."""
  teacher = table1[0] / "runs" / "teacher"  # reuses the Table 1 teacher
  lines = []
  result = paper_table.run_table(
      digits_config(**{"teacher.checkpoint": str(teacher)}), table=3, config_name="digits",
      ipcs=[2], seeds=[0], out=str(tmp_path / "runs"), results_dir=str(tmp_path / "results"),
      log=lines.append)
  assert [(r["method"], r["ipc"]) for r in result["rows"]] == [
      (m, 2) for m in pipeline.TABLE3_METHODS]
  assert all(len(r["top1"]) == 1 and r["paper"] is None for r in result["rows"])
  assert (tmp_path / "results" / "paper_table3_digits_debug.md").exists()
  assert not (tmp_path / "runs" / "teacher").exists()
  assert any("[4/4] sre2l IPC 2 seed 0: test top-1" in line for line in lines)
