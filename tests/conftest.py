"""Fixtures shared by every test module (keep them generic)."""

import jax
import numpy as np
import pytest


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
  import os

  previous = os.environ.get("WMDD_CACHE_DIR")
  os.environ["WMDD_CACHE_DIR"] = str(tmp_path_factory.mktemp("wmdd_cache"))
  yield
  if previous is None:
    os.environ.pop("WMDD_CACHE_DIR", None)
  else:
    os.environ["WMDD_CACHE_DIR"] = previous
