"""bench/accuracy_gpu.sh, driven with a fake interpreter (``PY``) that records its calls.

The script's own logic is what is checked here: which grids run with which configs and results
paths, the device-memory share per process, the deadline, the copy of results to ``$OUT`` and
the dataset link; bench/accuracy.py itself is tested in test_bench_accuracy.py.
"""

import os
import pathlib
import shutil
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# Records argv and the memory share, writes the results file and its table like accuracy.py,
# and sleeps (as the process itself, so a SIGTERM ends it) when FAKE_SLEEP is set.
FAKE_PY = r"""#!/usr/bin/env bash
echo "CALL $* MEM=$XLA_PYTHON_CLIENT_MEM_FRACTION PRE=$XLA_PYTHON_CLIENT_PREALLOCATE" >> "$FAKE_LOG"
args=("$@")
for i in "${!args[@]}"; do
  if [ "${args[$i]}" = --results ]; then
    r=${args[$((i + 1))]}
    echo '{"rows": []}' > "$r"; echo '| table |' > "${r%.json}.md"
  fi
done
if [ -n "${FAKE_SLEEP:-}" ]; then exec sleep "$FAKE_SLEEP"; fi
exit "${FAKE_RC:-0}"
"""


@pytest.fixture
def repo(tmp_path):
  root = tmp_path / "repo"
  (root / "bench" / "results").mkdir(parents=True)
  shutil.copy(REPO / "bench" / "accuracy_gpu.sh", root / "bench" / "accuracy_gpu.sh")
  fake = tmp_path / "fake_python"
  fake.write_text(FAKE_PY)
  fake.chmod(0o755)
  return root


def _run(repo, *args, timeout=60, **env):
  log = repo.parent / "calls.log"
  full_env = {**os.environ, "PY": str(repo.parent / "fake_python"), "FAKE_LOG": str(log),
              **{k: str(v) for k, v in env.items()}}
  for name in ("OUT", "GRIDS", "DEADLINE_S", "WORKERS", "EXTRA"):
    if name not in env:
      full_env.pop(name, None)
  proc = subprocess.run(["bash", str(repo / "bench" / "accuracy_gpu.sh"), *args], env=full_env,
                        capture_output=True, text=True, timeout=timeout)
  calls = log.read_text().splitlines() if log.exists() else []
  return proc, calls


def test_default_groups_run_both_convnet_grids_then_resnet18(repo):
  proc, calls = _run(repo, WORKERS=3)
  assert proc.returncode == 0, proc.stderr
  assert len(calls) == 3
  first_group, resnet = sorted(calls[:2]), calls[2]
  assert "--config experiments/configs/cifar10_dev.py " in first_group[0]
  assert "--config experiments/configs/fashion_mnist.py " in first_group[1]
  # Two grids of 3 workers share 90% of the device: 0.9 / 6 each.
  assert all("--workers 3 " in c and "MEM=0.150 PRE=false" in c for c in first_group)
  assert "--config experiments/configs/cifar10_dev.py:resnet18 " in resnet
  assert "--results bench/results/accuracy_cifar10_dev_resnet18_gpu.json" in resnet
  assert "MEM=0.300" in resnet  # alone in its group: 0.9 / 3
  for name in ("fashion_mnist", "cifar10_dev", "cifar10_dev_resnet18"):
    assert (repo / "bench" / "results" / f"accuracy_{name}_gpu.json").exists()
  # The CPU tables are never the target.
  assert not any("accuracy_fashion_mnist.json" in c or "accuracy_cifar10_dev.json" in c
                 for c in calls)


def test_arguments_choose_grids_and_extra_flags_pass_through(repo):
  proc, calls = _run(repo, "cifar10_dev", WORKERS=1,
                     EXTRA="--ipcs 1 --seeds 0 --config.debug=True")
  assert proc.returncode == 0, proc.stderr
  assert len(calls) == 1
  assert calls[0].startswith("CALL -m bench.accuracy --config experiments/configs/cifar10_dev.py")
  assert calls[0].split(" MEM=")[0].endswith("--ipcs 1 --seeds 0 --config.debug=True")
  assert "--out bench/runs/accuracy/cifar10_dev_gpu" in calls[0]


def test_unknown_grid_fails_with_the_valid_names(repo):
  proc, calls = _run(repo, "cifar10", WORKERS=1)
  assert proc.returncode != 0
  assert "unknown grid cifar10 (fashion_mnist | cifar10_dev | resnet18)" in proc.stderr
  assert calls == []


def test_results_are_copied_to_out(repo, tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  proc, _ = _run(repo, "fashion_mnist+resnet18", WORKERS=1, OUT=out)
  assert proc.returncode == 0, proc.stderr
  assert sorted(p.name for p in out.iterdir()) == [
      "accuracy_cifar10_dev_resnet18_gpu.json", "accuracy_cifar10_dev_resnet18_gpu.md",
      "accuracy_fashion_mnist_gpu.json", "accuracy_fashion_mnist_gpu.md"]


def test_failing_grid_makes_the_script_fail_but_later_groups_still_run(repo):
  proc, calls = _run(repo, "cifar10_dev", "resnet18", WORKERS=1, FAKE_RC=3)
  assert proc.returncode == 1
  assert len(calls) == 2
  assert "exit 3" in proc.stdout


@pytest.mark.slow
def test_deadline_stops_a_running_grid_and_skips_the_next(repo):
  proc, calls = _run(repo, "cifar10_dev", "resnet18", WORKERS=1, DEADLINE_S=8, FAKE_SLEEP=120)
  assert proc.returncode == 1  # the stopped grid counts as failed
  assert len(calls) == 1  # resnet18 never started
  assert "[cifar10_dev] exit 124" in proc.stdout  # timeout's SIGTERM, well before 120 s
  assert "[resnet18] no time left, skipped" in proc.stdout


def test_bundled_datasets_are_linked_where_shared_is_missing(repo):
  (repo / ".dsets" / "cifar10-dev").mkdir(parents=True)
  proc, _ = _run(repo, "cifar10_dev", WORKERS=1)
  assert proc.returncode == 0, proc.stderr
  link = repo.parent / "shared" / "datasets"
  assert link.is_symlink() and (link / "cifar10-dev").is_dir()
