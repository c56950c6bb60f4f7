"""Deterministic work units: bounds, validation and ordered sums (one device; the multi-device
bit-identity checks are in tests/test_parallel.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wmdd_jax import ConfigError
from wmdd_jax.distributed import units


def test_bounds_cover_every_row_once_in_order():
  assert units.bounds(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]  # np.array_split's sizes
  assert units.bounds(8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
  assert units.bounds(3, 4) == [(0, 1), (1, 2), (2, 3)]  # never an empty unit
  assert units.bounds(0, 4) == []
  for n in (1, 5, 64, 97):
    for g in (1, 2, 3, 8):
      parts = units.bounds(n, g)
      sizes = [b - a for a, b in parts]
      assert parts[0][0] == 0 and parts[-1][1] == n and min(sizes) >= 1
      assert all(parts[i][1] == parts[i + 1][0] for i in range(len(parts) - 1))
      assert max(sizes) - min(sizes) <= 1
      np.testing.assert_array_equal(sizes, [len(x) for x in np.array_split(np.arange(n),
                                                                          min(g, n))])


@pytest.mark.parametrize("bad", [-1, 1.5, "4", True])
def test_check_units_rejects_bad_values(bad):
  with pytest.raises(ConfigError, match="units must be an int"):
    units.check_units(bad)


def test_check_units_accepts_ints():
  assert units.check_units(0) == 0 and units.check_units(np.int64(4)) == 4


def test_ordered_sum_adds_left_to_right():
  # In float32, (1e8 + 1) - 1e8 == 0 but (1e8 - 1e8) + 1 == 1: the order is observable.
  terms = [{"x": jnp.float32(1e8)}, {"x": jnp.float32(1.0)}, {"x": jnp.float32(-1e8)}]
  assert float(units.ordered_sum(terms, jax.devices()[0])["x"]) == 0.0
  assert float(units.fold_sum(terms[::-1])["x"]) == 0.0  # -1e8 + 1 rounds to -1e8 as well
  reordered = [terms[0], terms[2], terms[1]]
  assert float(units.fold_sum(reordered)["x"]) == 1.0


def test_map_units_runs_units_round_robin_in_order():
  dev = jax.devices()[0]
  outs = units.map_units(lambda g, d, lo, hi: jnp.array([g, d, lo, hi]), 10, 4, [dev, dev, dev])
  np.testing.assert_array_equal(np.stack(outs), [[0, 0, 0, 3], [1, 1, 3, 6], [2, 2, 6, 8],
                                                 [3, 0, 8, 10]])
  assert all(o.devices() == {dev} for o in outs)
  assert units.map_units(lambda *a: 1 / 0, 0, 4, [dev]) == []  # no rows: no unit runs


def test_gather_rows_concatenates_units_in_order():
  parts = [(jnp.arange(3.0), jnp.ones((3, 2))), (jnp.arange(3.0, 5.0), jnp.zeros((2, 2)))]
  a, b = units.gather_rows(parts, jax.devices()[0])
  np.testing.assert_array_equal(a, np.arange(5.0))
  np.testing.assert_array_equal(b, np.concatenate([np.ones((3, 2)), np.zeros((2, 2))]))


def test_unit_key_is_a_fold_in_chain():
  key = jax.random.key(7)
  got = jax.jit(units.unit_key)(key, 3, 2)
  want = jax.random.fold_in(jax.random.fold_in(key, 3), 2)
  np.testing.assert_array_equal(jax.random.key_data(got), jax.random.key_data(want))


def test_devices_default_to_the_first_device():
  assert units.devices_of(None) == [jax.devices()[0]]
  copies = units.replicas({"w": np.ones(2)}, units.devices_of(None))
  assert len(copies) == 1 and copies[0]["w"].devices() == {jax.devices()[0]}
