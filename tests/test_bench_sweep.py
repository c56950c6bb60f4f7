"""bench/sweep.py: a debug sweep on digits end to end (axes, resume, the shared statistics)."""

import importlib.util
import os

from bench import sweep


def _digits_debug():
  spec = importlib.util.spec_from_file_location(
      "digits_cfg", os.path.join(sweep.ROOT, "experiments", "configs", "digits.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.debug = True
  return config


def test_sweep_shares_one_statistics_pass_and_resumes(tmp_path):
  """Two methods that read the statistics: the first run computes them, the second reads them
  (its timings have no statistics stage); a second call reads both runs back."""
  lines = []
  kwargs = dict(config_name="digits", sweeps=["method=ce_pcbn,wass_bn", "ipc=1"], seeds=[0],
                out=str(tmp_path / "out"), log=lines.append)
  result = sweep.run_sweep(_digits_debug(), **kwargs)
  runs = {r["point"]["method"]: r for r in result["runs"]}
  assert "statistics" in runs["ce_pcbn"]["seconds"]
  assert "statistics" not in runs["wass_bn"]["seconds"]
  assert any("statistics: loaded" in line for line in lines)
  again = sweep.run_sweep(_digits_debug(), **kwargs)
  assert all(r["reused"] for r in again["runs"])
  assert [r["test_top1"] for r in again["runs"]] == [r["test_top1"] for r in result["runs"]]
