"""bench/gpu.py runs end to end on the CPU with --tiny (a small ConvNet; figures meaningless)."""

import json

import pytest

from bench import gpu


@pytest.mark.slow
def test_gpu_bench_runs_tiny(tmp_path):
  out = tmp_path / "gpu.json"
  assert gpu.main(["--tiny", "--only", "statistics,recover_step", "--steps", "1",
                   "--out", str(out)]) == 0
  data = json.loads(out.read_text())
  assert data["script"] and data["command"] and "machine" in data
  works = [row["work"] for row in data["rows"]]
  assert works == ["statistics", "recover_step"]
  for row in data["rows"]:
    assert row["images_per_s"] > 0 and row["compile_s"] >= 0
