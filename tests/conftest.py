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
