"""Fixtures shared by every test module (keep them generic)."""

import os
import sys

# POT (the exact-LP reference in test_barycenter) imports every array library it finds at import
# time, PyTorch and TensorFlow included, into whichever process imports it; its numpy LP is all we
# use. Its own switches keep torch and TensorFlow's backend out of the test processes.
for _backend in ("PYTORCH", "TENSORFLOW", "CUPY"):
  os.environ.setdefault(f"POT_BACKEND_DISABLE_{_backend}", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng() -> np.random.Generator:
  """A seeded numpy generator, fresh for each test."""
  return np.random.default_rng(0)


@pytest.fixture
def key() -> jax.Array:
  """A JAX PRNG key, the same for each test."""
  return jax.random.key(0)


@pytest.fixture(autouse=True, scope="session")
def _private_stats_cache(tmp_path_factory):
  """Dataset statistics are cached per user (wmdd_jax.data); tests keep theirs to themselves so
  a run never reads or leaves entries in ~/.cache. Subprocesses inherit the variable."""
  previous = os.environ.get("WMDD_CACHE_DIR")
  os.environ["WMDD_CACHE_DIR"] = str(tmp_path_factory.mktemp("wmdd_cache"))
  yield
  if previous is None:
    os.environ.pop("WMDD_CACHE_DIR", None)
  else:
    os.environ["WMDD_CACHE_DIR"] = previous


@pytest.fixture(autouse=True)
def _torch_only_where_marked(request):
  """Tests that import PyTorch carry ``@pytest.mark.torch``: `make test` runs them in a process of
  their own (``-m torch``), so the package's tests run with JAX, TensorFlow and no torch, as a
  user's process does. Two large runtimes with their own thread pools and allocators in one long
  test process is what a CI run crashed in (a segfault late in the suite); this check keeps an
  unmarked torch test from bringing torch back into the main process."""
  before = sys.modules.get("torch") is not None
  yield
  if (not before and sys.modules.get("torch") is not None
      and request.node.get_closest_marker("torch") is None):
    pytest.fail(f"{request.node.nodeid} imported torch without @pytest.mark.torch; mark it so "
                "that `make test` runs it in the torch process", pytrace=False)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops JAX's compiled programs after each test module. Every executable XLA's CPU backend
  keeps maps memory of its own, and one process holding the whole suite's programs reached the
  kernel's limit on memory mappings (vm.max_map_count, 65530 here): LLVM then aborts the
  process mid-compilation ("Cannot allocate memory"), as a clean-clone run did once the
  barycenter tests compiled more solver variants. Modules rarely share programs, so little is
  compiled twice."""
  yield
  jax.clear_caches()
