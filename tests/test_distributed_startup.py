"""initialize_distributed's order: an explicit coordinator, then JAX's own cluster detection,
then the WMDD_* / JAX_* variables (jax.distributed.initialize mocked: nothing starts)."""

import jax
import pytest

from wmdd_jax import ConfigError
from wmdd_jax.distributed import sharding


@pytest.fixture
def calls(monkeypatch):
  """Records jax.distributed.initialize's arguments instead of starting a job."""
  seen = []
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: seen.append(kw))
  monkeypatch.setattr(jax.config, "update", lambda *a, **kw: None)  # no gloo in this process
  for var in ("WMDD_COORDINATOR", "JAX_COORDINATOR_ADDRESS", "WMDD_NUM_PROCESSES",
              "WMDD_PROCESS_ID", "WMDD_LOCAL_DEVICE_IDS", "WMDD_AUTO_DETECT"):
    monkeypatch.delenv(var, raising=False)
  return seen


def test_detected_cluster_comes_first(monkeypatch, calls):
  monkeypatch.setattr(sharding, "detect_cluster", lambda: ("SlurmCluster", 4))
  monkeypatch.setenv("WMDD_COORDINATOR", "host0:1234")  # ignored: the cluster is detected
  monkeypatch.setenv("WMDD_LOCAL_DEVICE_IDS", "0,1")
  assert sharding.initialize_distributed() is True
  assert calls == [{"local_device_ids": [0, 1]}]  # JAX reads the cluster itself


def test_single_process_cluster_is_left_alone(monkeypatch, calls):
  monkeypatch.setattr(sharding, "detect_cluster", lambda: ("SlurmCluster", 1))
  assert sharding.initialize_distributed() is False and calls == []


def test_variables_are_the_fallback(monkeypatch, calls):
  monkeypatch.setattr(sharding, "detect_cluster", lambda: None)
  assert sharding.initialize_distributed() is False and calls == []
  monkeypatch.setenv("WMDD_COORDINATOR", "host0:1234")
  monkeypatch.setenv("WMDD_NUM_PROCESSES", "2")
  monkeypatch.setenv("WMDD_PROCESS_ID", "1")
  assert sharding.initialize_distributed() is True
  assert calls == [{"coordinator_address": "host0:1234", "num_processes": 2, "process_id": 1,
                    "local_device_ids": None}]


def test_detection_can_be_switched_off_and_arguments_win(monkeypatch, calls):
  monkeypatch.setattr(sharding, "detect_cluster", lambda: ("OmpiCluster", 8))
  monkeypatch.setenv("WMDD_AUTO_DETECT", "0")
  assert sharding.initialize_distributed() is False and calls == []
  monkeypatch.delenv("WMDD_AUTO_DETECT")
  assert sharding.initialize_distributed(coordinator_address="h:1", num_processes=2,
                                         process_id=0) is True
  assert calls[-1]["coordinator_address"] == "h:1"


def test_failures_name_the_fix(monkeypatch, calls):
  monkeypatch.setattr(sharding, "detect_cluster", lambda: ("GkeTpuCluster", None))

  def fail(**kw):
    raise RuntimeError("distributed.initialize should only be called once.")

  monkeypatch.setattr(jax.distributed, "initialize", fail)
  with pytest.raises(ConfigError, match="WMDD_AUTO_DETECT=0"):
    sharding.initialize_distributed()


def test_detect_cluster_here_finds_nothing(monkeypatch):
  for var in ("SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(var, raising=False)
  assert sharding.detect_cluster() is None  # this CPU machine is no cluster
